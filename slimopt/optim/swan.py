"""SWAN: stateless whitening for matrix weights.

Per matrix W (m × n, oriented so m ≤ n):

    G̃ = (G − rowmean) / (rowstd + eps)   normalize (GradNorm)
    O = (G̃ G̃ᵀ)^-1/2 G̃                   whiten (GradWhitening)
    Δ = O·√(m·n)/‖O‖_F                    rescale to RMS 1, as Adam

No state is kept for matrices; non-matrix params use the AdamW fallback.
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import Algorithm, check_choice, check_int, check_number, register
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.transforms import WHITENING_METHODS, scale_to_unit_rms, standardize_rows, whiten


@register
class SwanAlgorithm(Algorithm):
    name = "swan"
    orientation = "wide"
    stateful = False
    defaults = {"whitening": "newton_schulz", "ns_steps": 10}

    def validate(self, group):
        check_choice(group, "whitening", WHITENING_METHODS)
        check_int(group, "ns_steps", low=1)
        check_number(group, "eps", low=0.0, low_open=True)

    def update(self, G, state, group, step):
        G_tilde = standardize_rows(G, group["eps"])
        O = whiten(G_tilde, group["whitening"], group["ns_steps"])
        return scale_to_unit_rms(O), state

    def reference_update(self, G, state, group, step):
        m, n = G.shape
        centered = G - G.mean(dim=1, keepdim=True)
        G_tilde = centered / (centered.std(dim=1, correction=0, keepdim=True) + group["eps"])
        O = whiten(G_tilde, group["whitening"], group["ns_steps"])
        norm = torch.linalg.norm(O)
        if norm == 0:
            return torch.zeros_like(O), state
        return O * (math.sqrt(m * n) / norm), state


class SWAN(SlimOptimizer):
    """SWAN (SGD with whitening and normalization): no optimizer state for matrices.

    Args:
        params: parameters or param groups, e.g. ``slimopt.param_groups(model)``.
        lr: learning rate (the update has RMS 1, so Adam-like values fit).
        whitening: "newton_schulz" (coupled iteration, ``ns_steps`` steps) or "eigh" (exact).
        ns_steps: iterations of the Newton–Schulz inverse square root.
        eps: added to each row's std in GradNorm, and Adam's eps for the fallback.
        weight_decay: decoupled, W ← W·(1 − lr·wd).
        betas: Adam betas of the AdamW fallback.
        foreach, skip_nonfinite, max_stack: see :class:`SlimOptimizer`.
    """

    algorithm = "swan"

    def __init__(self, params, lr: float = 1e-3, whitening: str = "newton_schulz", ns_steps: int = 10,
                 eps: float = 1e-8, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 *, foreach: bool = True, skip_nonfinite: bool = False, max_stack: int = 16):
        defaults = dict(lr=lr, whitening=whitening, ns_steps=ns_steps, eps=eps,
                        weight_decay=weight_decay, betas=betas)
        super().__init__(params, defaults, foreach=foreach, skip_nonfinite=skip_nonfinite, max_stack=max_stack)
