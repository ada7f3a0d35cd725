"""The QDWH polar route against an fp64 SVD of the same (cast) input."""

import importlib
import math
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimopt.transforms.polar as polar_module
from slimopt.transforms.numerics import default_rtol
from slimopt.transforms.orthogonalize import (
    orthogonality_error,
    orthogonalize,
    orthogonalize_eigh,
    polar_fallbacks,
)
from slimopt.transforms.polar import POLAR_TOLERANCE, polar, polar_schedule

# The package exports a function of the same name, so the module is looked up by its path.
orthogonalize_module = importlib.import_module("slimopt.transforms.orthogonalize")

SHAPES = [(3, 32, 96), (2, 96, 32), (2, 48, 48), (40, 120)]


def haar(batch, m, k, generator):
    """m × k with orthonormal columns, Haar-distributed: QR of a Gaussian with R's diagonal made positive."""
    Q, R = torch.linalg.qr(torch.randn(*batch, m, k, generator=generator, dtype=torch.float64))
    return Q * R.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)


def with_spectrum(shape, s, dtype=torch.float32, seed=0):
    """U·diag(s)·Vᵀ built in fp64 with Haar U, V, then cast to dtype."""
    *batch, r, n = shape
    g = torch.Generator().manual_seed(seed)
    k = min(r, n)
    return ((haar(batch, r, k, g) * s) @ haar(batch, n, k, g).mT).to(dtype)


def geometric(k, top, bottom):
    return torch.logspace(math.log10(top), math.log10(bottom), k, dtype=torch.float64)


def reference(M, rtol=None):
    """fp64 SVD of M with the matrix_rank rule: the kept singular vectors and U_k V_kᵀ."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    tau = S[..., :1] * (default_rtol(M.shape[-2:]) if rtol is None else rtol)
    keep = (S > tau).double().unsqueeze(-2)
    U_k, V_k = U * keep, Vh.mT * keep
    return U_k, V_k, U_k @ V_k.mT


def errors(O, M, rtol=None):
    """‖U_kᵀ O V_k − I_k‖₂ on the kept block, leakage ‖O − U_kU_kᵀ O V_kV_kᵀ‖₂, relative Frobenius error."""
    U_k, V_k, O_ref = reference(M, rtol)
    O = O.double()
    block = U_k.mT @ O @ V_k
    kept_identity = U_k.mT @ U_k  # I on the kept block, 0 elsewhere
    kept = torch.linalg.matrix_norm(block - kept_identity, ord=2)
    leak = torch.linalg.matrix_norm(O - U_k @ block @ V_k.mT, ord=2)
    rel = torch.linalg.matrix_norm(O - O_ref) / torch.linalg.matrix_norm(O_ref)
    return float(kept.max()), float(leak.max()), float(rel.max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kappa", [10, 1e2, 1e3, 1e4])
def test_matches_svd_with_every_singular_value_kept(shape, kappa):
    M = with_spectrum(shape, geometric(min(shape[-2:]), 1, 1 / kappa))
    O, error = polar(M)
    kept, _, rel = errors(O, M)
    assert O.dtype == torch.float32 and O.shape == M.shape and error.shape == M.shape[:-2]
    assert kept <= 1e-4 and rel <= 1e-4
    assert float(error.max()) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_condition_1e6_with_a_resolvable_rtol_stays_on_the_polar_route(shape):
    M = with_spectrum(shape, geometric(min(shape[-2:]), 1, 1e-6))
    assert polar_schedule(M.shape, 6e-7) is not None
    O, error = polar(M, rtol=6e-7)
    kept, _, rel = errors(O, M, rtol=6e-7)
    assert kept <= 1e-4 and rel <= 1e-4
    assert float(error.max()) <= POLAR_TOLERANCE  # the fp64 Gram's own rounding (ε₆₄·κ²) shows here


def test_unresolvable_rtol_goes_to_eigh(monkeypatch):
    M = with_spectrum((2, 32, 96), geometric(32, 1, 1e-6))
    for rtol in (1e-7, 0.0):
        assert polar_schedule(M.shape, rtol) is None
        with pytest.raises(ValueError, match=f"rtol={rtol}"):
            polar(M, rtol=rtol)
    calls = []

    def eigh(M, rtol):
        calls.append(rtol)
        return orthogonalize_eigh(M, rtol)

    monkeypatch.setattr(orthogonalize_module, "orthogonalize_eigh", eigh)
    O = orthogonalize(M, "polar", rtol=1e-7)
    assert calls == [1e-7]
    kept, _, rel = errors(O, M, rtol=1e-7)
    assert kept <= 1e-4 and rel <= 1e-4


def test_a_missed_certificate_falls_back_to_eigh_and_is_counted(monkeypatch):
    M = with_spectrum((3, 32, 96), geometric(32, 1, 1e-4))
    full = polar_schedule(M.shape, None)
    real_polar = polar_module.polar

    def too_short_for_the_middle_matrix(M, rtol=None, tol=POLAR_TOLERANCE):
        O, error = real_polar(M, rtol, tol)
        with monkeypatch.context() as patch:
            patch.setattr(polar_module, "polar_schedule", lambda shape, rtol, tol: full[:2])
            O_short, error_short = real_polar(M, rtol, tol)
        O[1], error[1] = O_short[1], error_short[1]
        return O, error

    monkeypatch.setattr(orthogonalize_module, "polar", too_short_for_the_middle_matrix)
    before = polar_fallbacks()
    O = orthogonalize(M, "polar")
    assert polar_fallbacks() == before + 1
    torch.testing.assert_close(O[1], orthogonalize_eigh(M[1]))  # redone by the eigh route
    kept, _, rel = errors(O, M)
    assert kept <= 1e-4 and rel <= 1e-4


def test_schedule_is_short_and_ends_in_halley_steps():
    for shape in [(32, 96), (48, 48), (128, 512), (512, 1376), (2048, 5461)]:
        schedule = polar_schedule(shape, None)
        assert len(schedule) == 4
        a, b, c = schedule[-1]
        assert abs(a - 3) < 0.01 and abs(b - 1) < 0.01 and abs(c - 3) < 0.01  # Halley's (3, 1, 3) as ℓ → 1
    assert polar_schedule((48, 48), None, tol=1e-10) != polar_schedule((48, 48), None)


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_rank_deficiency_is_dropped(shape):
    k = min(shape[-2:])
    s = torch.cat([geometric(k // 2, 1, 1e-2), torch.zeros(k - k // 2, dtype=torch.float64)])
    M = with_spectrum(shape, s)
    O, error = polar(M)
    kept, leak, rel = errors(O, M)
    assert torch.linalg.matrix_rank(reference(M)[2]).eq(k // 2).all()
    assert kept <= 1e-4 and leak <= 1e-3 and rel <= 1e-4
    assert float(error.max()) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_small_singular_values_below_a_gap_go_to_zero(shape):
    """No σ in [τ/100, 10τ]: the ones below τ/100 must vanish, the ones above 10τ come out exactly 1."""
    k = min(shape[-2:])
    tau = default_rtol(shape[-2:])
    s = torch.cat([geometric(k // 2, 1, 10 * tau), geometric(k - k // 2, tau / 100, tau / 1e4)])
    M = with_spectrum(shape, s)
    O, error = polar(M)
    kept, leak, rel = errors(O, M)
    assert kept <= 1e-4 and leak <= 1e-3 and rel <= 1e-4
    assert float(error.max()) <= 1e-6


def test_the_cut_is_soft_and_below_tau():
    """Documented behaviour, unlike eigh: a direction at τ/2 is kept whole, one at τ/10 comes out in between."""
    shape = (2, 32, 96)
    tau = default_rtol(shape[-2:])
    for sigma, low, high in [(tau / 2, 0.999, 1.0), (tau / 10, 0.01, 0.99)]:
        s = torch.cat([geometric(31, 1, 1e-2), torch.tensor([sigma], dtype=torch.float64)])
        O, error = polar(with_spectrum(shape, s, dtype=torch.float64))
        assert low <= float(torch.linalg.svdvals(O)[..., 31].min()) <= high
        if high < 1:
            assert float(error.min()) > POLAR_TOLERANCE  # a half-kept direction fails the certificate


def row_standardized(batch, n, seed=0):
    G = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(seed))
    G = G - G.mean(-1, keepdim=True)
    return G / G.std(-1, keepdim=True, unbiased=False)


def test_row_standardized_square_matches_eigh():
    """Each row sums to 0, so 1/√n is an exact null vector; the rest of the spectrum stays far above τ."""
    M = row_standardized(2, 48)
    S = torch.linalg.svdvals(M.double())
    tau = S[:, :1] * default_rtol(M.shape[-2:])
    assert (S[:, -1:] < tau / 100).all() and (S[:, :-1] > 10 * tau).all()  # the gap the comparison needs
    O, error = polar(M)
    kept, leak, rel = errors(O, M)
    assert torch.isfinite(O).all() and kept <= 1e-4 and leak <= 1e-3 and rel <= 1e-4
    assert float(error.max()) <= 1e-6
    torch.testing.assert_close(O, orthogonalize_eigh(M), atol=1e-5, rtol=0)


def test_zero_matrix_gives_exact_zero():
    M = with_spectrum((3, 16, 40), geometric(16, 1, 1e-2))
    M[1] = 0
    O, error = polar(M)
    assert torch.isfinite(O).all() and torch.isfinite(error).all()
    assert torch.equal(O[1], torch.zeros(16, 40)) and float(error[1]) == 0
    torch.testing.assert_close(O[0], polar(M[0])[0], atol=1e-6, rtol=0)  # its batch mates are unaffected


def test_bf16_input_gives_fp32_with_the_same_accuracy():
    M = with_spectrum((3, 32, 96), geometric(32, 1, 1e-3), dtype=torch.bfloat16)
    O, error = polar(M)
    assert O.dtype == torch.float32 and error.dtype == torch.float32
    kept, _, rel = errors(O, M)  # against the SVD of the bf16 values themselves
    assert kept <= 1e-4 and rel <= 1e-4 and float(error.max()) <= 1e-6


def test_fp64_input_gives_fp64():
    M = with_spectrum((2, 32, 96), geometric(32, 1, 1e-3), dtype=torch.float64)
    O, error = polar(M)
    assert O.dtype == torch.float64 and error.dtype == torch.float64
    _, _, rel = errors(O, M)
    assert rel <= 1e-10


@pytest.mark.parametrize("kappa", [10, 1e3, 1e5])
def test_certificate_is_not_optimistic(kappa):
    """In fp64 the true orthogonality error of the result is measurable: the certificate is at least of its order."""
    M = with_spectrum((3, 48, 128), geometric(48, 1, 1 / kappa), dtype=torch.float64)
    O, error = polar(M, rtol=1e-6)
    assert (error >= 0.5 * orthogonality_error(O)).all()


def test_certificate_fails_a_schedule_that_is_too_short(monkeypatch):
    M = with_spectrum((3, 32, 96), geometric(32, 1, 1e-4))
    full = polar_schedule(M.shape, None)
    monkeypatch.setattr(polar_module, "polar_schedule", lambda shape, rtol, tol: full[:2])
    O, error = polar(M)
    kept, _, _ = errors(O, M)
    assert kept > POLAR_TOLERANCE and float(orthogonality_error(O.double()).min()) > POLAR_TOLERANCE
    assert float(error.min()) > POLAR_TOLERANCE


def test_batched_equals_one_matrix_at_a_time():
    M = with_spectrum((4, 24, 64), geometric(24, 1, 1e-3), dtype=torch.float64)
    O, _ = polar(M)
    for i in range(4):
        O_i, error_i = polar(M[i])
        torch.testing.assert_close(O_i, O[i], atol=1e-12, rtol=0)
        assert error_i.shape == ()


class NoHostReads(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (.item(), float(), bool(), `if tensor`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_reads():
    M = with_spectrum((2, 32, 96), geometric(32, 1, 1e-3))
    with pytest.raises(AssertionError), NoHostReads():
        M.sum().item()  # the guard itself works
    with NoHostReads():
        polar(M)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_cuda():
    M = with_spectrum((4, 64, 160), geometric(64, 1, 1e-3)).cuda()
    polar(M)  # first call: lazy cuSOLVER / cuBLAS initialization may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        O, error = polar(M)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kept, _, rel = errors(O.cpu(), M.cpu())
    assert kept <= 1e-4 and rel <= 1e-4 and float(error.max()) <= 1e-6


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_polar_compiles_as_one_graph():
    """No graph break (fullgraph) and the same numbers: the schedule is host maths, the Choleskys need no info."""
    M = with_spectrum((2, 16, 48), geometric(16, 1, 1e-2))
    O, error = torch.compile(polar, fullgraph=True, dynamic=False)(M)
    O_eager, error_eager = polar(M)
    torch.testing.assert_close(O, O_eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(error, error_eager, atol=1e-9, rtol=1e-3)
