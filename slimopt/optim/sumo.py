"""SUMO: subspace momentum, orthogonalized exactly.

Per matrix W (m × n, oriented so m ≥ n), with t counting steps from 0:

    if t % update_gap == 0:   Q_new = top-r left singular vectors of G
                              M ← (Q_newᵀ Q_old) M   (t > 0),   Q ← Q_new
    Ĝ = Qᵀ G                                         project
    M ← μ·M + Ĝ                                      accumulate (heavy ball)
    O = orth(M)                                      orthogonalize (exact by default)
    O ← O·min(1, γ‖O_prev‖/‖O‖)                      limit norm growth
    Δ = α·0.2·√max(m, n)·Q O + perp_scale·(G − Q Ĝ)  project back, scale

State per matrix: Q (m × r) and M (r × n), plus three scalars
(‖O_prev‖_F, the subspace seed, the step).

Which side is projected: the SUMO paper states Q ∈ R^{m×r} for m ≥ n, i.e. the
basis spans the longer side and the moment is r × min(m, n); its official code
projects the shorter side instead (moment max(m, n) × r, as GaLore). slimopt
follows the paper's text: the moment and the matrix that is orthogonalized
every step are then the smaller ones (r × min(m, n)), which is what makes the
exact SVD affordable.
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import ADAMW_RMS, Algorithm, check_choice, check_int, check_number
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.transforms import (
    METHODS,
    SUBSPACE_METHODS,
    limit_norm_growth,
    orthogonalize,
    project,
    project_back_with_residual,
    refresh_subspace,
    rotate_moment,
)

# Moonlight's scale for Muon: 0.2·√max(m, n) gives a full-rank orthogonal m × n update an RMS of 0.2, about
# AdamW's. SUMO's O has rank r, so its RMS is 0.2·√(r / min(m, n)) (0.05 at r = 128, n = 2048): SUMO's lr does not
# mean what AdamW's does, and needs its own tuning.
RMS_MATCH = ADAMW_RMS


class SumoAlgorithm(Algorithm):
    name = "sumo"
    defaults = {
        "rank": 128,
        "update_gap": 200,
        "momentum": 0.95,
        "scale": 1.0,
        "norm_growth_limit": 1.1,
        "perp_scale": 1.0,
        "subspace": "randomized",
        "orthogonalizer": "auto",
        "rank_rtol": None,
        "oversample": 8,
        "power_iters": 2,
        "seed": 0,
    }

    def validate(self, group):
        check_int(group, "rank", low=1)
        check_int(group, "update_gap", low=1)
        check_number(group, "momentum", low=0.0, high=1.0, high_open=True)
        check_number(group, "scale", low=0.0, low_open=group.get("lr_scale") == "adamw")
        if group["norm_growth_limit"] is not None:
            check_number(group, "norm_growth_limit", low=1.0)
        check_number(group, "perp_scale", low=0.0)
        check_choice(group, "subspace", SUBSPACE_METHODS)
        check_choice(group, "orthogonalizer", METHODS)
        if group["rank_rtol"] is not None:
            check_number(group, "rank_rtol", low=0.0, high=1.0)
        check_int(group, "oversample", low=0)
        check_int(group, "power_iters", low=0)
        check_int(group, "seed", low=0)

    def adamw_factor(self, shape, group):
        # The published Δ = α·0.2·√m·Q O has RMS α·0.2·√(r/n): O (r × n) is orthogonal, ‖Q O‖_F = √r. Dividing by
        # α·√(r/n) gives the rank-r update RMS 0.2, AdamW's (the residual G − Q Ĝ is scaled alike).
        n = shape[1]
        return math.sqrt(n / min(group["rank"], n)) / group["scale"]

    def cost(self, shape, group):
        m, n = shape
        r = min(group["rank"], n)
        sketch = r + group["oversample"]
        refresh = 2 * m * n * sketch * (2 * group["power_iters"] + 2) + 20 * sketch**3
        return 4 * m * n * r + 4 * r * r * n + 10 * r**3 + refresh / group["update_gap"]

    def init_state(self, shape, group, *, dtype, device, seed):
        m, n = shape
        r = min(group["rank"], n)
        return {
            "Q": torch.zeros(m, r, dtype=dtype, device=device),
            "M": torch.zeros(r, n, dtype=dtype, device=device),
            "o_norm": torch.zeros((), dtype=dtype, device=device),
            "seed": torch.tensor(seed, dtype=torch.int64, device="cpu"),  # a host counter: no device sync
        }

    def update(self, G, state, group, step):
        Q, M = state["Q"], state["M"]
        if step % group["update_gap"] == 0:
            Q_new = refresh_subspace(G, Q, group, state["seed"].tolist(), step)
            if step > 0:
                M = rotate_moment(M, Q, Q_new)
            Q = Q_new
        G_hat = project(G, Q)
        M = M.mul_(group["momentum"]).add_(G_hat)  # in place: M is the stacked state itself between refreshes
        O = orthogonalize(M, group["orthogonalizer"], rtol=group["rank_rtol"])
        O, o_norm = limit_norm_growth(O, state["o_norm"], group["norm_growth_limit"])
        m, n = G.shape[-2:]
        scale = group["scale"] * RMS_MATCH * math.sqrt(max(m, n))
        delta = project_back_with_residual(scale * O, Q, G, G_hat, group["perp_scale"], overwrite=True)
        return delta, {"Q": Q, "M": M, "o_norm": o_norm, "seed": state["seed"]}

    def reference_update(self, G, state, group, step):
        Q, M, previous_norm = state["Q"], state["M"], float(state["o_norm"])
        m, n = G.shape
        if step % group["update_gap"] == 0:
            Q_new = refresh_subspace(G, Q, group, [int(state["seed"])], step)
            if step > 0:
                M = Q_new.T @ Q @ M
            Q = Q_new
        G_hat = Q.T @ G
        M = group["momentum"] * M + G_hat
        O = orthogonalize(M, group["orthogonalizer"], rtol=group["rank_rtol"])
        norm = torch.linalg.norm(O)
        limit = group["norm_growth_limit"]
        if limit is not None and previous_norm > 0 and norm > limit * previous_norm:
            O = O * (limit * previous_norm / norm)
            norm = torch.linalg.norm(O)
        delta = group["scale"] * 0.2 * math.sqrt(max(m, n)) * (Q @ O) + group["perp_scale"] * (G - Q @ G_hat)
        return delta, {"Q": Q, "M": M, "o_norm": norm, "seed": state["seed"]}


class SUMO(SlimOptimizer):
    """SUMO (subspace-aware moment orthogonalization) with an AdamW fallback.

    Args:
        params: parameters or param groups, e.g. ``slimopt.param_groups(model)``.
        lr: learning rate.
        rank: subspace rank r (clipped to the matrix's smaller side).
        update_gap: steps between subspace refreshes (K).
        momentum: heavy-ball coefficient μ in [0, 1).
        scale: α, multiplies the orthogonalized update.
        norm_growth_limit: γ ≥ 1 caps ‖O‖_F growth per step; None disables it.
        perp_scale: weight of the gradient's part outside the subspace.
        subspace: "randomized" (Halko–Martinsson–Tropp) or "svd" (exact).
        orthogonalizer: "auto" (default: "polar_express" on GPUs, and on CPUs with fast bf16 for moments whose
            smaller side is ≥ 256; "eigh" otherwise), "polar_express" (fp64-free quintic iterations, bf16
            steps and an fp32 finish: singular values above rank_rtol·σ_max, default 1e-3, within 1e-2 of 1),
            "polar" (exact to 1e-4 from batched fp64 GEMMs and Choleskys, no host sync; a softer rank cut),
            "svd", "eigh" (exact) or "newton_schulz" (Muon's approximation).
        rank_rtol: the exact orthogonalizers drop singular values of M at or below rank_rtol·σ_max ("polar"
            from about rank_rtol·σ_max/10);
            None: max(r, n)·ε_float32, torch.linalg.matrix_rank's rule. It acts as a regularizer
            (6.5e-4 at n = 5461), so it is a hyperparameter; 0 keeps every non-zero direction. With
            "polar_express" it is the floor above which every direction is orthogonalized (default 1e-3).
        oversample, power_iters: randomized range finder settings.
        seed: base seed of the per-matrix random sketches.
        weight_decay: decoupled, W ← W·(1 − lr·wd).
        betas, eps: Adam settings of the AdamW fallback.
        maximize: maximize the objective (the gradient's sign is flipped), as in torch.optim.
        lr_scale: "published" (the paper's update scale) or "adamw" (each matrix update scaled to AdamW's RMS, so
            AdamW's lr carries over; see docs/optimizers.md, "Choosing a learning rate").
        **options: foreach, skip_nonfinite, max_stack_bytes, stochastic_rounding: see :class:`SlimOptimizer`.
    """

    algorithm = "sumo"

    def __init__(self, params, lr: float = 1e-3, rank: int = 128, update_gap: int = 200,
                 momentum: float = 0.95, scale: float = 1.0, norm_growth_limit: float | None = 1.1,
                 perp_scale: float = 1.0, subspace: str = "randomized", orthogonalizer: str = "auto",
                 rank_rtol: float | None = None, oversample: int = 8, power_iters: int = 2, seed: int = 0,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False, lr_scale: str = "published", **options):
        defaults = dict(lr=lr, rank=rank, update_gap=update_gap, momentum=momentum, scale=scale,
                        norm_growth_limit=norm_growth_limit, perp_scale=perp_scale, subspace=subspace,
                        orthogonalizer=orthogonalizer, rank_rtol=rank_rtol, oversample=oversample,
                        power_iters=power_iters, seed=seed, weight_decay=weight_decay, betas=betas, eps=eps,
                        maximize=maximize, lr_scale=lr_scale)
        super().__init__(params, defaults, **options)
