"""Precision and numerical-rank rules shared by the orthogonalizers."""

from __future__ import annotations

import torch

EPS_FLOAT32 = torch.finfo(torch.float32).eps


def default_rtol(shape: tuple[int, int]) -> float:
    """max(r, n)·ε_float32: the relative rank cut of ``torch.linalg.matrix_rank`` for an fp32 matrix."""
    return max(shape) * EPS_FLOAT32


def rank_tolerance(sigma_max: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> torch.Tensor:
    """The singular value at or below which a direction counts as zero: σ_max·rtol."""
    return sigma_max * (default_rtol(shape) if rtol is None else rtol)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)
