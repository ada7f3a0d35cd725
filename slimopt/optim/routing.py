"""Routing: how each parameter of a group is updated, by which algorithm, as how many matrices of which shape.

A matrix algorithm sees a parameter as ``count`` matrices of one (oriented) shape: the trailing two dimensions,
batched over the leading ones (an MoE weight E × out × in is E matrices). A parameter that is not a matrix with
both sides ≥ 2 goes to the AdamW fallback. Elementwise algorithms see the parameter's own shape.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from slimopt.optim.algorithm import Algorithm

# How a param group's weights are matrices. "out_in": the last two dims are (out, in), as nn.Linear stores them,
# and any leading dims are a batch of matrices (MoE experts E × out × in); "in_out": the same, transposed, as HF's
# Conv1D (GPT-2) stores them; "conv": dim 0 is out and the rest flattens to in (a conv kernel out × in × k...).
LAYOUTS = ("out_in", "in_out", "conv")


class FallbackWarning(UserWarning):
    """A parameter in a matrix group that is not a matrix: it trains with plain AdamW instead."""


class RoutingWarning(UserWarning):
    """A set-up that trains, but not as intended: a rank that saves no memory, or embeddings and output heads
    handed to a matrix algorithm. Warned once per optimizer, when it is built."""


# Module names (any dotted component) whose Linear layers are heads, not hidden matrices: they map to or from
# a vocabulary or a label set and train with AdamW.
DEFAULT_HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score", "qa_outputs")
# Name components of embeddings besides those containing "embed" (GPT-2's token and position tables).
EMBEDDING_NAMES = ("wte", "wpe")


def looks_like_embedding_or_head(name: str) -> bool:
    """Whether a parameter's name says it is an embedding or an output head (by its dotted components: one
    containing "embed", or one of ``EMBEDDING_NAMES`` or ``DEFAULT_HEAD_NAMES``). Names only: a model whose
    embedding is called otherwise is not recognized."""
    parts = name.split(".")[:-1] or name.split(".")
    return any("embed" in part or part in EMBEDDING_NAMES or part in DEFAULT_HEAD_NAMES for part in parts)


@dataclass(frozen=True)
class Route:
    """How one parameter is updated: by which algorithm, as how many matrices of which (oriented) shape.

    ``count`` matrices of shape ``shape`` are the parameter's trailing two dimensions, batched over its
    leading ones; ``transposed`` says whether the oriented matrix is the transpose of the stored one.
    Elementwise algorithms see the parameter's own shape.
    """

    algorithm: Algorithm
    shape: tuple[int, ...]
    count: int = 1
    transposed: bool = False


def route(param: torch.Tensor, group: dict, algorithm: Algorithm, fallback: Algorithm) -> Route:
    """The route of ``param`` in ``group``, whose algorithm is ``algorithm``; ``fallback`` takes non-matrices."""
    if not algorithm.matrix:
        return Route(algorithm, tuple(param.shape))
    layout = group.get("layout", "out_in")
    conv = layout == "conv" and param.ndim >= 2
    matrix_view = (param.shape[0], math.prod(param.shape[1:])) if conv else param.shape
    if len(matrix_view) >= 2 and param.numel() > 0 and min(matrix_view[-2:]) >= 2:
        *lead, rows, cols = matrix_view
        stored_in_out = layout == "in_out"
        out_features, in_features = (cols, rows) if stored_in_out else (rows, cols)
        flip = {"tall": out_features < in_features, "wide": out_features > in_features,
                "wide, square transposed": out_features >= in_features}[algorithm.orientation(group)]
        transposed = flip != stored_in_out
        shape = (cols, rows) if transposed else (rows, cols)
        return Route(algorithm, shape, math.prod(lead), transposed)
    return Route(fallback, tuple(param.shape))


def as_matrices(grad: torch.Tensor, route: Route) -> torch.Tensor:
    """The gradient as (count, *route.shape): oriented matrices, or the elementwise tensor with a batch dim."""
    if not route.algorithm.matrix:
        return grad.unsqueeze(0)
    m, n = route.shape
    return grad.reshape(-1, n, m).mT if route.transposed else grad.reshape(-1, m, n)


def as_param(delta: torch.Tensor, shape: torch.Size, route: Route) -> torch.Tensor:
    """Δ of (count, *route.shape) shaped as a param of ``shape`` again."""
    return (delta.mT if route.transposed else delta).reshape(shape)


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn at the first caller outside slimopt and torch, however deep the call came from."""
    skipped = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
