"""Exact U Vᵀ from batched fp64 GEMMs and Cholesky factorizations, with no host sync.

For a wide matrix X (r ≤ n) the polar factor is U Vᵀ = Q X with Q = (X Xᵀ)^-1/2,
a function of the small r × r Gram A = X Xᵀ, so all the work is r × r:

1. Gram A = X Xᵀ in fp64: fp32 and bf16 inputs are exact in fp64, and fp64
   resolves the squared condition number that fp32 cannot.
2. Bound λ̂ = ‖A⁸‖_F^1/8 ≥ λ_max(A), at most r^1/16·λ_max; after A ← A/λ̂ the
   singular values x of X/√λ̂ lie in [0, 1].
3. Schedule: QDWH weights fixed on the host from ℓ₀ = rtol / r^1/32, a lower
   bound for every kept x that needs no device value (√λ̂ ≤ r^1/32·σ_max).
4. QDWH (dynamically weighted Halley; Nakatsukasa, Bai and Gygi, 2010) on the
   Gram side, one Cholesky per step: Z = (aI + bR)(I + cR)⁻¹, Q ← Z Q, R ← Z R Z.
   Four steps take every x ≥ ℓ₀ to within 1e-9 of 1 for ℓ₀ from 3e-7 to 1e-3.
5. Purify: McWeeny steps P ← 3P² − 2P³ from P = R (eigenvalues f(x)²) send each
   eigenvalue to 0 or 1, and Q ← P Q drops the directions below the cut.
6. Apply O = Q X / √λ̂, and certify it from r × r quantities.

The rank cut is soft and sits low: well below ℓ₀, f(x) ≈ (8 to 15)·x/ℓ₀, so a
singular value comes out 0.5 near σ ≈ τ/10 (τ/15 to τ/19 at 2048 × 5461) and 1 from
σ ≈ τ/2 up. Directions between ~τ/20 and τ therefore survive, wholly or partly,
where the eigh route drops them; spectra with no σ in [τ/100, τ] match it. An
``rtol`` with ℓ₀² < 1e3·ε₆₄ (rtol = 0, tiny matrices) would put that cut under
the fp64 Gram's rounding noise, so it goes to the eigh route instead.
"""

from __future__ import annotations

import math

import torch

from slimopt.transforms.numerics import apply_left, compute_dtype, default_rtol, gram

POLAR_TOLERANCE = 1e-4
EPS_FLOAT64 = torch.finfo(torch.float64).eps
TINY_FLOAT64 = torch.finfo(torch.float64).tiny
# The smallest ℓ₀² the polar route takes: its cut (~ℓ₀/10) stays above the fp64 Gram's noise (~√ε₆₄).
RESOLVABLE = 1e3 * EPS_FLOAT64
# Iterate until 1 − ℓ_K ≤ margin·tol. A tighter target adds a Halley step (a = 3) that gains nothing
# visible in fp32 but triples f'(0), moving the soft cut a further 3× below τ.
SCHEDULE_MARGIN = 1e-5
PURIFY_STEPS = 3


def qdwh_weights(l: float) -> tuple[float, float, float]:
    """The optimal (a, b, c) for singular values in [l, 1]; they tend to Halley's (3, 1, 3) as l → 1."""
    gamma = (4 * (1 - l) * (1 + l) / l**4) ** (1 / 3)  # (1 − l)(1 + l): no cancellation near l = 1
    root = math.sqrt(1 + gamma)
    a = root + 0.5 * math.sqrt(8 - 4 * gamma + 8 * (2 - l * l) / (l * l * root))
    b = (a - 1) ** 2 / 4
    return a, b, a + b - 1


def polar_schedule(shape: tuple[int, ...], rtol: float | None = None,
                   tol: float = POLAR_TOLERANCE) -> list[tuple[float, float, float]] | None:
    """QDWH weights (a, b, c) that take every kept singular value to within margin·tol of 1.

    None when ℓ₀ is too small for the fp64 Gram (see ``RESOLVABLE``) or rtol ≥ 1: the caller then uses eigh.
    """
    r, n = shape[-2:]
    l = (default_rtol((r, n)) if rtol is None else rtol) / min(r, n) ** (1 / 32)
    if not RESOLVABLE <= l * l or l >= 1:
        return None
    schedule = []
    while 1 - l > SCHEDULE_MARGIN * tol:
        a, b, c = qdwh_weights(l)
        schedule.append((a, b, c))
        l = min(1.0, l * (a + b * l * l) / (1 + c * l * l))
    return schedule


def eigenvalue_bound(A: torch.Tensor) -> torch.Tensor:
    """‖A⁸‖_F^1/8 ≥ λ_max of each symmetric PSD A, within r^1/16; renormalized at each squaring: no overflow."""
    scale = torch.linalg.matrix_norm(A, keepdim=True)
    bound = scale
    B = A / scale.clamp_min(TINY_FLOAT64)
    for power in (2, 4, 8):
        B = B @ B
        scale = torch.linalg.matrix_norm(B, keepdim=True)  # ≥ 1/r: no underflow either
        B = B / scale.clamp_min(TINY_FLOAT64)
        bound = bound * scale ** (1 / power)
    return bound


def plus_identity(A: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """scale·A + shift·I in one pass over A."""
    out = scale * A
    out.diagonal(dim1=-2, dim2=-1).add_(shift)
    return out


def polar(M: torch.Tensor, rtol: float | None = None, tol: float = POLAR_TOLERANCE,
          out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U Vᵀ of each matrix of M (..., r, n) and its per-matrix error certificate; no host sync.

    Singular values at or below σ_max·``rtol`` (default max(r, n)·ε_float32) are
    dropped, softly (module docstring). The certificate estimates the orthogonality
    error ‖O Oᵀ O − O‖_F / ‖O‖_F of the fp64 result (before the cast to fp32): the
    iteration's part exactly, from R = O Oᵀ = Q A Qᵀ/λ̂, plus an estimate of what the
    Gram's own rounding adds, which R cannot see. It flags a kept singular value
    off 1 and a dropped one half-kept; it cannot see the kept subspace itself turned
    by the Gram's rounding (~ε₆₄/x² for a kept x, the same for the eigh route).
    NaN input gives a NaN certificate, so accept with ``error <= tol``. ``out`` (M's
    shape, fp32 or fp64) receives O, and may be M itself. Raises ValueError
    where :func:`polar_schedule` returns None (``orthogonalize(M, "polar")`` uses eigh there).
    """
    schedule = polar_schedule(M.shape, rtol, tol)
    if schedule is None:
        raise ValueError(f"rtol={rtol!r} is below what the fp64 Gram resolves for shape {tuple(M.shape[-2:])}: "
                         "use the eigh route")
    wide = M.shape[-2] <= M.shape[-1]
    X = M if wide else M.mT  # cast to fp64 a column block at a time: no full fp64 copy
    r, n = X.shape[-2:]
    A = gram(X)
    scale = eigenvalue_bound(A).clamp_min(TINY_FLOAT64)  # zero matrix: A = 0 stays 0, so O = 0
    A = A / scale  # eigenvalues x² in [0, 1]
    I = torch.eye(r, dtype=A.dtype, device=A.device)

    R, Q = A, None
    for a, b, c in schedule:
        # I + cR ≥ I is positive definite, so the factorization cannot fail and info is never needed.
        L, _ = torch.linalg.cholesky_ex(plus_identity(R, c, 1))
        L_inv = torch.linalg.solve_triangular(L, I.expand_as(L), upper=False)
        W = L_inv.mT @ L_inv  # (I + cR)⁻¹
        beta, alpha = b / c, a - b / c
        Z = plus_identity(W, alpha, beta)  # (aI + bR)(I + cR)⁻¹ = βI + αW
        Q = Z if Q is None else Z @ Q
        # R ← Z R Z = β²R + (I − W)(2αβ/c·I + α²/c·W), from W R = (I − W)/c. Every factor is O(1):
        # products with Z itself (norm up to a ≈ 1e4) leave a²·ε errors that turn near-null directions into kept ones.
        R = beta**2 * R + plus_identity(W, -1, 1) @ plus_identity(W, alpha**2 / c, 2 * alpha * beta / c)

    P = R  # eigenvalues f(x)²: near 1 above ℓ₀, near (10·x/ℓ₀)² well below it
    for _ in range(PURIFY_STEPS):
        P = (P @ P) @ plus_identity(P, -2, 3)
    Q = P @ Q
    W = Q / scale.sqrt()
    out_dtype = compute_dtype(M.dtype)
    O = apply_left(W, X, out_dtype, None if out is None else out if wide else out.mT)

    # R = O Oᵀ on the fp64 Gram, and tr(R (R − I)²) = ‖O Oᵀ O − O‖_F² without forming O Oᵀ O.
    R = Q @ A @ Q.mT
    D = plus_identity(R, 1, -1)
    trace = R.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(TINY_FLOAT64)
    iteration_error = ((D @ R) * D).sum((-2, -1)).clamp_min(0) / trace
    # The Gram's rounding, ~ε₆₄·√n·‖A‖_F/r per entry, reaches O Oᵀ through Q (‖Q‖_F² ≈ tr A⁺ on the kept
    # part). First order, not a bound: 4–17× above the measured Gram error on geometric and two-cluster spectra.
    gram_error = EPS_FLOAT64 * n**0.5 / r * torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(Q).square()
    error = (iteration_error + (gram_error.square() / trace)).sqrt()
    return O if wide else O.mT, error.to(out_dtype)

