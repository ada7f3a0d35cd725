"""Per-matrix rescalings applied after orthogonalization or whitening."""

from __future__ import annotations

import math

import torch


def limit_norm_growth(
    O: torch.Tensor, previous_norm: torch.Tensor, limit: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cap ‖O‖_F at ``limit``·(previous norm); returns (O, its norm after the cap).

    ``previous_norm`` has one entry per matrix. A zero previous norm (the first
    step, or a step that followed a zero update) means there is nothing to
    compare against, so no cap applies.
    """
    norm = torch.linalg.matrix_norm(O)
    if limit is None:
        return O, norm
    cap = limit * previous_norm
    factor = torch.where((previous_norm > 0) & (norm > cap), cap / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0)
    return O * factor[..., None, None], norm * factor


def scale_to_unit_rms(O: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """O·√(m·n)/‖O‖_F, so every entry has RMS 1 as in Adam; a zero matrix stays zero. ``out`` may be O."""
    m, n = O.shape[-2:]
    norm = torch.linalg.matrix_norm(O, keepdim=True)
    factor = torch.where(norm > 0, math.sqrt(m * n) / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return torch.mul(O, factor, out=out)
