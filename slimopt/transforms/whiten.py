"""SWAN's gradient transforms: row standardization (GradNorm) and whitening (GradWhitening).

Matrices are (..., m, n) with m ≤ n; whitening is (G Gᵀ)^-1/2 G on the m × m Gram.
"""

from __future__ import annotations

import math

import torch

from slimopt.transforms.numerics import compute_dtype
from slimopt.transforms.orthogonalize import (
    exact_method,
    orthogonalize_eigh,
    orthogonalize_polar,
    orthogonalize_polar_express,
)

WHITENING_METHODS = ("auto", "polar", "polar_express", "eigh", "newton_schulz")


def standardize_rows(G: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(G − row mean) / (row std + eps), with the biased std over each row's n entries; ``out`` may be G."""
    X = G.to(compute_dtype(G.dtype))
    centered = torch.sub(X, X.mean(dim=-1, keepdim=True), out=out)
    std = torch.linalg.vector_norm(centered, dim=-1, keepdim=True) / math.sqrt(G.shape[-1])
    return centered.div_(std + eps)


def inverse_sqrt_newton_schulz(A: torch.Tensor, steps: int) -> torch.Tensor:
    """A^-1/2 of symmetric PSD matrices by the coupled Newton–Schulz iteration (β = 0.5).

    The iteration runs on A/‖A‖_F, where Y → A^1/2 and Z → A^-1/2. On a singular
    A the plain iteration multiplies Z's null-space component by 1.5 every
    step, and fp32 rounding that pushes an eigenvalue below zero makes it
    diverge outright (a 512×512 row-standardized gradient does so within 40
    fp32 steps). The guard shifts the normalized A by 2ε·I: above the rounding
    of its eigenvalues, so every eigenvalue converges and Z stays bounded by
    (2ε)^-1/2 for any number of steps, and far below anything the default
    10 steps resolve, so the shift costs no accuracy there.
    """
    n = A.shape[-1]
    norm = torch.linalg.matrix_norm(A, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    identity = torch.eye(n, dtype=A.dtype, device=A.device)
    shift = 2 * torch.finfo(A.dtype).eps
    Y = A / norm + shift * identity
    Z = identity.expand_as(A)
    for _ in range(steps):
        T = 1.5 * identity - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / norm.sqrt()


def whiten(G: torch.Tensor, method: str = "auto", steps: int = 10, rtol: float | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """(G Gᵀ)^-1/2 G of each matrix (m ≤ n): the polar factor U Vᵀ of G.

    "eigh" is the pseudo-inverse square root on the numerical range (fp64 Gram),
    which equals U Vᵀ of G with singular values at or below σ_max·``rtol`` dropped
    (see :func:`slimopt.transforms.orthogonalize`); "polar" is the same to 1e-4 from
    GEMMs and Choleskys, with a softer cut; "polar_express" is fp64-free quintic iterations (every singular value above
    σ_max·``rtol``, default 1e-3, within 1e-2 of 1); "auto" picks by device
    (:func:`slimopt.transforms.orthogonalize.exact_method`). "newton_schulz" is the
    coupled iteration on the Gram for ``steps`` steps, with no rank cut: it only
    partly whitens, as directions far below the top converge slowly. The exact methods write into ``out``
    (which may be G itself) when given.
    """
    method = exact_method(method, G.device, G.shape)
    if method == "eigh":
        return orthogonalize_eigh(G, rtol, out=out)
    if method == "polar":
        return orthogonalize_polar(G, rtol, out=out)
    if method == "polar_express":
        return orthogonalize_polar_express(G, rtol, out=out)
    if method == "newton_schulz":
        X = G.to(compute_dtype(G.dtype))
        return inverse_sqrt_newton_schulz(X @ X.mT, steps) @ X
    raise ValueError(f"whitening={method!r} is not one of {WHITENING_METHODS}")
