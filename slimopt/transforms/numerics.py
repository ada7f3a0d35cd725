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


# Columns cast to the working precision at a time by gram() and apply_left(): enough for full-speed GEMMs,
# and no full fp64 copy of a large gradient stack.
COLUMN_BLOCK = 512


def column_blocks(X: torch.Tensor, dtype: torch.dtype):
    """(start, X[..., start:start + COLUMN_BLOCK] cast to ``dtype``) over X's columns."""
    for start in range(0, X.shape[-1], COLUMN_BLOCK):
        yield start, X[..., start:start + COLUMN_BLOCK].to(dtype)


def gram(X: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X Xᵀ of each matrix (..., r, n), accumulated in ``dtype`` over column blocks, symmetrized."""
    A = sum(block @ block.mT for _, block in column_blocks(X, dtype))
    return (A + A.mT) / 2


def apply_left(W: torch.Tensor, X: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W X in ``dtype``, with X's columns cast to W's dtype a block at a time; ``out`` may be X itself."""
    if out is None:
        out = torch.empty(X.shape, dtype=dtype, device=X.device)
    for start, block in column_blocks(X, W.dtype):
        out[..., start:start + block.shape[-1]] = W @ block
    return out


def round_stochastically(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 → bf16, rounding up or down with probabilities given by the distance to each neighbour.

    bf16 is the top 16 bits of an fp32; adding uniform noise to the low 16 bits before truncating carries into
    the kept bits with exactly that probability. ``generator`` (on x's device) makes the draw reproducible.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the low 16 bits
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x).to(torch.bfloat16)
