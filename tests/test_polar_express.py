"""The fp64-free iterative route: its schedule, its accuracy against fp64 SVD, and the device-aware "auto"."""

import importlib
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from slimopt.transforms import hardware, orthogonality_error, orthogonalize, standardize_rows
from slimopt.transforms.orthogonalize import SlowFloat64Warning, exact_method
from slimopt.transforms.polar_express import (
    FLOOR,
    TOLERANCE,
    express_schedule,
    image,
    minimax_quintic,
    polar_express,
    slope_at_zero,
)


def with_spectrum(r, n, singular_values, dtype=torch.float32, seed=0):
    """U diag(s) Vᵀ in fp64 with random orthonormal U, V, rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=generator)).Q
    return ((U * torch.as_tensor(singular_values, dtype=torch.float64)) @ V.T).to(dtype)


def exact_polar(M):
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U @ Vh


def test_minimax_quintic_equioscillates():
    a, b, c = minimax_quintic(0.1, 1.0)
    xs = torch.linspace(0.1, 1.0, 20001, dtype=torch.float64)
    error = 1 - (a * xs + b * xs**3 + c * xs**5)
    worst = float(error.abs().max())
    # The ends carry the extreme error with opposite signs, and nothing inside exceeds it.
    assert float(error[0]) == pytest.approx(worst, rel=1e-6)
    assert float(error[-1]) == pytest.approx(-worst, rel=1e-6)
    # A perturbed polynomial is worse: it is the optimum, not just a good one.
    for da, db in ((1e-3, 0), (0, 1e-3), (-1e-3, 1e-3)):
        other = 1 - ((a + da) * xs + (b + db) * xs**3 + c * xs**5)
        assert float(other.abs().max()) > worst


@pytest.mark.parametrize("low", [1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4])
def test_the_schedule_takes_the_whole_interval_within_tol_of_one(low, tol):
    schedule = express_schedule(low, tol)
    xs = torch.logspace(math.log10(low), 0, 4001, dtype=torch.float64)
    for a, b, c in schedule:
        xs = a * xs + b * xs**3 + c * xs**5
    assert float((xs - 1).abs().max()) <= tol
    lo, hi = image(schedule[-1], low, 1.0)  # the helper agrees with the dense check on the last step's own range
    assert lo <= hi
    assert len(schedule) <= 12
    assert slope_at_zero(schedule) > 1 / low  # small singular values are lifted, not dropped


@pytest.mark.parametrize("low, tol", [(0.0, 1e-2), (1.0, 1e-2), (1e-3, 0.0), (1e-3, 1.5)])
def test_a_bad_schedule_request_names_the_value(low, tol):
    with pytest.raises(ValueError, match=repr(low) if not 0 < low < 1 else repr(tol)):
        express_schedule(low, tol)


KAPPAS = [1e1, 1e2, 1e3, 1e4]


@pytest.mark.parametrize("kappa", KAPPAS)
def test_fp32_steps_match_fp64_svd_on_every_kept_singular_value(kappa):
    """All-fp32 with a tight tol: with every σ ≥ floor·σ_max, the result is fp64 SVD's U Vᵀ to fp32's reach."""
    r, n = 64, 256
    M = with_spectrum(r, n, torch.logspace(0, -math.log10(kappa), r))
    O = polar_express(M, low_precision=torch.float32, floor=0.5 / kappa, tol=1e-4).double()
    reference = exact_polar(M)
    assert float((O - reference).norm() / reference.norm()) < 2e-4  # measured 2e-6 to 7e-5
    assert float((torch.linalg.svdvals(O) - 1).abs().max()) <= 1e-4


@pytest.mark.parametrize("kappa", KAPPAS)
def test_the_default_mixed_precision_route_is_a_partial_isometry_near_svd(kappa):
    """bf16 steps, an fp32 finish: every singular value within tol of 1 down to the floor, the subspaces
    those of a matrix within bf16 rounding of M. Measured relF against fp64 SVD: 1e-2 (κ 10) to 0.5 (κ 1e4,
    whose bottom directions sit at the floor and below); the bound here is what the docs state."""
    r, n = 64, 256
    M = with_spectrum(r, n, torch.logspace(0, -math.log10(kappa), r))
    O, error = orthogonalize(M, "polar_express", return_error=True)
    reference = exact_polar(M)
    relative = float((O.double() - reference).norm() / reference.norm())
    assert relative < {1e1: 0.03, 1e2: 0.06, 1e3: 0.3, 1e4: 0.6}[kappa]
    sv = torch.linalg.svdvals(O.double())
    kept = torch.logspace(0, -math.log10(kappa), r) >= FLOOR
    assert float((sv[kept] - 1).abs().max()) <= TOLERANCE
    assert float(error) < 3 * TOLERANCE  # the error report is the orthogonality error, as for the exact routes
    # The top directions, far above bf16's reach, are SVD's.
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    top = U[:, :8].T @ O.double() @ Vh[:8].T
    torch.testing.assert_close(top, torch.eye(8, dtype=torch.float64), atol=2e-2, rtol=0)


def test_rank_deficient_input():
    """fp32 steps keep a null space empty (measured 2.4e-4: M's own fp32 rounding, times the schedule's slope
    at 0); bf16 steps fill it with their rounding noise, lifted to unit singular values as Muon's are. The
    result stays a partial isometry either way, and the docs say so."""
    r, n = 64, 256
    s = torch.cat([torch.logspace(0, -1, 32), torch.zeros(32)])
    M = with_spectrum(r, n, s)
    sv = torch.linalg.svdvals(polar_express(M, low_precision=torch.float32).double())
    assert float((sv[:32] - 1).abs().max()) <= TOLERANCE
    assert float(sv[32:].max()) < 1e-3
    sv = torch.linalg.svdvals(polar_express(M, low_precision=torch.bfloat16).double())
    assert float((sv[:32] - 1).abs().max()) <= TOLERANCE
    assert float(sv.max()) <= 1 + TOLERANCE


@pytest.mark.parametrize("size", [32, 128])
def test_row_standardized_square_gradient(size):
    """SWAN's input: rank n − 1 (rows sum to zero) with a tail of small singular values."""
    torch.manual_seed(0)
    G_tilde = standardize_rows(torch.randn(size, size), 1e-8)
    O = orthogonalize(G_tilde, "polar_express")
    ones = torch.ones(size) / math.sqrt(size)
    # bf16 rounding lifts the null direction (measured 0.2-0.6, against ‖O‖_F = √size); SWAN re-centres rows.
    assert float((O @ ones).norm()) <= 1 + TOLERANCE
    reference = orthogonalize(G_tilde, "svd")
    sigma = torch.linalg.svdvals(G_tilde.double())
    kept = sigma >= FLOOR * sigma[0]
    sv = torch.linalg.svdvals(O.double())
    assert int((sv > 0.5).sum()) >= int(kept.sum()) - 1
    assert float((O - reference).norm() / reference.norm()) < 0.2


@pytest.mark.parametrize("r, n", [(64, 256), (512, 600)])
def test_fp16_steps_stay_in_range(r, n):
    """fp16 (the route's low precision on GPUs before sm_80): the scaled operands never leave its range."""
    M = with_spectrum(r, n, torch.logspace(0, -2, r))
    O = polar_express(M, low_precision=torch.float16)
    assert torch.isfinite(O).all()
    sv = torch.linalg.svdvals(O.double())
    assert float((sv - 1).abs().max()) <= TOLERANCE


def test_bf16_input_and_tall_matrices():
    M = with_spectrum(48, 160, torch.logspace(0, -2, 48), dtype=torch.bfloat16)
    O = orthogonalize(M, "polar_express")
    assert O.dtype == torch.float32
    assert float(orthogonality_error(O)) < 3 * TOLERANCE
    O_tall = orthogonalize(M.mT.contiguous(), "polar_express")
    torch.testing.assert_close(O_tall, O.mT, atol=1e-6, rtol=0)


def test_a_stack_is_each_matrix_alone_and_a_zero_matrix_stays_zero():
    stack = torch.stack([with_spectrum(32, 96, torch.logspace(0, -k, 32), seed=k) for k in range(3)])
    stack[1] = 0
    O = orthogonalize(stack, "polar_express")
    assert torch.isfinite(O).all()
    assert float(O[1].abs().max()) == 0.0
    for i in (0, 2):
        torch.testing.assert_close(O[i], orthogonalize(stack[i], "polar_express"), atol=1e-6, rtol=0)


def test_scale_does_not_matter():
    M = with_spectrum(32, 96, torch.logspace(0, -2, 32))
    base = orthogonalize(M, "polar_express")
    for scale in (1e-35, 1e-8, 1e8, 1e35):
        torch.testing.assert_close(orthogonalize(M * scale, "polar_express"), base, atol=2e-2, rtol=0)


orthogonalize_module = importlib.import_module("slimopt.transforms.orthogonalize")


@pytest.mark.parametrize("rtol", [0.0, 1e-9, 0.5, 1.0])
def test_every_rank_rtol_the_optimizers_accept_gives_a_schedule(rtol):
    """rank_rtol = 0 ("keep every direction") means the lowest floor, 1e-6; 1 is the top of the accepted range."""
    M = with_spectrum(16, 40, torch.logspace(0, -3, 16))
    O = orthogonalize(M, "polar_express", rtol=rtol)
    assert torch.isfinite(O).all() and float(torch.linalg.svdvals(O.double()).max()) <= 1 + TOLERANCE

# The device-aware choice, on CPU with faked CUDA properties.
CAPABILITIES = {
    (6, 0): True, (6, 1): False, (7, 0): True, (7, 5): False, (8, 0): True, (8, 6): False, (8, 7): False,
    (8, 9): False, (9, 0): True, (10, 0): True, (10, 3): False, (12, 0): False,
}


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(major, minor):
        properties = SimpleNamespace(major=major, minor=minor, name=f"fake sm_{major}{minor}")
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: properties.name)
    return install


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_auto_never_takes_an_fp64_route_on_a_gpu(fake_gpu, capability):
    fake_gpu(*capability)
    cuda = torch.device("cuda", 0)
    assert hardware.fast_fp64(cuda) is CAPABILITIES[capability]
    assert exact_method("auto", cuda) == exact_method("auto", cuda, (32, 128)) == "polar_express"
    assert hardware.low_precision(cuda) == (torch.bfloat16 if capability >= (8, 0) else torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert exact_method("eigh", cuda) == "eigh"  # a named route is kept ...
        assert exact_method("polar_express", cuda) == "polar_express"
    slow = [w for w in caught if issubclass(w.category, SlowFloat64Warning)]
    assert len(slow) == (0 if CAPABILITIES[capability] else 1)  # ... with a warning where fp64 is slow
    if slow:
        assert "fake sm_" in str(slow[0].message) and "'eigh'" in str(slow[0].message)


@pytest.mark.parametrize("flags, expected, route", [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "polar_express"),
    ({"avx2", "amx_bf16"}, torch.bfloat16, "polar_express"),
    ({"avx2", "avx512f"}, torch.float32, "eigh"),
    (set(), torch.float32, "eigh"),
])
def test_auto_on_a_cpu_follows_its_bf16_support(monkeypatch, flags, expected, route):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.low_precision("cpu") == expected
    assert exact_method("auto", torch.device("cpu"), (512, 1376)) == route
    assert exact_method("auto", torch.device("cpu"), (128, 512)) == "eigh"  # LAPACK is faster there
    assert hardware.fast_fp64("cpu")


def test_without_fast_bf16_the_route_runs_in_fp32(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    seen = []
    original = orthogonalize_module.polar_express
    monkeypatch.setattr(orthogonalize_module, "polar_express",
                        lambda M, **kw: seen.append(kw["low_precision"]) or original(M, **kw))
    orthogonalize(torch.randn(8, 24), "polar_express")
    assert seen == [torch.float32]
