"""The Adam moment update, shared by the AdamW fallback and GaLore."""

from __future__ import annotations

import math

import torch


def adam_update_(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> torch.Tensor:
    """Update the moments in place and return the bias-corrected m̂ / (√v̂ + eps).

    ``step`` counts from 1. In place because the fallback runs on embeddings
    and LM heads, where a copy of each moment would cost real memory. The
    arithmetic follows torch.optim.AdamW's, so the two agree to rounding.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return torch.div(exp_avg, denom, out=denom).div_(bias_correction1)
