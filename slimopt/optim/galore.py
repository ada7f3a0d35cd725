"""GaLore-AdamW, as published: Adam moments kept in a low-rank gradient subspace.

Per matrix W, with t counting steps from 0, oriented so that the basis Q spans
the side chosen by ``side``:

    if t % update_gap == 0:   Q = top-r left singular vectors of G
    R = Qᵀ G                                     project
    N = Adam direction of R (bias-corrected)     the moments are not rotated
    Δ = scale·Q N                                project back, scale

``side="short"`` (the default, as published): Q spans the shorter side, so the
moments are max(m, n) × r. The paper's Algorithm 2 is stated for m ≤ n with
P = U[:, :r]; its official projector uses the right singular vectors when
rows ≥ cols. Here the matrix is oriented wide (rows ≤ cols) and Q is taken on
the left, which is the same thing. ``side="long"``: Q spans the longer side,
moments r × min(m, n): less state, not the published method.

The subspace comes from the randomized range finder by default (GEMMs and a
QR, as SUMO's); ``subspace="svd"`` is the published exact SVD, which on a GPU
costs a full factorization of every gradient at each refresh.

State per matrix: Q (rows × r), the two moments (r × cols), the sketch seed and the step.
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import Algorithm, check_choice, check_int, check_number
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.transforms import SUBSPACE_METHODS, adam_update_, project, refresh_subspace

SIDES = ("short", "long")


class GaLoreAlgorithm(Algorithm):
    name = "galore"
    defaults = {"rank": 128, "update_gap": 200, "scale": 0.25, "side": "short", "subspace": "randomized",
                "oversample": 8, "power_iters": 2, "seed": 0}

    def orientation(self, group):
        # Published: the right singular vectors of a matrix with rows ≥ cols (square included), else the left.
        return "wide, square transposed" if group["side"] == "short" else "tall"

    def validate(self, group):
        check_int(group, "rank", low=1)
        check_int(group, "update_gap", low=1)
        check_number(group, "scale", low=0.0, low_open=group.get("lr_scale") == "adamw")
        check_choice(group, "side", SIDES)
        check_choice(group, "subspace", SUBSPACE_METHODS)
        check_int(group, "oversample", low=0)
        check_int(group, "power_iters", low=0)
        check_int(group, "seed", low=0)

    def adamw_factor(self, shape, group):
        # N, the Adam direction of the r × n projection, has about AdamW's per-entry RMS; Q N (m × n, Q orthonormal
        # m × r) spreads the same energy over m/r times as many entries. √(m/r)/scale undoes that and the scale.
        m, n = shape
        return math.sqrt(m / min(group["rank"], m, n)) / group["scale"]

    def cost(self, shape, group):
        m, n = shape
        r = min(group["rank"], m, n)
        sketch = r + group["oversample"]
        refresh = 2 * m * n * sketch * (2 * group["power_iters"] + 2) + 20 * sketch**3
        return 4 * m * n * r + 10 * r * n + refresh / group["update_gap"]

    def init_state(self, shape, group, *, dtype, device, seed):
        m, n = shape
        r = min(group["rank"], m, n)
        return {
            "Q": torch.zeros(m, r, dtype=dtype, device=device),
            "exp_avg": torch.zeros(r, n, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(r, n, dtype=dtype, device=device),
            "seed": torch.tensor(seed, dtype=torch.int64, device="cpu"),  # a host counter: no device sync
        }

    def update(self, G, state, group, step):
        Q = state["Q"]
        if step % group["update_gap"] == 0:
            Q = refresh_subspace(G, Q, group, state["seed"].tolist(), step)
        beta1, beta2 = group["betas"]
        N = adam_update_(project(G, Q), state["exp_avg"], state["exp_avg_sq"],
                         beta1=beta1, beta2=beta2, eps=group["eps"], step=step + 1)
        delta = torch.matmul(Q, N, out=G).mul_(group["scale"])  # Q N, written over G: the step's scratch copy
        return delta, {**state, "Q": Q}

    def reference_update(self, G, state, group, step):
        Q = state["Q"]
        if step % group["update_gap"] == 0:
            Q = refresh_subspace(G, Q, group, [int(state["seed"])], step)
        R = Q.T @ G
        beta1, beta2 = group["betas"]
        t = step + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * R
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * R * R
        N = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + group["eps"])
        return group["scale"] * (Q @ N), {"Q": Q, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "seed": state["seed"]}


class GaLore(SlimOptimizer):
    """GaLore-AdamW (Zhao et al., 2024) with an AdamW fallback for non-matrix params.

    Args:
        params: parameters or param groups, e.g. ``slimopt.param_groups(model)``.
        lr: learning rate.
        rank: subspace rank r (clipped to the matrix's smaller side).
        update_gap: steps between subspace refreshes.
        scale: multiplies the projected-back Adam direction (GaLore's alpha).
        side: "short" (published: project the shorter side, moments max(m, n) × r) or "long"
            (project the longer side, moments r × min(m, n)).
        subspace: "randomized" (Halko–Martinsson–Tropp range finder, the default) or "svd" (exact, published).
        oversample, power_iters: randomized range finder settings.
        seed: base seed of the per-matrix random sketches.
        betas, eps: Adam settings, in the subspace and in the fallback.
        weight_decay: decoupled, W ← W·(1 − lr·wd).
        maximize: maximize the objective, as in torch.optim.
        lr_scale: "published" (the paper's update scale) or "adamw" (each matrix update scaled to AdamW's RMS, so
            AdamW's lr carries over; see docs/optimizers.md, "Choosing a learning rate").
        **options: foreach, skip_nonfinite, max_stack_bytes, stochastic_rounding: see :class:`SlimOptimizer`.
    """

    algorithm = "galore"

    def __init__(self, params, lr: float = 1e-3, rank: int = 128, update_gap: int = 200, scale: float = 0.25,
                 side: str = "short", subspace: str = "randomized", oversample: int = 8, power_iters: int = 2,
                 seed: int = 0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, maximize: bool = False, lr_scale: str = "published", **options):
        defaults = dict(lr=lr, rank=rank, update_gap=update_gap, scale=scale, side=side, subspace=subspace,
                        oversample=oversample, power_iters=power_iters, seed=seed, betas=betas, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, lr_scale=lr_scale)
        super().__init__(params, defaults, **options)
