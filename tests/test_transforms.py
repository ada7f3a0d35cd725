"""Each transform against straightforward linear algebra."""

import pytest
import torch

from slimopt.transforms import (
    inverse_sqrt_newton_schulz,
    limit_norm_growth,
    orthogonality_error,
    orthogonalize,
    project,
    project_back_with_residual,
    rank_tolerance,
    rotate_moment,
    scale_to_unit_rms,
    standardize_rows,
    top_left_singular_vectors,
    whiten,
)


def polar_by_svd(M: torch.Tensor) -> torch.Tensor:
    """U Vᵀ from torch.linalg.svd in fp64, with the matrix_rank rule."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    keep = S > rank_tolerance(S[..., :1], M.shape[-2:])
    return ((U * keep.unsqueeze(-2)) @ Vh).float()


def low_rank(batch, m, n, rank, generator):
    return torch.randn(batch, m, rank, generator=generator) @ torch.randn(batch, rank, n, generator=generator)


@pytest.mark.parametrize("method", ["svd", "eigh"])
@pytest.mark.parametrize("shape", [(3, 8, 20), (3, 20, 8), (2, 16, 16)])
def test_exact_orthogonalizers_match_svd_polar_factor(method, shape):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    O, error = orthogonalize(M, method, return_error=True)
    torch.testing.assert_close(O, polar_by_svd(M), atol=2e-5, rtol=1e-4)
    assert error.shape == (shape[0],) and float(error.max()) < 1e-5
    # A single matrix gives the same result as the same matrix inside a stack.
    torch.testing.assert_close(orthogonalize(M[1], method), O[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_exact_orthogonalizers_drop_null_directions(method):
    g = torch.Generator().manual_seed(1)
    M = low_rank(2, 12, 30, 4, g)
    O = orthogonalize(M, method)
    singular_values = torch.linalg.svdvals(O.double())
    assert torch.allclose(singular_values[:, :4], torch.ones(2, 4, dtype=torch.float64), atol=1e-5)
    assert float(singular_values[:, 4:].max()) < 1e-5  # dropped, not amplified to 1
    torch.testing.assert_close(O, polar_by_svd(M), atol=2e-5, rtol=1e-4)


def test_orthogonalize_zero_matrix_is_zero():
    for method in ("svd", "eigh", "newton_schulz"):
        assert torch.equal(orthogonalize(torch.zeros(2, 4, 6), method), torch.zeros(2, 4, 6))


def test_newton_schulz_is_approximate_and_reports_it():
    M = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(2))
    O, error = orthogonalize(M, "newton_schulz", return_error=True)
    singular_values = torch.linalg.svdvals(O)
    # Muon's quintic lands singular values in a band around 1, not at 1.
    assert float(singular_values.min()) > 0.5 and float(singular_values.max()) < 1.3
    assert float(error.min()) > 1e-3
    _, exact_error = orthogonalize(M, "svd", return_error=True)
    assert float(exact_error.max()) < 1e-5


def test_svd_failure_falls_back_to_eigh(monkeypatch):
    M = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(3))
    expected = orthogonalize(M, "eigh")

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: SVD did not converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    torch.testing.assert_close(orthogonalize(M, "svd"), expected)
    Q = top_left_singular_vectors(M.mT, 3, "svd")  # the subspace finder falls back too
    torch.testing.assert_close(Q.mT @ Q, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)


def test_unknown_orthogonalizer_names_the_value():
    with pytest.raises(ValueError, match="orthogonalizer='qr'"):
        orthogonalize(torch.eye(3), "qr")


def projector(Q):
    return Q @ Q.mT


def test_exact_subspace_matches_svd():
    G = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(4))
    Q = top_left_singular_vectors(G, 5, "svd")
    U = torch.linalg.svd(G, full_matrices=False).U[..., :5]
    torch.testing.assert_close(projector(Q), projector(U), atol=1e-5, rtol=0)


def test_randomized_subspace_is_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(5)
    G = low_rank(3, 64, 32, 6, g)
    Q = top_left_singular_vectors(G, 6, "randomized", seeds=[1, 2, 3], step=0, oversample=4, power_iters=1)
    U = torch.linalg.svd(G, full_matrices=False).U[..., :6]
    torch.testing.assert_close(projector(Q), projector(U), atol=1e-4, rtol=0)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(6).expand(3, 6, 6), atol=1e-5, rtol=0)


def test_randomized_subspace_is_reproducible_per_matrix():
    G = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(6))
    both = top_left_singular_vectors(G, 4, "randomized", seeds=[7, 8], step=200)
    alone = top_left_singular_vectors(G[1], 4, "randomized", seeds=[8], step=200)
    torch.testing.assert_close(both[1], alone, atol=1e-6, rtol=0)
    other_step = top_left_singular_vectors(G[1], 4, "randomized", seeds=[8], step=400)
    assert not torch.allclose(other_step, alone)  # a new refresh draws a new sketch


def test_randomized_subspace_with_power_iterations_approaches_exact():
    # A full-rank matrix with a decaying spectrum: power iterations should
    # capture the top subspace up to a small angle.
    g = torch.Generator().manual_seed(9)
    U, _ = torch.linalg.qr(torch.randn(80, 40, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    G = (U * torch.logspace(0, -3, 40)) @ V.T
    Q = top_left_singular_vectors(G, 5, "randomized", seeds=[0], step=0, oversample=5, power_iters=2)
    residual = torch.linalg.matrix_norm(projector(Q) - projector(U[:, :5]), ord=2)
    assert float(residual) < 1e-2


def test_rotate_moment_preserves_the_part_inside_both_subspaces():
    g = torch.Generator().manual_seed(10)
    Q_old = torch.linalg.qr(torch.randn(20, 4, generator=g)).Q
    M = torch.randn(4, 7, generator=g)
    # Rotate into a permuted, sign-flipped basis of the same subspace: nothing is lost.
    R = torch.tensor([[0.0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    Q_new = Q_old @ R
    rotated = rotate_moment(M, Q_old, Q_new)
    torch.testing.assert_close(Q_new @ rotated, Q_old @ M, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotated, R.T @ M)
    torch.testing.assert_close(project(Q_old @ M, Q_new), rotated, atol=1e-6, rtol=0)


def test_standardize_rows_zero_mean_unit_biased_std():
    G = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(11)) * 3 + 2
    S = standardize_rows(G, eps=0.0)
    torch.testing.assert_close(S.mean(-1), torch.zeros(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(S.std(-1, correction=0), torch.ones(3, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 8, 32), (2, 16, 16)])
def test_exact_whitening_is_polar_factor_of_standardized_gradient(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(12))
    G_tilde = standardize_rows(G, 1e-8)
    torch.testing.assert_close(whiten(G_tilde, "eigh"), polar_by_svd(G_tilde), atol=2e-5, rtol=1e-4)


def test_newton_schulz_whitening_converges_to_exact_on_well_conditioned_input():
    G = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(13))
    G_tilde = standardize_rows(G, 1e-8)
    exact = whiten(G_tilde, "eigh")
    approx = whiten(G_tilde, "newton_schulz", steps=30)
    torch.testing.assert_close(approx, exact, atol=1e-4, rtol=1e-3)
    # Few steps are only approximate, by design.
    assert float((whiten(G_tilde, "newton_schulz", steps=2) - exact).norm()) > 1e-2


@pytest.mark.parametrize("size", [64, 384])
def test_newton_schulz_whitening_stays_bounded_on_a_singular_gram(size):
    """Row standardization makes a square gradient rank-deficient. The guarded
    iteration must stay finite and bounded however many steps it runs, and
    approach the exact pseudo-inverse whitening."""
    G_tilde = standardize_rows(torch.randn(size, size, generator=torch.Generator().manual_seed(14)), 1e-8)
    singular_values = torch.linalg.svdvals(G_tilde.double())
    assert float(singular_values[-1] / singular_values[0]) < 1e-6  # the Gram really is singular
    exact = whiten(G_tilde, "eigh")
    for steps in (10, 40, 150):
        O = whiten(G_tilde, "newton_schulz", steps=steps)
        assert torch.isfinite(O).all()
        assert float(torch.linalg.matrix_norm(O, ord=2)) < 1.5  # the exact answer's is 1
    relative_error = (O - exact).norm() / exact.norm()
    assert float(relative_error) < 0.05


def test_unguarded_coupled_iteration_would_blow_up():
    """The failure the guard exists for: the same iteration with no shift on a
    rank-deficient Gram grows without bound. If this stops failing, the guard's
    reason is gone and its docstring is wrong."""
    G_tilde = standardize_rows(torch.randn(64, 64, generator=torch.Generator().manual_seed(15)), 1e-8)
    A = G_tilde @ G_tilde.T
    A = A / torch.linalg.matrix_norm(A)
    identity = torch.eye(64)
    Y, Z = A, identity
    for _ in range(60):
        T = 1.5 * identity - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
    assert not torch.isfinite(Z).all() or float(torch.linalg.matrix_norm(Z, ord=2)) > 1e6
    guarded = inverse_sqrt_newton_schulz(G_tilde @ G_tilde.T, 60)
    assert torch.isfinite(guarded).all()


def test_inverse_sqrt_matches_eigh_on_positive_definite_input():
    X = torch.randn(3, 10, 30, generator=torch.Generator().manual_seed(16))
    A = X @ X.mT
    eigvals, V = torch.linalg.eigh(A.double())
    expected = ((V * eigvals.rsqrt().unsqueeze(-2)) @ V.mT).float()
    torch.testing.assert_close(inverse_sqrt_newton_schulz(A, 40), expected, atol=1e-4, rtol=1e-3)


def test_limit_norm_growth_caps_per_matrix():
    O = torch.stack([torch.eye(3) * 2, torch.eye(3), torch.eye(3) * 5])
    previous = torch.tensor([1.0, 2.0, 0.0])  # the last matrix has no previous norm
    limited, norms = limit_norm_growth(O, previous, 1.1)
    expected_norms = torch.tensor([1.1, 3**0.5, 5 * 3**0.5])  # capped, under the cap, uncapped
    torch.testing.assert_close(norms, expected_norms)
    torch.testing.assert_close(torch.linalg.matrix_norm(limited), expected_norms)
    unlimited, _ = limit_norm_growth(O, previous, None)
    assert torch.equal(unlimited, O)


def test_scale_to_unit_rms():
    O = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(17))
    scaled = scale_to_unit_rms(O)
    torch.testing.assert_close(scaled.square().mean((-2, -1)).sqrt(), torch.ones(2))
    assert torch.equal(scale_to_unit_rms(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))


def test_orthogonality_error_is_zero_only_for_partial_isometries():
    g = torch.Generator().manual_seed(18)
    U = torch.linalg.qr(torch.randn(6, 3, generator=g)).Q
    V = torch.linalg.qr(torch.randn(9, 3, generator=g)).Q
    partial_isometry = U[:, :2] @ V[:, :2].T  # singular values 1, 1, 0
    stretched = U @ torch.diag(torch.tensor([1.0, 1.0, 1.5])) @ V.T
    errors = orthogonality_error(torch.stack([partial_isometry, stretched]))
    assert float(errors[0]) < 1e-6
    assert float(errors[1]) > 0.1


@pytest.mark.parametrize("batch", [(), (3,)])
def test_project_back_with_residual_matches_the_two_product_form(batch):
    g = torch.Generator().manual_seed(19)
    G = torch.randn(*batch, 20, 8, generator=g)
    Q = torch.linalg.qr(torch.randn(*batch, 20, 4, generator=g)).Q
    X = torch.randn(*batch, 4, 8, generator=g)
    G_hat = Q.mT @ G
    expected = Q @ X + 0.7 * (G - Q @ G_hat)
    torch.testing.assert_close(project_back_with_residual(X, Q, G, G_hat, 0.7), expected, atol=1e-5, rtol=1e-5)
