"""Low-rank subspaces of a gradient: find one, project onto it, rotate a moment into a new one.

Shapes follow the optimizers' orientation: G is (..., m, n) with m ≥ n, the
basis Q is (..., m, r) with orthonormal columns, projected quantities are (..., r, n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimopt.transforms.numerics import compute_dtype

SUBSPACE_METHODS = ("randomized", "svd")

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # odd 64-bit constant: mixes (seed, step) into distinct streams
_SEED_MASK = (1 << 63) - 1


def sketch_seed(seed: int, step: int) -> int:
    """A generator seed for one matrix at one refresh, reproducible from (seed, step) alone."""
    return (seed * _GOLDEN_GAMMA + step) & _SEED_MASK


_GOLDEN_GAMMA_INVERSE = pow(_GOLDEN_GAMMA, -1, _SEED_MASK + 1)  # odd, so invertible modulo 2^63


def rebase_seed(seed: int, step: int) -> int:
    """The seed s with ``sketch_seed(s, 0) == sketch_seed(seed, step)``: what moves a parameter at position
    ``step`` of an optimizer (seeded ``seed``) to position 0 of an optimizer of its own, with the same stream."""
    return (seed + step * _GOLDEN_GAMMA_INVERSE) & _SEED_MASK


def gaussian_sketch(
    seeds: Sequence[int], step: int, shape: tuple[int, int], device, dtype
) -> torch.Tensor:
    """One Gaussian test matrix per seed, stacked to (len(seeds), *shape).

    Each matrix draws from its own generator, so a matrix gets the same sketch
    whether it is processed alone or inside a stack.
    """
    generator = torch.Generator(device=device)
    sketches = []
    for seed in seeds:
        generator.manual_seed(sketch_seed(int(seed), step))
        sketches.append(torch.randn(shape, generator=generator, device=device, dtype=dtype))
    return torch.stack(sketches)


def _orthonormal_basis(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def top_left_singular_vectors_svd(G: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact top-``rank`` left singular vectors of each matrix in G."""
    X = G.to(compute_dtype(G.dtype))
    try:
        U = torch.linalg.svd(X, full_matrices=False).U
    except torch.linalg.LinAlgError:
        U = _left_singular_vectors_eigh(X)
    return U[..., :rank]


def _left_singular_vectors_eigh(X: torch.Tensor) -> torch.Tensor:
    """SVD fallback: U = X V Σ^-1 from the fp64 eigendecomposition of Xᵀ X, re-orthonormalized."""
    X64 = X.double()
    eigvals, V = torch.linalg.eigh(X64.mT @ X64)
    V = V.flip(-1)  # descending, as svd orders them
    sigma = eigvals.flip(-1).clamp_min(0).sqrt()
    U = (X64 @ V) / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    return _orthonormal_basis(U).to(X.dtype)


def top_left_singular_vectors_randomized(
    G: torch.Tensor,
    rank: int,
    *,
    seeds: Sequence[int],
    step: int,
    oversample: int = 8,
    power_iters: int = 2,
) -> torch.Tensor:
    """Randomized range finder with subspace iteration (Halko, Martinsson & Tropp, 2011, Alg. 4.4 + 5.1).

    ``G`` is (B, m, n); ``seeds`` gives one seed per matrix. Exact when
    rank(G) ≤ rank + oversample; power iterations sharpen a slowly decaying spectrum.
    """
    X = G.to(compute_dtype(G.dtype))
    m, n = X.shape[-2:]
    width = min(rank + oversample, n, m)
    omega = gaussian_sketch(seeds, step, (n, width), X.device, X.dtype)
    Y = _orthonormal_basis(X @ omega)
    for _ in range(power_iters):
        Z = _orthonormal_basis(X.mT @ Y)
        Y = _orthonormal_basis(X @ Z)
    return Y @ _top_eigenvectors_of_gram(Y.mT @ X, rank)


def _top_eigenvectors_of_gram(S: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of a short, wide S (width × n): eigenvectors of the fp64 Gram
    S Sᵀ (width × width). Cheaper than an SVD of S, on a GPU by far; fp64 keeps the squared spectrum exact
    enough to order the leading directions."""
    S64 = S.double()
    eigenvectors = torch.linalg.eigh(S64 @ S64.mT).eigenvectors  # ascending eigenvalues
    return eigenvectors.flip(-1)[..., :rank].to(S.dtype)


def top_left_singular_vectors(
    G: torch.Tensor,
    rank: int,
    method: str = "svd",
    *,
    seeds: Sequence[int] | None = None,
    step: int = 0,
    oversample: int = 8,
    power_iters: int = 2,
) -> torch.Tensor:
    """Basis (..., m, rank) of the dominant left singular subspace, by "svd" or "randomized"."""
    if method == "svd":
        return top_left_singular_vectors_svd(G, rank)
    if method == "randomized":
        if seeds is None:
            raise ValueError("subspace='randomized' needs one seed per matrix")
        batched = G.ndim == 3
        Q = top_left_singular_vectors_randomized(
            G if batched else G.unsqueeze(0),
            rank,
            seeds=seeds,
            step=step,
            oversample=oversample,
            power_iters=power_iters,
        )
        return Q if batched else Q.squeeze(0)
    raise ValueError(f"subspace={method!r} is not one of {SUBSPACE_METHODS}")


def project(G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Qᵀ G: the coordinates of G's columns in the subspace."""
    return Q.mT @ G


def project_back_with_residual(
    X: torch.Tensor, Q: torch.Tensor, G: torch.Tensor, G_hat: torch.Tensor, residual_scale: float,
    *, overwrite: bool = False,
) -> torch.Tensor:
    """Q X + residual_scale·(G − Q Ĝ), the subspace update plus the part of G outside the subspace.

    Computed as residual_scale·G + Q (X − residual_scale·Ĝ): one m×r×n product instead of two,
    with the addition fused into it; with ``overwrite`` the result is written into G's memory.
    """
    low_rank = X - residual_scale * G_hat
    if overwrite:
        return G.baddbmm_(Q, low_rank, beta=residual_scale) if G.ndim == 3 else G.addmm_(Q, low_rank,
                                                                                          beta=residual_scale)
    fused_product = torch.baddbmm if G.ndim == 3 else torch.addmm
    return fused_product(G, Q, low_rank, beta=residual_scale)


def rotate_moment(M: torch.Tensor, Q_old: torch.Tensor, Q_new: torch.Tensor) -> torch.Tensor:
    """(Q_newᵀ Q_old) M: re-express a moment kept in the old subspace in the new one."""
    return (Q_new.mT @ Q_old) @ M


def refresh_subspace(G: torch.Tensor, Q_old: torch.Tensor, group: dict, seeds: Sequence[int],
                     step: int) -> torch.Tensor:
    """A new basis (..., m, r) for G at a refresh, by ``group``'s subspace settings, as SUMO and GaLore take it.

    A matrix that is exactly zero (an idle MoE expert, a LoRA A before B moves) has no dominant subspace: the
    SVD or range finder of 0 would give coordinate axes. It keeps its previous basis instead, and at the first
    refresh (``step`` 0, nothing before) gets the orthonormalized Gaussian sketch, a random subspace. Decided on
    the device, per matrix of the batch, without a host sync.
    """
    r = Q_old.shape[-1]
    Q_new = top_left_singular_vectors(G, r, group["subspace"], seeds=seeds, step=step,
                                      oversample=group["oversample"], power_iters=group["power_iters"])
    if step > 0:
        fallback = Q_old
    else:
        batched = G.ndim == 3
        sketch = gaussian_sketch(seeds, step, (G.shape[-2], r), G.device, Q_new.dtype)
        fallback = _orthonormal_basis(sketch if batched else sketch.squeeze(0))
    zero = G.abs().amax(dim=(-2, -1)) == 0
    return torch.where(zero[..., None, None], fallback, Q_new)
