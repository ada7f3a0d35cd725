"""SWAN: stateless whitening for matrix weights.

Per matrix W (m × n, oriented so m ≤ n):

    G̃ = (G − rowmean) / (rowstd + norm_eps)   normalize (GradNorm)
    O = (G̃ G̃ᵀ)^-1/2 G̃                        whiten (GradWhitening)
    O ← O − rowmean(O)                         G̃·1 = 0, so O·1 = 0 (a no-op for the exact routes)
    Δ = O·√(m·n)/‖O‖_F                         rescale to RMS 1, as Adam

The GradNorm axis: each of the m ≤ n rows is standardized over its n entries,
i.e. along the longer side, and the whitening Gram is the small m × m one. For
an nn.Linear (out × in) that means each output's gradient row over the inputs
when out ≤ in (square q/k/v/o, down_proj), and each input's column over the
outputs when out > in (gate_proj, up_proj).

No state is kept for matrices; non-matrix params use the AdamW fallback.
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import ADAMW_RMS, Algorithm, check_choice, check_int, check_number
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.transforms import WHITENING_METHODS, scale_to_unit_rms, standardize_rows, whiten


class SwanAlgorithm(Algorithm):
    name = "swan"
    stateful = False
    defaults = {"whitening": "auto", "ns_steps": 10, "norm_eps": 1e-8, "rank_rtol": None}

    def orientation(self, group):
        return "wide"

    def adamw_factor(self, shape, group):
        return ADAMW_RMS  # Δ has RMS 1 by construction

    def cost(self, shape, group):
        # wide: the m × m Gram and applying its inverse square root (4m²n), and the inverse square root itself,
        # an eigh or a polar iteration: ~30 m³ in effect, fitted to measured CPU step times at llama_60m shapes
        # (benchmarks/owner_cost.py: 512 × 1376 takes 1.2-1.4× a 512 × 512); polar counts 53 m³ fp64 FLOPs.
        m, n = shape
        return 4 * m * m * n + 30 * m**3 + 10 * m * n

    def validate(self, group):
        check_choice(group, "whitening", WHITENING_METHODS)
        check_int(group, "ns_steps", low=1)
        check_number(group, "norm_eps", low=0.0, low_open=True)
        if group["rank_rtol"] is not None:
            check_number(group, "rank_rtol", low=0.0, high=1.0)

    def update(self, G, state, group, step):
        # Each transform overwrites G, the step's scratch copy: "stateless" in flight too.
        G_tilde = standardize_rows(G, group["norm_eps"], out=G)
        O = whiten(G_tilde, group["whitening"], group["ns_steps"], group["rank_rtol"], out=G)
        O = O.sub_(O.mean(dim=-1, keepdim=True))  # G̃·1 = 0, so O·1 = 0: what the bf16 iteration leaks goes
        return scale_to_unit_rms(O, out=O), state

    def reference_update(self, G, state, group, step):
        m, n = G.shape
        centered = G - G.mean(dim=1, keepdim=True)
        G_tilde = centered / (centered.std(dim=1, correction=0, keepdim=True) + group["norm_eps"])
        O = whiten(G_tilde, group["whitening"], group["ns_steps"], group["rank_rtol"])
        O = O - O.mean(dim=1, keepdim=True)
        norm = torch.linalg.norm(O)
        if norm == 0:
            return torch.zeros_like(O), state
        return O * (math.sqrt(m * n) / norm), state


class SWAN(SlimOptimizer):
    """SWAN (SGD with whitening and normalization): no optimizer state for matrices.

    Args:
        params: parameters or param groups, e.g. ``slimopt.param_groups(model)``.
        lr: learning rate (the update has RMS 1, so Adam-like values fit).
        whitening: "auto" (default: "polar_express" on GPUs, and on CPUs with fast bf16 for matrices whose
            smaller side is ≥ 256; "eigh" otherwise),
            "polar_express" (fp64-free quintic iterations, bf16 steps and an fp32 finish), "polar" (exact to 1e-4 from
            batched GEMMs and Choleskys, no host sync), "eigh" (exact) or "newton_schulz" (the coupled
            iteration for ``ns_steps`` steps: it only partly whitens).
        ns_steps: iterations of the Newton–Schulz inverse square root.
        norm_eps: added to each row's std in GradNorm.
        rank_rtol: with "eigh" ("polar"), directions whose singular value is at or below rank_rtol·σ_max
            (about a tenth of that) are dropped; None: max(m, n)·ε_float32 (torch.linalg.matrix_rank's rule).
            With "polar_express", the floor above which every direction is whitened (default 1e-3).
        weight_decay: decoupled, W ← W·(1 − lr·wd).
        betas, eps: Adam settings of the AdamW fallback.
        maximize: maximize the objective, as in torch.optim.
        lr_scale: "published" (the paper's update scale) or "adamw" (each matrix update scaled to AdamW's RMS, so
            AdamW's lr carries over; see docs/optimizers.md, "Choosing a learning rate").
        **options: foreach, skip_nonfinite, max_stack_bytes, stochastic_rounding: see :class:`SlimOptimizer`.
    """

    algorithm = "swan"

    def __init__(self, params, lr: float = 1e-3, whitening: str = "auto", ns_steps: int = 10,
                 norm_eps: float = 1e-8, rank_rtol: float | None = None, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, maximize: bool = False,
                 lr_scale: str = "published",
                 **options):
        defaults = dict(lr=lr, whitening=whitening, ns_steps=ns_steps, norm_eps=norm_eps, rank_rtol=rank_rtol,
                        weight_decay=weight_decay, betas=betas, eps=eps, maximize=maximize, lr_scale=lr_scale)
        super().__init__(params, defaults, **options)
