"""Orthogonalization O = U Vᵀ = (M Mᵀ)^-1/2 M of a stack of matrices.

Every function takes a tensor of shape (..., r, n) and works on the last two
dimensions, so one call handles a whole stack of same-shape matrices.

Numerical rank: singular values at or below ``σ_max · rtol`` count as zero,
with ``rtol = max(r, n) · ε_float32`` by default (the ``torch.linalg.matrix_rank``
rule). Their directions are dropped rather than blown up to unit length, which
matters for rank-deficient inputs such as a row-standardized square gradient.
The cut is a regularizer as much as a numerical floor: at n = 5461 it drops
every direction below 6.5e-4·σ_max, so the optimizers expose ``rtol``.
"""

from __future__ import annotations

import torch

EPS_FLOAT32 = torch.finfo(torch.float32).eps

# Muon's quintic Newton–Schulz coefficients (Jordan et al., 2024).
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def default_rtol(shape: tuple[int, int]) -> float:
    """max(r, n)·ε_float32: the relative rank cut of ``torch.linalg.matrix_rank`` for an fp32 matrix."""
    return max(shape) * EPS_FLOAT32


def rank_tolerance(sigma_max: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> torch.Tensor:
    """The singular value at or below which a direction counts as zero: σ_max·rtol."""
    return sigma_max * (default_rtol(shape) if rtol is None else rtol)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def orthogonalize_svd(M: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Exact U Vᵀ from a thin SVD; falls back to the eigh route if SVD fails."""
    X = M.to(compute_dtype(M.dtype))
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    except torch.linalg.LinAlgError:
        return orthogonalize_eigh(M, rtol=rtol)
    tol = rank_tolerance(S[..., :1], M.shape[-2:], rtol)
    keep = (S > tol).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def orthogonalize_eigh(M: torch.Tensor, rtol: float | None = None,
                       gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact (M Mᵀ)^+1/2 M through the eigendecomposition of the smaller Gram matrix.

    In fp64 the Gram matrix resolves singular values far below the rank
    tolerance, so the result matches the SVD route. In fp32 the Gram's own
    rounding floor (λ_max · k · ε_float32) is also treated as zero: fp32 cannot
    tell smaller eigenvalues from noise.
    """
    out_dtype = compute_dtype(M.dtype)
    wide = M.shape[-2] <= M.shape[-1]
    X = M.to(gram_dtype)
    gram = X @ X.mT if wide else X.mT @ X
    eigvals, eigvecs = torch.linalg.eigh(gram)
    eigvals = eigvals.clamp_min(0)
    sigma = eigvals.sqrt()
    sigma_max = sigma[..., -1:]  # eigh sorts ascending
    tol = rank_tolerance(sigma_max, M.shape[-2:], rtol)
    keep = sigma > tol
    if gram_dtype != torch.float64:
        noise_floor = eigvals[..., -1:] * gram.shape[-1] * torch.finfo(gram_dtype).eps
        keep &= eigvals > noise_floor
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(gram_dtype).tiny), 0.0)
    inv_sqrt = (eigvecs * inv_sigma.unsqueeze(-2)) @ eigvecs.mT
    O = inv_sqrt @ X if wide else X @ inv_sqrt
    return O.to(out_dtype)


def orthogonalize_newton_schulz(M: torch.Tensor, rtol: float | None = None, steps: int = 5) -> torch.Tensor:
    """Muon's approximate orthogonalization: singular values land near, not at, 1. No rank cut (``rtol`` unused)."""
    a, b, c = MUON_NS_COEFFICIENTS
    X = M.to(compute_dtype(M.dtype))
    wide = X.shape[-2] <= X.shape[-1]
    if not wide:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


ORTHOGONALIZERS = {
    "svd": orthogonalize_svd,
    "eigh": orthogonalize_eigh,
    "newton_schulz": orthogonalize_newton_schulz,
}


def orthogonality_error(O: torch.Tensor) -> torch.Tensor:
    """‖O Oᵀ O − O‖_F / ‖O‖_F per matrix: zero exactly when O is a partial isometry.

    This is the rank-agnostic form of ‖O Oᵀ − I‖: dropped (zero) directions do
    not count as error, but every kept singular value must be exactly 1.
    """
    residual = O @ O.mT @ O - O
    norm = torch.linalg.matrix_norm(O)
    return torch.linalg.matrix_norm(residual) / norm.clamp_min(torch.finfo(O.dtype).tiny)


def orthogonalize(M: torch.Tensor, method: str = "svd", *, rtol: float | None = None, return_error: bool = False):
    """U Vᵀ of each matrix in ``M`` (shape (..., r, n)), by the named method.

    ``method`` is one of ``ORTHOGONALIZERS``: "svd" and "eigh" are exact, and
    drop singular values at or below σ_max·``rtol`` (default max(r, n)·ε_float32);
    "newton_schulz" is Muon's 5-step approximation. With ``return_error`` the
    result is ``(O, orthogonality_error(O))``.
    """
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"orthogonalizer={method!r} is not one of {sorted(ORTHOGONALIZERS)}")
    O = ORTHOGONALIZERS[method](M, rtol)
    return (O, orthogonality_error(O)) if return_error else O
