"""The interface every update rule implements.

An algorithm sees gradients already reshaped to 2-D, oriented the way it wants
(``tall``: rows ≥ cols, ``wide``: rows ≤ cols) and stacked to (B, m, n). It
never touches parameters: it returns the update direction Δ and the new state,
and the optimizer applies ``W ← W·(1 − lr·wd) − lr·Δ``. Which algorithms an
optimizer can route a group to is the optimizer class's ``algorithms`` table.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class Algorithm:
    name: str
    # The algorithm's own hyperparameters and their defaults (lr, weight_decay,
    # betas and eps are shared by every group and live in the optimizer).
    defaults: dict[str, Any] = {}
    # False: elementwise, any shape (AdamW). True: 2-D matrices only.
    matrix: bool = True
    stateful: bool = True
    # The group keys the step reads, where that is fewer than the group holds (an elementwise fallback group
    # carries the matrix groups' defaults too): the transient estimate caches by these alone. None: all of them.
    reads: tuple[str, ...] | None = None
    # Elementwise: the state has the param's shape, so FSDP2 can step each rank's rows on their own.
    shards_like_param: bool = True

    def orientation(self, group: dict) -> str:
        """How the matrices reach ``update``: "tall" (rows ≥ cols) or "wide" (rows ≤ cols), a square matrix
        as stored (its rows are the layer's outputs); or "wide, square transposed" (rows ≤ cols, a square
        matrix transposed: its rows are the layer's inputs)."""
        return "tall"

    def adamw_factor(self, shape, group: dict) -> float | None:
        """``lr_scale="adamw"``: the factor that gives Δ of an (oriented) ``shape`` the per-entry RMS AdamW's update
        has, so AdamW's lr (and weight decay) carry over; None where the algorithm has no such rule. Elementwise
        algorithms are AdamW already: 1."""
        return None if self.matrix else 1.0

    def validate(self, group: dict) -> None:
        """Raise ValueError naming the first bad hyperparameter of ``group``."""

    def cost(self, shape, group: dict) -> float:
        """Rough FLOPs of one step on an (oriented) ``shape``, refreshes amortized: what owner ranks balance.

        Elementwise algorithms: a few operations per element."""
        return 10.0 * math.prod(shape)

    def init_state(self, shape, group, *, dtype, device, seed: int) -> dict[str, torch.Tensor]:
        """Fresh per-matrix state for an (oriented) ``shape``; no step counter, the optimizer keeps it."""
        return {}

    def update(self, G: torch.Tensor, state: dict, group: dict, step: int):
        """Matrix algorithms: the batched step over G of shape (B, m, n) and state stacked along dim 0.

        ``step`` counts from 0. Returns (Δ, new_state). G is a scratch fp32 copy that the step owns: overwrite
        it (returning Δ in G's memory keeps the step's transient memory near one copy of the gradients). State
        tensors may be updated in place; the optimizer copies back any returned tensor that is a new one.
        """
        raise NotImplementedError

    def step_params(self, params, grads, states, group, step: int, *, round_bf16=None) -> None:
        """Elementwise algorithms (``matrix = False``): update ``params`` and their states in place, all of
        them in one call, as torch.optim's foreach and fused kernels do. ``group["lr"]`` is a float here;
        ``round_bf16`` (fp32 → bf16), if given, rounds the update of low-precision weights."""
        raise NotImplementedError

    def reference_update(self, G: torch.Tensor, state: dict, group: dict, step: int):
        """The same step for one (m, n) matrix, written for reading, not speed."""
        raise NotImplementedError


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"invalid {name}={value!r}: expected {expected}")


def check_number(group: dict, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``group[name]`` is a finite real number inside the given interval."""
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "a finite number")
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if low is not None and (value < low or (low_open and value == low)):
        _fail(name, value, f"a number in {interval}")
    if high is not None and (value > high or (high_open and value == high)):
        _fail(name, value, f"a number in {interval}")


def check_int(group: dict, name: str, *, low: int) -> None:
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"an integer ≥ {low}")


def check_choice(group: dict, name: str, choices) -> None:
    if group[name] not in choices:
        _fail(name, group[name], f"one of {sorted(choices)}")


def read_lr(lr) -> float:
    """The learning rate as a float; a tensor lr (as torch.optim allows) is read once per step."""
    return lr.item() if isinstance(lr, torch.Tensor) else lr


# lr_scale: "published", each method's own update scale (the papers' lrs); "adamw", every matrix update scaled to
# the RMS AdamW's would have, so that a user who swaps torch.optim.AdamW(lr=x) for a slimopt optimizer keeps x.
LR_SCALES = ("published", "adamw")
# AdamW's typical per-entry update RMS late in training (Moonlight, Liu et al. 2025; measured here in
# benchmarks/results/update_rms_tiny_cpu.md): what the orthogonalized and whitened updates (RMS fixed by their
# shape) are scaled to under lr_scale="adamw". Adam-moment methods (GaLore, APOLLO) keep their own RMS instead.
ADAMW_RMS = 0.2


def check_shared(group: dict) -> None:
    """The hyperparameters every group has: lr, weight_decay, betas, eps, maximize (and lr_scale, if given)."""
    if group.get("lr_scale", "published") not in LR_SCALES:
        _fail("lr_scale", group["lr_scale"], f"one of {list(LR_SCALES)}")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            _fail("lr", lr, "a number or a one-element floating-point tensor")
        check_number({"lr": lr.item()}, "lr", low=0.0)
    else:
        check_number(group, "lr", low=0.0)
    if not isinstance(group["maximize"], bool):
        _fail("maximize", group["maximize"], "True or False")
    check_number(group, "weight_decay", low=0.0)
    check_number(group, "eps", low=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        _fail("betas", betas, "a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        check_number({f"betas[{index}]": beta}, f"betas[{index}]", low=0.0, high=1.0, high_open=True)
