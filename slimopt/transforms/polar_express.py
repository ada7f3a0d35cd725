"""U Vᵀ without fp64 or factorizations: odd quintic iterations on the matrix itself.

Each step maps every singular value x of X by the same odd polynomial,
X ← a·X + (b·A + c·A²)·X with A = X Xᵀ, so only GEMMs are needed and a whole
stack of same-shape matrices goes in one call. The polynomials are chosen as
Polar Express does (Amsel, Persson, Musco and Gower, arXiv 2505.16932): step t
takes the odd quintic closest to 1 in the max norm on the interval [ℓ_t, u_t]
that the singular values are known to lie in, found here by a Remez exchange on
the host, and the next interval is that polynomial's image. Nothing depends on
a device value, so the schedule is fixed before the first GEMM: no host sync.

Precision. The GEMMs run in bf16 for all but the last ``finish`` steps, which run
in fp32: bf16 carries the large early steps at twice fp32's rate on a CPU with
AVX-512 BF16 and many times it on a GPU's tensor cores, and the fp32 steps bring
every kept singular value back to within fp32 reach of 1. The bf16 steps round
X itself (2⁻⁹ relative), so the result is the polar factor of a matrix within
~2⁻⁹ of M: its subspaces differ from the exact U Vᵀ by about that (relative
Frobenius error ~1e-3 to 1e-2, growing with κ), which no later fp32 step can undo.
That is Muon's trade; the optimizers' quality, measured in ``slimopt bench``, is
what decides whether it is good enough (docs/exact.md).

Small singular values. The schedule starts from ℓ₀ = ``floor`` / r^(1/8): every
singular value at or above σ_max·``floor`` comes out within ``tol`` of 1. Below
that, the map rolls off smoothly: a direction at σ ≪ floor·σ_max comes out at about
σ·∏ a_t / σ̂ (the product of the steps' slopes at 0), so directions well below
the floor are damped, not dropped, and exact zeros (a row-standardized square
gradient's null vector) stay at the rounding noise the steps amplify. The exact
routes' hard cut at σ_max·rtol has no polynomial equivalent.
"""

from __future__ import annotations

import functools
import math

import torch

from slimopt.transforms.numerics import compute_dtype

# Singular values at or above FLOOR·σ_max are brought to within TOLERANCE of 1.
FLOOR = 1e-3
TOLERANCE = 1e-2
# The lowest floor a caller's rank_rtol can set (rank_rtol = 0, "keep everything", means this): 12 steps at r = 512.
MIN_FLOOR = 1e-6
# Steps whose GEMMs run in fp32 at the end of the schedule; the others run in bf16.
FINISH_STEPS = 1
# The interval a step is designed for reaches SAFETY above the last one's image, so rounding that lifts a
# singular value a little past it cannot make the quintic (which grows as c·x⁵ beyond it) blow it up.
SAFETY = 1.01
# Below CUSHION·u a step is designed for [CUSHION·u, u]: the true minimax quintic on a very wide interval has
# huge, cancelling coefficients (Polar Express's "cushion"); the smaller values still grow by the slope at 0.
CUSHION = 0.025
MAX_STEPS = 24
# Slack on the σ_max bound when it is computed in bf16 (its A² is good to a few 2⁻⁸).
LOW_MARGIN = 1.05


def _odd_quintic(a: float, b: float, c: float, x: float) -> float:
    return x * (a + x * x * (b + c * x * x))


def _critical_points(a: float, b: float, c: float, low: float, high: float) -> list[float]:
    """Where p'(x) = a + 3b·x² + 5c·x⁴ vanishes inside (low, high)."""
    if c == 0:
        roots = [-a / (3 * b)] if b else []
    else:
        disc = 9 * b * b - 20 * a * c
        if disc < 0:
            return []
        s = math.sqrt(disc)
        roots = [(-3 * b - s) / (10 * c), (-3 * b + s) / (10 * c)]
    return sorted(math.sqrt(y) for y in roots if y > 0 and low < math.sqrt(y) < high)


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """x with rows·x = rhs, by Gaussian elimination with partial pivoting, in Python floats: the schedule is
    host arithmetic, never device tensors (so it also runs under fake-tensor and compile tracing)."""
    n = len(rhs)
    augmented = [[*row, value] for row, value in zip(rows, rhs)]
    for k in range(n):
        pivot = max(range(k, n), key=lambda i: abs(augmented[i][k]))
        augmented[k], augmented[pivot] = augmented[pivot], augmented[k]
        for i in range(k + 1, n):
            factor = augmented[i][k] / augmented[k][k]
            augmented[i] = [u - factor * v for u, v in zip(augmented[i], augmented[k])]
    x = [0.0] * n
    for k in reversed(range(n)):
        x[k] = (augmented[k][n] - sum(augmented[k][j] * x[j] for j in range(k + 1, n))) / augmented[k][k]
    return x


def minimax_quintic(low: float, high: float, iterations: int = 60) -> tuple[float, float, float]:
    """The odd quintic p(x) = a·x + b·x³ + c·x⁵ that minimizes max |1 − p(x)| over [low, high].

    Remez exchange: the optimum's error equioscillates at low, two interior extrema and high
    (1 − p = E, −E, E, −E), so solve for (a, b, c, E) on four nodes, move the inner nodes to the
    error's extrema, and repeat.
    """
    nodes = [low, low + (high - low) * 0.25, low + (high - low) * 0.75, high]
    coefficients = (1.0, 0.0, 0.0)
    for _ in range(iterations):
        a, b, c, _ = _solve([[x, x**3, x**5, (-1) ** i] for i, x in enumerate(nodes)], [1.0] * 4)
        coefficients = (a, b, c)
        inner = _critical_points(a, b, c, low, high)
        if len(inner) != 2:
            break
        if max(abs(u - v) for u, v in zip(inner, nodes[1:3])) <= 1e-15 * high:
            break
        nodes = [low, *inner, high]
    return coefficients


def image(coefficients: tuple[float, float, float], low: float, high: float) -> tuple[float, float]:
    """The smallest and largest value of the quintic over [low, high]."""
    points = [low, high, *_critical_points(*coefficients, low, high)]
    values = [_odd_quintic(*coefficients, x) for x in points]
    return min(values), max(values)


@functools.lru_cache(maxsize=64)
def express_schedule(low: float, tol: float = TOLERANCE) -> tuple[tuple[float, float, float], ...]:
    """Quintic coefficients that take every singular value in [low, 1] to within ``tol`` of 1."""
    if not 0 < low < 1:
        raise ValueError(f"the schedule's lower bound must lie in (0, 1), got {low!r}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    lo, hi = low, 1.0
    schedule = []
    while lo < 1 - tol or hi > 1 + tol:
        if len(schedule) == MAX_STEPS:
            raise ValueError(f"no schedule reaches tol={tol!r} from low={low!r} in {MAX_STEPS} steps")
        design_high = hi * SAFETY
        coefficients = minimax_quintic(max(lo, CUSHION * design_high), design_high)
        schedule.append(coefficients)
        lo, hi = image(coefficients, lo, design_high)
    return tuple(schedule)


def slope_at_zero(schedule) -> float:
    """∏ a_t: how much the whole schedule multiplies a singular value far below its floor."""
    return math.prod(a for a, _, _ in schedule)


def _gemm(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor | None = None, beta: float = 0.0,
          alpha: float = 1.0) -> torch.Tensor:
    """alpha·A B (+ beta·C) over a stack (B, r, k), each in one fused call.

    On the CPU, oneDNN's 2-D bf16 GEMM runs about twice as fast as its batched one (396 against
    208 GFLOP/s at 512 × 1376 on a 2-core EPYC), so bf16 stacks go matrix by matrix there.
    """
    if A.device.type == "cpu" and A.dtype == torch.bfloat16:
        out = torch.empty(A.shape[0], A.shape[1], B.shape[-1], dtype=A.dtype)
        for i in range(A.shape[0]):
            if C is None:
                torch.mm(A[i], B[i], out=out[i])
            else:
                torch.addmm(C[i], A[i], B[i], beta=beta, alpha=alpha, out=out[i])
        return out
    return torch.bmm(A, B) if C is None else torch.baddbmm(C, A, B, beta=beta, alpha=alpha)


def _step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """X ← a·X + (b·A + c·A²)·X with A = X Xᵀ."""
    A = _gemm(X, X.mT)
    return _gemm(_gemm(A, A, A, beta=b, alpha=c), X, X, beta=a)


def polar_express(M: torch.Tensor, floor: float = FLOOR, tol: float = TOLERANCE, finish: int = FINISH_STEPS,
                  low_precision: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """U Vᵀ of each matrix of M (..., r, n), every singular value ≥ σ_max·``floor`` within ``tol`` of 1.

    Batched GEMMs only, no host sync. The last ``finish`` steps run in fp32 (fp64 for fp64 input), the
    others in ``low_precision`` (pass torch.float32 for an all-fp32 run). See the module docstring for
    what it reaches on small and zero singular values.
    """
    out_dtype = compute_dtype(M.dtype)
    wide = M.shape[-2] <= M.shape[-1]
    X = M if wide else M.mT
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:]).to(out_dtype)
    r = X.shape[-2]
    schedule = express_schedule(floor / r ** (1 / 8), tol)
    split = max(0, len(schedule) - finish)
    # Scale so that σ_max ≤ 1: first by ‖X‖_F (no overflow or underflow in A²), then by ‖A²‖_F^(1/4) ≥ σ_max,
    # within r^(1/4) of it, so σ_max/σ̂ ≥ r^(-1/8) and the schedule can start from ℓ₀ = floor·r^(-1/8). The
    # bound comes from the first step's own A and A², in that step's precision; LOW_MARGIN covers their rounding.
    tiny = torch.finfo(out_dtype).tiny
    X = X / X.abs().amax((-2, -1), keepdim=True).clamp_min(tiny)  # first by the largest entry: no overflow in ‖X‖_F
    # ‖X‖_F = 2^k ≈ r^(1/4), so σ_max⁴, the scale of A², lies in [1/(4r), 4r]: inside fp16's normal range
    # (6e-5 to 65504) for r up to 4096, where ‖X‖_F = 1 would make A² fp16 subnormals. A power of two changes no
    # rounding: bf16 and fp32 results are those of ‖X‖_F = 1.
    X = X / (torch.linalg.matrix_norm(X, keepdim=True).clamp_min(tiny) / 2.0 ** round(math.log2(r) / 4))
    X = X.to(low_precision if split else out_dtype)
    A = _gemm(X, X.mT)
    A2 = _gemm(A, A)
    margin = LOW_MARGIN if split else 1.0
    lam = (torch.linalg.matrix_norm(A2.float(), keepdim=True).sqrt() * margin).clamp_min(tiny).to(X.dtype)
    X, A, A2 = X / lam.sqrt(), A / lam, A2 / lam / lam  # a zero matrix: 0/tiny = 0 at every step
    for t, (a, b, c) in enumerate(schedule):
        if t == split:
            X = X.to(out_dtype)
        if t == 0:
            X = _gemm(torch.add(b * A, A2, alpha=c), X, X, beta=a)
        else:
            X = _step(X, a, b, c)
    X = X.to(out_dtype).reshape(*batch, *X.shape[-2:])
    return X if wide else X.mT
