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

import warnings
from collections import Counter

import torch

from slimopt.transforms.hardware import fast_fp64, low_precision
from slimopt.transforms.numerics import apply_left, compute_dtype, gram, rank_tolerance
from slimopt.transforms.polar import POLAR_TOLERANCE, polar, polar_schedule
from slimopt.transforms.polar_express import FLOOR, MIN_FLOOR, polar_express

# Muon's quintic Newton–Schulz coefficients (Jordan et al., 2024).
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


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


def orthogonalize_eigh(M: torch.Tensor, rtol: float | None = None, gram_dtype: torch.dtype = torch.float64,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (M Mᵀ)^+1/2 M through the eigendecomposition of the smaller Gram matrix.

    In fp64 the Gram matrix resolves singular values far below the rank
    tolerance, so the result matches the SVD route. In fp32 the Gram's own
    rounding floor (λ_max · k · ε_float32) is also treated as zero: fp32 cannot
    tell smaller eigenvalues from noise. ``out`` may be M itself (a scratch copy).
    """
    wide = M.shape[-2] <= M.shape[-1]
    X = M if wide else M.mT  # cast a column block at a time: no full copy in gram_dtype
    A = gram(X, gram_dtype)
    eigvals, eigvecs = torch.linalg.eigh(A)
    eigvals = eigvals.clamp_min(0)
    sigma = eigvals.sqrt()
    sigma_max = sigma[..., -1:]  # eigh sorts ascending
    tol = rank_tolerance(sigma_max, M.shape[-2:], rtol)
    keep = sigma > tol
    if gram_dtype != torch.float64:
        noise_floor = eigvals[..., -1:] * A.shape[-1] * torch.finfo(gram_dtype).eps
        keep &= eigvals > noise_floor
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(gram_dtype).tiny), 0.0)
    inv_sqrt = (eigvecs * inv_sigma.unsqueeze(-2)) @ eigvecs.mT
    O = apply_left(inv_sqrt, X, compute_dtype(M.dtype), None if out is None else out if wide else out.mT)
    return O if wide else O.mT


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


# Matrices the polar route handed to eigh because their certificate missed POLAR_TOLERANCE, by device type. On
# CUDA the check would cost a host read per call, so misses are only counted there (on the device, read by
# polar_fallbacks()) and the polar result is kept.
_fallbacks: Counter = Counter()
_device_misses: dict[torch.device, torch.Tensor] = {}


def orthogonalize_polar(M: torch.Tensor, rtol: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """U Vᵀ by QDWH on the fp64 Gram (:func:`slimopt.transforms.polar.polar`): batched GEMMs and Choleskys, no
    host sync. Where its certificate misses POLAR_TOLERANCE the matrix is redone by the eigh route (on the
    CPU; counted on CUDA), and an ``rtol`` too small for the fp64 Gram to resolve goes to eigh outright."""
    if polar_schedule(M.shape, rtol) is None:
        return orthogonalize_eigh(M, rtol)
    O, error = polar(M, rtol)
    missed = ~(error <= POLAR_TOLERANCE)  # NaN misses too
    if M.device.type != "cpu":
        count = missed.sum()
        _device_misses[M.device] = _device_misses[M.device] + count if M.device in _device_misses else count
    elif missed.any():
        O[missed] = orthogonalize_eigh(M[missed], rtol)
        _fallbacks["cpu"] += int(missed.sum())
    return O


def polar_fallbacks() -> int:
    """How many matrices the polar route could not certify so far (reads the device counters: a sync)."""
    return _fallbacks["cpu"] + sum(int(count) for count in _device_misses.values())


def orthogonalize_polar_express(M: torch.Tensor, rtol: float | None = None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """U Vᵀ by quintic iterations on M itself (:func:`slimopt.transforms.polar_express.polar_express`): no fp64,
    no factorization, no host sync; the early steps in the device's fast low precision, the last in fp32.
    Singular values at or above σ_max·``rtol`` (default FLOOR = 1e-3, at least MIN_FLOOR = 1e-6) come out within
    1e-2 of 1."""
    floor = FLOOR if rtol is None else max(rtol, MIN_FLOOR)
    O = polar_express(M, floor=floor, low_precision=low_precision(M.device))
    return O if out is None else out.copy_(O)


ORTHOGONALIZERS = {
    "svd": orthogonalize_svd,
    "eigh": orthogonalize_eigh,
    "polar": orthogonalize_polar,
    "polar_express": orthogonalize_polar_express,
    "newton_schulz": orthogonalize_newton_schulz,
}
# The routes that do their heavy work in fp64.
FP64_ROUTES = ("svd", "eigh", "polar")
# What an optimizer's ``orthogonalizer`` may name.
METHODS = ("auto", *ORTHOGONALIZERS)


def orthogonality_error(O: torch.Tensor) -> torch.Tensor:
    """‖O Oᵀ O − O‖_F / ‖O‖_F per matrix: zero exactly when O is a partial isometry.

    This is the rank-agnostic form of ‖O Oᵀ − I‖: dropped (zero) directions do
    not count as error, but every kept singular value must be exactly 1.
    """
    residual = O @ O.mT @ O - O
    norm = torch.linalg.matrix_norm(O)
    return torch.linalg.matrix_norm(residual) / norm.clamp_min(torch.finfo(O.dtype).tiny)


class SlowFloat64Warning(UserWarning):
    """An fp64 route was asked for on a GPU that runs fp64 at a small fraction of its fp32 rate."""


# On a CPU, polar_express beats LAPACK's eigh from this smaller side up (measured with 2 threads: 0.41-0.74× eigh's
# time at 256 to 512, while a SUMO step at rank 128 ran 1.2× slower with it; docs/speed.md).
CPU_EXPRESS_FROM = 256


def exact_method(method: str, device: torch.device, shape: tuple[int, ...] | None = None) -> str:
    """The route "auto" means on ``device`` for matrices of ``shape``: "polar_express" (no fp64) on every GPU,
    and on a CPU with fast bf16 GEMMs for matrices whose smaller side is at least CPU_EXPRESS_FROM; "eigh"
    otherwise on a CPU, where LAPACK's fp64 eigh is the faster. Named routes are kept, with a warning for an
    fp64 route on a GPU whose fp64 is slow (:func:`slimopt.transforms.hardware.fast_fp64`). docs/speed.md
    gives the measurements behind this."""
    device = torch.device(device)
    if method == "auto":
        if device.type == "cuda":
            return "polar_express"
        large = shape is None or min(shape[-2:]) >= CPU_EXPRESS_FROM
        return "polar_express" if large and low_precision(device) != torch.float32 else "eigh"
    if method in FP64_ROUTES and device.type == "cuda" and not fast_fp64(device):
        warnings.warn(f"the {method!r} route runs in fp64, which {torch.cuda.get_device_name(device)} runs at "
                      "1/32-1/64 of its fp32 rate: 'auto' or 'polar_express' is many times faster here",
                      SlowFloat64Warning, stacklevel=3)
    return method


def orthogonalize(M: torch.Tensor, method: str = "auto", *, rtol: float | None = None, return_error: bool = False):
    """U Vᵀ of each matrix in ``M`` (shape (..., r, n)), by the named method.

    ``method`` is "auto" (see :func:`exact_method`) or one of ``ORTHOGONALIZERS``: "svd" and "eigh" are exact, and
    drop singular values at or below σ_max·``rtol`` (default max(r, n)·ε_float32);
    "polar" is exact to ``POLAR_TOLERANCE`` from GEMMs and Choleskys, its cut soft
    (directions down to about τ/10 may be kept); "polar_express" takes every singular value at or above
    σ_max·``rtol`` (default 1e-3) to within 1e-2 of 1 without fp64, and damps the smaller ones;
    "newton_schulz" is Muon's 5-step approximation. With ``return_error`` the
    result is ``(O, orthogonality_error(O))``.
    """
    if method not in METHODS:
        raise ValueError(f"orthogonalizer={method!r} is not one of {sorted(METHODS)}")
    O = ORTHOGONALIZERS[exact_method(method, M.device, M.shape)](M, rtol)
    return (O, orthogonality_error(O)) if return_error else O
