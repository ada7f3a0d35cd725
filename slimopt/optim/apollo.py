"""APOLLO and APOLLO-Mini, as published: AdamW's update approximated by a scaled raw gradient.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025 (arXiv 2412.05270). Per matrix W,
oriented wide (rows m ≤ cols n), with t counting steps from 0:

    if t % update_gap == 0:   P = a fresh m × r Gaussian, entries N(0, 1/r)   random, not the gradient's subspace
    R = Pᵀ G                                        project (r × n)
    M ← β1·M + (1 − β1)·R,  V ← β2·V + (1 − β2)·R²  Adam moments in the projected space, never rotated nor reset
    N = M / (√V + eps)
    s_j = ‖N[:, j]‖ / (‖R[:, j]‖ + 1e-8)            channel-wise (APOLLO): one factor per column, the long side
    s   = ‖N‖_F / (‖R‖_F + 1e-8)                    tensor-wise (APOLLO-Mini, rank 1)
    S = G·s                                         the raw full-rank gradient, scaled
    S ← S·min(1, γ‖S_prev‖/‖S‖)                     Fira's norm-growth limiter, γ = 1.01 (not on the first step)
    Δ = √scale · S · √(1 − β2^(t+1)) / (1 − β1^(t+1))

Which side is projected: the published projector projects the right side (R = G Pᵀ, P r × n) of a matrix with
rows ≥ cols, square ones included, and the left side otherwise: always the shorter side, the channels being
the longer side. Here the matrix is oriented wide (rows ≤ cols), square matrices transposed (their rows are
the layer's inputs), and P is on the left: the same thing, as GaLore's orientation in this repository.

Bias correction as in the published code: eps is added to √V uncorrected, and Adam's correction multiplies the
final step. The limiter compares ‖S‖ before √scale and the correction, as published; a previous norm of 0 (the
first step, or after an all-zero gradient) means no cap. The rank is clipped to the shorter side.

P is not stored: it is drawn again at every step from the matrix's seed and the step of the last refresh
(``sketch_seed(seed, t − t % update_gap)``, as SUMO's and GaLore's sketches are seeded), the published
"SGD-like memory": an m × r Gaussian per matrix and step, cheap next to the m × n × r projection.

State per matrix: the two moments (r × n each, n the longer side), ‖S_prev‖ (one scalar), the seed and the
step (two int64): (2·r·n + 1) floats + 16 bytes. APOLLO-Mini (r = 1): 2·n + 1 floats + 16 bytes.

The published optimizer's eps is 1e-6 (this repository's other optimizers default to 1e-8, torch's and HF's
value): APOLLO and APOLLOMini default to 1e-6.
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import Algorithm, check_choice, check_int, check_number
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.transforms.subspace import gaussian_sketch, sketch_seed

SCALE_TYPES = ("channel", "tensor")
# Added to ‖R‖ in the scaling factor's denominator, as published (independent of the Adam eps).
SCALING_EPS = 1e-8


def random_projection(seeds, refreshed_at: int, shape: tuple[int, int], device, dtype) -> torch.Tensor:
    """The (len(seeds), m, r) projections in force since step ``refreshed_at``: N(0, 1/r) entries, each matrix's
    from its own seed, so a matrix draws the same P alone or inside a stack."""
    return gaussian_sketch(seeds, refreshed_at, shape, device, dtype).div_(math.sqrt(shape[1]))


class ApolloAlgorithm(Algorithm):
    name = "apollo"
    defaults = {"rank": 128, "update_gap": 200, "scale": 1.0, "scale_type": "channel", "norm_growth_limit": 1.01,
                "seed": 0}

    def orientation(self, group):
        # Published: the right side of a matrix with rows ≥ cols (square included) is projected, else the left.
        return "wide, square transposed"

    def validate(self, group):
        check_int(group, "rank", low=1)
        check_int(group, "update_gap", low=1)
        check_number(group, "scale", low=0.0, low_open=group.get("lr_scale") == "adamw")
        check_choice(group, "scale_type", SCALE_TYPES)
        if group["norm_growth_limit"] is not None:
            check_number(group, "norm_growth_limit", low=1.0)
        check_int(group, "seed", low=0)

    def adamw_factor(self, shape, group):
        # N, the Adam direction of the r × n projection, has about AdamW's per-entry RMS ρ, so each of its columns
        # has norm ≈ ρ·√r. P's entries are N(0, 1/r): E‖Pᵀ g‖² = ‖g‖², so ‖R[:, j]‖ ≈ ‖G[:, j]‖ and the scaled
        # gradient's column S[:, j] = G[:, j]·s_j has norm ≈ ‖N[:, j]‖ ≈ ρ·√r (tensor-wise alike, in Frobenius
        # norm), spread over m entries: Δ's RMS is ≈ ρ·√(r/m)·√scale. √(m/r)/√scale undoes the projection's
        # energy loss and the published scale (m the shorter, projected side).
        m, n = shape
        return math.sqrt(m / min(group["rank"], m, n)) / math.sqrt(group["scale"])

    def cost(self, shape, group):
        m, n = shape
        r = min(group["rank"], m, n)
        # Drawing P, the projection, the moments and the two norms in the r × n space, scaling G (and its norm).
        return 20 * m * r + 2 * m * n * r + 16 * r * n + 6 * m * n

    def init_state(self, shape, group, *, dtype, device, seed):
        m, n = shape
        r = min(group["rank"], m, n)
        return {
            "exp_avg": torch.zeros(r, n, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(r, n, dtype=dtype, device=device),
            "scaled_norm": torch.zeros((), dtype=dtype, device=device),  # ‖S‖ of the last step, after the limiter
            "seed": torch.tensor(seed, dtype=torch.int64, device="cpu"),  # a host value: no device sync
        }

    def update(self, G, state, group, step):
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m, r = G.shape[-2], exp_avg.shape[-2]
        P = random_projection(state["seed"].tolist(), step - step % group["update_gap"], (m, r), G.device, G.dtype)
        R = torch.matmul(P.mT, G)
        del P
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(R, 1 - beta1)  # in place: the stacked state itself
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        N = torch.div(exp_avg, denom, out=denom)
        if group["scale_type"] == "channel":
            s = torch.linalg.vector_norm(N, dim=-2, keepdim=True)  # (B, 1, n)
            s.div_(torch.linalg.vector_norm(R, dim=-2, keepdim=True).add_(SCALING_EPS))
        else:
            s = torch.linalg.matrix_norm(N, keepdim=True)  # (B, 1, 1)
            s.div_(torch.linalg.matrix_norm(R, keepdim=True).add_(SCALING_EPS))
        del R, N, denom
        S = G.mul_(s)  # the scaled raw gradient, written over G: the step's scratch copy
        # Fira's limiter, as slimopt.transforms.limit_norm_growth computes it, but in place: S is a full m × n stack.
        norm = torch.linalg.matrix_norm(S)
        previous = state["scaled_norm"]
        limit = group["norm_growth_limit"]
        if limit is None:
            factor = torch.ones_like(norm)
        else:
            cap = limit * previous
            factor = torch.where((previous > 0) & (norm > cap), cap / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                                 1.0)
        t = step + 1
        step_scale = math.sqrt(group["scale"]) * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        delta = S.mul_((factor * step_scale)[..., None, None])
        return delta, {**state, "scaled_norm": norm * factor}

    def reference_update(self, G, state, group, step):
        m = G.shape[0]
        r = state["exp_avg"].shape[0]
        refreshed_at = step - step % group["update_gap"]
        P = torch.randn(m, r, dtype=G.dtype, device=G.device,
                        generator=_generator(int(state["seed"]), refreshed_at, G.device)) / math.sqrt(r)
        R = P.T @ G
        beta1, beta2 = group["betas"]
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * R
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * R * R
        N = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        if group["scale_type"] == "channel":
            s = N.norm(dim=0) / (R.norm(dim=0) + SCALING_EPS)  # one per column
        else:
            s = N.norm() / (R.norm() + SCALING_EPS)
        S = G * s
        norm = torch.linalg.norm(S)
        previous, limit = float(state["scaled_norm"]), group["norm_growth_limit"]
        if limit is not None and previous > 0 and norm > limit * previous:
            S = S * (limit * previous / norm)
            norm = torch.linalg.norm(S)
        t = step + 1
        delta = math.sqrt(group["scale"]) * S * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        return delta, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "scaled_norm": norm, "seed": state["seed"]}


def _generator(seed: int, refreshed_at: int, device) -> torch.Generator:
    """The generator ``random_projection`` draws a matrix's P from (its seed at the refresh step)."""
    return torch.Generator(device=device).manual_seed(sketch_seed(seed, refreshed_at))


class APOLLO(SlimOptimizer):
    """APOLLO (Zhu et al., 2025): AdamW-like updates from a channel-wise scaled gradient, with an AdamW fallback
    for non-matrix params.

    Args:
        params: parameters or param groups, e.g. ``slimopt.param_groups(model)``.
        lr: learning rate (published pre-training runs: 1e-2).
        rank: rank r of the random projection (clipped to the matrix's smaller side; published: 256, 128 at 60M).
        update_gap: steps between fresh random projections (published: 200).
        scale: Δ is multiplied by √scale (published: 1 for APOLLO, 128 for APOLLO-Mini).
        scale_type: "channel" (a factor per column of the longer side, APOLLO) or "tensor" (one factor per
            matrix, APOLLO-Mini).
        norm_growth_limit: γ ≥ 1 caps ‖S‖_F's growth per step (Fira's limiter, published 1.01); None disables it.
        seed: base seed of the per-matrix random projections.
        betas, eps: Adam settings, in the projected space and in the fallback (eps 1e-6 as published).
        weight_decay: decoupled, W ← W·(1 − lr·wd).
        maximize: maximize the objective, as in torch.optim.
        lr_scale: "published" (the paper's update scale) or "adamw" (Δ rescaled to AdamW's RMS, by
            √(m/r)/√scale: AdamW's lr carries over).
        **options: foreach, skip_nonfinite, max_stack_bytes, stochastic_rounding: see :class:`SlimOptimizer`.
    """

    algorithm = "apollo"

    def __init__(self, params, lr: float = 1e-2, rank: int = 128, update_gap: int = 200, scale: float = 1.0,
                 scale_type: str = "channel", norm_growth_limit: float | None = 1.01, seed: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 maximize: bool = False, lr_scale: str = "published", **options):
        defaults = dict(lr=lr, rank=rank, update_gap=update_gap, scale=scale, scale_type=scale_type,
                        norm_growth_limit=norm_growth_limit, seed=seed, betas=betas, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, lr_scale=lr_scale)
        super().__init__(params, defaults, **options)


class APOLLOMini(APOLLO):
    """APOLLO-Mini (Zhu et al., 2025): APOLLO with a rank-1 projection and one tensor-wise scaling factor per
    matrix, scaled by √128: the moments are 2 × (the longer side) per matrix, about SGD's memory.

    The same arguments as :class:`APOLLO`, with APOLLO-Mini's published defaults: ``rank=1``,
    ``scale_type="tensor"``, ``scale=128``.
    """

    def __init__(self, params, lr: float = 1e-2, rank: int = 1, update_gap: int = 200, scale: float = 128.0,
                 scale_type: str = "tensor", norm_growth_limit: float | None = 1.01, seed: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 maximize: bool = False, lr_scale: str = "published", **options):
        super().__init__(params, lr=lr, rank=rank, update_gap=update_gap, scale=scale, scale_type=scale_type,
                         norm_growth_limit=norm_growth_limit, seed=seed, betas=betas, eps=eps,
                         weight_decay=weight_decay, maximize=maximize, lr_scale=lr_scale, **options)
