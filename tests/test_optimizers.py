"""The optimizers: batched path == reference path, the issue's formulas, AdamW, state sizes."""

import copy
import math
import warnings

import pytest
import torch
from helpers import MixedShapes, matrix_group, run_fixed_gradients, run_steps, state_numel
from torch import nn

from slimopt import SUMO, SWAN, GaLore
from slimopt.optim.optimizer import FallbackWarning, SlimOptimizer
from slimopt.transforms import hardware

CONFIGS = {
    "sumo-svd-randomized": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="svd")),
    "sumo-polar": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="polar")),
    "sumo-eigh": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="eigh")),
    "sumo-eigh-exact-subspace": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="eigh", subspace="svd")),
    "sumo-newton-schulz": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="newton_schulz")),
    "sumo-no-limit-perp0": (SUMO, dict(rank=20, update_gap=3, norm_growth_limit=None, perp_scale=0.0,
                                       orthogonalizer="eigh")),
    "swan-newton-schulz": (SWAN, dict(whitening="newton_schulz", ns_steps=5)),
    "swan-eigh": (SWAN, dict(whitening="eigh")),
    "swan-polar": (SWAN, dict(whitening="polar")),
    "galore": (GaLore, dict(rank=3, update_gap=2, weight_decay=0.1)),
    "galore-svd": (GaLore, dict(rank=3, update_gap=2, weight_decay=0.1, subspace="svd")),
    # lr_scale="adamw": the same maths, Δ rescaled per matrix shape (AdamW's lr carries over).
    "sumo-adamw-lr": (SUMO, dict(rank=3, update_gap=2, orthogonalizer="eigh", lr_scale="adamw")),
    "swan-adamw-lr": (SWAN, dict(whitening="eigh", lr_scale="adamw")),
    "galore-adamw-lr": (GaLore, dict(rank=3, update_gap=2, weight_decay=0.1, lr_scale="adamw")),
}


def both_paths(cls, hparams, steps=5):
    models = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = MixedShapes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warnings, tested elsewhere
            optimizer = cls(matrix_group(model), lr=0.02, foreach=foreach, **hparams)
            run_fixed_gradients(model, optimizer, steps)
        models.append((model, optimizer))
    return models


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_equals_reference(name):
    cls, hparams = CONFIGS[name]
    (fast, fast_opt), (ref, ref_opt) = both_paths(cls, hparams)
    for (pname, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_fast, p_ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=pname: f"{n}: {m}")
        s_fast, s_ref = fast_opt.state[p_fast], ref_opt.state[p_ref]
        assert s_fast.keys() == s_ref.keys()
        for key in s_fast:
            torch.testing.assert_close(s_fast[key], s_ref[key], atol=1e-5, rtol=1e-4)
    # The run really moved the weights, so the comparison was not vacuous.
    torch.manual_seed(0)
    assert not torch.allclose(MixedShapes().a1.weight, fast.a1.weight)


@pytest.mark.parametrize("cls, option, hparams", [
    (SUMO, "orthogonalizer", dict(rank=3, update_gap=2)),
    (SWAN, "whitening", {}),
])
def test_the_iterative_route_batched_equals_reference(cls, option, hparams, monkeypatch):
    """With fp32 steps the iterative route is batched == reference to 1e-5, across a refresh. With bf16 steps
    (the default on this CPU) an ulp between the two paths' inputs (a different reduction order) can flip a
    bf16 rounding, which the schedule's slope then lifts in the smallest directions: the paths land close,
    not equal (measured: 1.6 % of the distance travelled for SWAN, 0.1 % for SUMO)."""
    hparams = {**hparams, option: "polar_express"}
    with monkeypatch.context() as patch:
        patch.setattr(hardware, "cpu_flags", lambda: frozenset())  # a CPU without fast bf16: fp32 steps
        (fast, _), (ref, _) = both_paths(cls, hparams)
        for p, q in zip(fast.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert hardware.low_precision("cpu") == torch.bfloat16 or not hardware.cpu_flags() & {"avx512_bf16", "amx_bf16"}
    (fast, _), (ref, _) = both_paths(cls, hparams)
    torch.manual_seed(0)
    start = MixedShapes()
    for p, q, p0 in zip(fast.parameters(), ref.parameters(), start.parameters()):
        assert float((p - q).norm()) <= 0.05 * float((p - p0).norm())


def test_stacks_are_chunked_without_changing_results():
    torch.manual_seed(0)
    model = MixedShapes()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = dict(lr=0.02, rank=3, update_gap=2, orthogonalizer="eigh")
        run_fixed_gradients(model, SUMO(matrix_group(model), **exact), 4)
        run_fixed_gradients(twin, SUMO(matrix_group(twin), **exact, max_stack_bytes=1), 4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


# --- the issue's formulas, written out independently of slimopt -------------------------


def spec_sumo(W0, grads, *, lr, rank, gap, mu, alpha, gamma, perp, wd):
    """SUMO as the issue states it, exact subspace and SVD orthogonalization."""
    W = W0.clone()
    transposed = W.shape[0] < W.shape[1]
    Q = M = None
    previous = None
    for t, grad in enumerate(grads):
        G = grad.T if transposed else grad
        m, n = G.shape
        r = min(rank, n)
        if t % gap == 0:
            Q_new = torch.linalg.svd(G, full_matrices=False).U[:, :r]
            if t > 0:
                M = (Q_new.T @ Q) @ M
            Q = Q_new
        G_hat = Q.T @ G
        M = G_hat if M is None else mu * M + G_hat
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        O = U @ Vh
        norm = torch.linalg.norm(O)
        if gamma is not None and t > 0 and norm > gamma * previous:
            O = O * gamma * previous / norm
        previous = torch.linalg.norm(O)
        delta = alpha * 0.2 * math.sqrt(max(m, n)) * Q @ O + perp * (G - Q @ G_hat)
        W = W * (1 - lr * wd) - lr * (delta.T if transposed else delta)
    return W


def spec_galore(W0, grads, *, lr, rank, gap, scale, betas, eps, wd, side="short"):
    """GaLore's projector as published: for rows ≥ cols project on the right (R = G P, P the top-r right
    singular vectors), else on the left (R = Pᵀ G); moments max(m, n) × r. side="long" is the other one.

    The moments are not rotated at a refresh, so the result depends on the signs an SVD gives its vectors;
    the right singular vectors are taken as the left ones of Gᵀ, the matrix slimopt decomposes."""
    W = W0.clone()
    b1, b2 = betas
    right = (W.shape[0] >= W.shape[1]) == (side == "short")
    P = None
    m1 = m2 = 0
    for t, G in enumerate(grads):
        r = min(rank, *G.shape)
        if t % gap == 0:
            P = torch.linalg.svd(G.T if right else G, full_matrices=False).U[:, :r]
        R = G @ P if right else P.T @ G
        m1 = b1 * m1 + (1 - b1) * R
        m2 = b2 * m2 + (1 - b2) * R * R
        N = (m1 / (1 - b1 ** (t + 1))) / ((m2 / (1 - b2 ** (t + 1))).sqrt() + eps)
        delta = scale * (N @ P.T if right else P @ N)
        W = W * (1 - lr * wd) - lr * delta
    return W


def spec_swan(W0, grads, *, lr, eps, wd):
    W = W0.clone()
    for grad in grads:
        transposed = grad.shape[0] > grad.shape[1]
        G = (grad.T if transposed else grad).double()
        G_tilde = (G - G.mean(1, keepdim=True)) / (G.std(1, correction=0, keepdim=True) + eps)
        U, S, Vh = torch.linalg.svd(G_tilde, full_matrices=False)
        keep = S > S[0] * max(G.shape) * torch.finfo(torch.float32).eps
        O = (U * keep) @ Vh
        delta = (O * math.sqrt(G.numel()) / torch.linalg.norm(O)).float()
        W = W * (1 - lr * wd) - lr * (delta.T if transposed else delta)
    return W


def fixed_gradients(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def run_on_gradients(optimizer, param, grads):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])
def test_sumo_follows_the_issue_formulas(shape):
    hparams = dict(lr=0.05, rank=3, update_gap=2, momentum=0.9, scale=1.3, norm_growth_limit=1.05,
                   perp_scale=0.5, weight_decay=0.1)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = fixed_gradients(shape, 5)
    # Shrinking gradients make the norm limiter's cap irrelevant, growing ones make it bind.
    grads = [g * (1 + 2 * t) for t, g in enumerate(grads)]
    param = nn.Parameter(W0.clone())
    run_on_gradients(SUMO([param], subspace="svd", orthogonalizer="eigh", **hparams), param, grads)
    expected = spec_sumo(W0, grads, lr=0.05, rank=3, gap=2, mu=0.9, alpha=1.3, gamma=1.05, perp=0.5, wd=0.1)
    torch.testing.assert_close(param.data, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["short", "long"])
@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (12, 12)])
def test_galore_follows_the_published_projector(shape, side):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    grads = fixed_gradients(shape, 5)
    param = nn.Parameter(W0.clone())
    optimizer = GaLore([param], lr=0.05, rank=3, update_gap=2, scale=0.5, weight_decay=0.1, side=side,
                       subspace="svd")
    run_on_gradients(optimizer, param, grads)
    expected = spec_galore(W0, grads, lr=0.05, rank=3, gap=2, scale=0.5, betas=(0.9, 0.999), eps=1e-8, wd=0.1,
                           side=side)
    torch.testing.assert_close(param.data, expected, atol=1e-5, rtol=1e-5)
    moments = max(shape) if side == "short" else min(shape)
    assert optimizer.state[param]["exp_avg"].numel() == 3 * moments


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (10, 10)])
def test_swan_exact_whitening_follows_the_issue_formulas(shape):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = fixed_gradients(shape, 3)
    param = nn.Parameter(W0.clone())
    run_on_gradients(SWAN([param], lr=0.05, whitening="eigh", weight_decay=0.1), param, grads)
    expected = spec_swan(W0, grads, lr=0.05, eps=1e-8, wd=0.1)
    torch.testing.assert_close(param.data, expected, atol=1e-5, rtol=1e-5)


def test_swan_update_has_unit_rms():
    param = nn.Parameter(torch.zeros(16, 40))
    param.grad = torch.randn(16, 40)
    SWAN([param], lr=1.0).step()
    assert math.isclose(float(param.data.square().mean().sqrt()), 1.0, rel_tol=1e-5)


# --- AdamW fallback ----------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
def test_adamw_group_matches_torch_adamw(cls, foreach):
    torch.manual_seed(0)
    model = MixedShapes()
    twin = copy.deepcopy(model)
    hparams = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    ours = cls([{"params": model.parameters(), "algorithm": "adamw"}], foreach=foreach, **hparams)
    theirs = torch.optim.AdamW(twin.parameters(), **hparams)
    run_steps(model, ours, 6)
    run_steps(twin, theirs, 6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


def test_non_matrix_params_in_a_matrix_group_fall_back_to_adamw_with_one_warning():
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(7))
    row = nn.Parameter(torch.randn(1, 9))
    twin_bias, twin_row = nn.Parameter(bias.detach().clone()), nn.Parameter(row.detach().clone())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = SUMO([{"params": [("layer.bias", bias), ("layer.row", row)]}], lr=0.01, rank=4)
        reference = torch.optim.AdamW([twin_bias, twin_row], lr=0.01, weight_decay=0.0)
        for _ in range(3):
            for p, q in ((bias, twin_bias), (row, twin_row)):
                p.grad = torch.ones_like(p)
                q.grad = torch.ones_like(q)
            optimizer.step()
            reference.step()
    assert all(w.category is FallbackWarning for w in record)
    assert all(w.filename == __file__ for w in record)  # points at the user's line, not into slimopt
    messages = [str(w.message) for w in record]
    assert len(messages) == 2  # once per parameter, when the optimizer is built, not once per step
    assert any("layer.bias" in m and "AdamW fallback" in m for m in messages)
    assert any("layer.row" in m and "≥ 2-D weight" in m for m in messages)
    torch.testing.assert_close(bias, twin_bias)
    torch.testing.assert_close(row, twin_row)


# --- state ---------------------------------------------------------------------------------


def test_swan_keeps_no_state_for_matrices():
    torch.manual_seed(0)
    model = MixedShapes()
    optimizer = SWAN(
        [{"params": [model.a1.weight, model.b1.weight, model.square.weight, model.conv.weight]},
         {"params": [model.a1.bias, model.norm.weight], "algorithm": "adamw"}], lr=0.01)
    run_steps(model, optimizer, 3)
    for p in (model.a1.weight, model.b1.weight, model.square.weight, model.conv.weight):
        assert len(optimizer.state[p]) == 0
    assert set(optimizer.state[model.a1.bias]) == {"exp_avg", "exp_avg_sq", "step"}


@pytest.mark.parametrize("cls, per_matrix, basis", [
    # (m, n, r) with m ≥ n → elements: SUMO keeps Q (m×r), M (r×n), o_norm, seed, step: the basis spans the
    # long side. GaLore as published keeps Q (n×r), two m×r moments, seed and step: the basis spans the short side.
    (SUMO, lambda m, n, r: m * r + r * n + 3, "long"),
    (GaLore, lambda m, n, r: n * r + 2 * m * r + 2, "short"),
])
def test_state_size_equals_the_analytic_count(cls, per_matrix, basis):
    torch.manual_seed(0)
    model = MixedShapes()
    matrices = [model.a1.weight, model.a2.weight, model.b1.weight, model.b2.weight, model.square.weight]
    optimizer = cls([{"params": matrices}, {"params": [model.conv.weight], "layout": "conv"}], lr=0.01, rank=5)
    run_steps(model, optimizer, 2)
    shapes = [(24, 12), (24, 12), (24, 12), (24, 12), (12, 12), (9, 4)]
    assert state_numel(optimizer) == sum(per_matrix(m, n, min(5, n)) for m, n in shapes)
    assert optimizer.state[model.b1.weight]["Q"].shape == ((24, 5) if basis == "long" else (12, 5))
    assert optimizer.state[model.conv.weight]["Q"].shape == ((9, 4) if basis == "long" else (4, 4))  # r ≤ n


def test_lr_scheduler_drives_every_group():
    param = nn.Parameter(torch.randn(8, 6))
    bias = nn.Parameter(torch.randn(6))
    optimizer = SUMO([{"params": [param]}, {"params": [bias], "algorithm": "adamw", "lr": 0.5}], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** step)
    for _ in range(2):
        param.grad, bias.grad = torch.randn(8, 6), torch.randn(6)
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.005])


def test_group_of_another_algorithm_gets_that_algorithms_defaults():
    a, b, c = (nn.Parameter(torch.randn(8, 6)) for _ in range(3))
    optimizer = SUMO([{"params": [a]}, {"params": [b], "algorithm": "galore"}, {"params": [c], "algorithm": "swan"}],
                     lr=0.3, scale=2.0, rank=4)
    sumo_group, galore_group, swan_group = optimizer.param_groups
    assert (sumo_group["scale"], sumo_group["rank"]) == (2.0, 4)
    assert (galore_group["scale"], galore_group["rank"]) == (0.25, 128)  # GaLore's own defaults
    assert swan_group["whitening"] == "auto"
    assert all(g["lr"] == 0.3 for g in optimizer.param_groups)  # shared hyperparameters
    for p in (a, b, c):
        p.grad = torch.randn(8, 6)
    optimizer.step()
    assert set(optimizer.state[b]) == {"Q", "exp_avg", "exp_avg_sq", "seed", "step"}
    assert len(optimizer.state[c]) == 0


def test_zero_gradient_gives_zero_update_and_finite_state():
    for cls in (SUMO, SWAN, GaLore):
        param = nn.Parameter(torch.randn(10, 6))
        before = param.detach().clone()
        optimizer = cls([param], lr=0.1)
        for _ in range(2):
            param.grad = torch.zeros(10, 6)
            optimizer.step()
        assert torch.equal(param.data, before), cls.__name__
        assert all(torch.isfinite(v).all() for v in optimizer.state[param].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
def test_half_precision_parameters_keep_fp32_state_and_track_fp32_training(cls, dtype):
    W0 = torch.randn(16, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = fixed_gradients((16, 24), 4)
    p32 = nn.Parameter(W0.float())
    p16 = nn.Parameter(W0.clone())
    opt32, opt16 = cls([p32], lr=0.1), cls([p16], lr=0.1)
    for grad in grads:
        p32.grad, p16.grad = grad.clone(), grad.to(dtype)
        opt32.step()
        opt16.step()
    assert p16.dtype == dtype
    for value in opt16.state[p16].values():
        assert value.dtype in (torch.float32, torch.int64)
    moved = (p32.detach() - W0.float()).norm()
    assert float((p16.detach().float() - p32.detach()).norm()) < 0.1 * float(moved)  # bf16 resolution


def test_every_optimizer_is_a_slim_optimizer_with_the_documented_names():
    import inspect

    expected = {
        SUMO: ["lr", "rank", "update_gap", "momentum", "scale", "norm_growth_limit", "perp_scale", "subspace",
               "orthogonalizer"],
        SWAN: ["lr", "whitening", "ns_steps", "eps"],
        GaLore: ["lr", "rank", "update_gap", "scale", "betas", "eps"],
    }
    for cls, names in expected.items():
        assert issubclass(cls, SlimOptimizer)
        assert set(names) <= set(inspect.signature(cls).parameters)
    defaults = SUMO([nn.Parameter(torch.ones(2, 2))]).defaults
    assert (defaults["update_gap"], defaults["momentum"], defaults["scale"], defaults["norm_growth_limit"],
            defaults["perp_scale"], defaults["orthogonalizer"]) == (200, 0.95, 1.0, 1.1, 1.0, "auto")
    assert SWAN([nn.Parameter(torch.ones(2, 2))]).defaults["ns_steps"] == 10
    galore = GaLore([nn.Parameter(torch.ones(2, 2))]).defaults
    assert (galore["update_gap"], galore["scale"]) == (200, 0.25)


@pytest.mark.parametrize("cls, hparams", [(SUMO, {"rank": 2}), (GaLore, {"rank": 2}), (SWAN, {})])
def test_fp64_parameters_step_in_fp64(cls, hparams):
    weight = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    optimizer = cls([{"params": [weight]}, {"params": [bias], "algorithm": "adamw"}], lr=1e-2, **hparams)
    before = weight.detach().clone()
    weight.grad, bias.grad = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    optimizer.step()
    assert weight.dtype == torch.float64 and not torch.equal(weight, before)
    assert all(v.dtype in (torch.float64, torch.int64) for s in optimizer.state.values() for v in s.values())


@pytest.mark.parametrize("kind", ["swan", "rso"])
def test_step_with_a_closure_recomputes_the_loss_then_updates(kind):
    from slimopt.rso import RSO

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = SWAN(model.parameters(), lr=1e-2) if kind == "swan" else RSO(model, lr=1e-2, rank=2)
    expected = model(x).pow(2).sum().item()

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(expected)
    assert model(x).pow(2).sum().item() < expected


@pytest.mark.parametrize("cls, option, exact, hparams", [
    (SUMO, "orthogonalizer", "svd", dict(rank=3, update_gap=2, subspace="svd")),
    (SWAN, "whitening", "eigh", {}),
])
def test_polar_steps_agree_with_the_exact_route(cls, option, exact, hparams):
    """The polar route is exact to 1e-4: whole optimizer steps, across a refresh, land where svd/eigh's do."""
    results = []
    for method in ("polar", exact):
        torch.manual_seed(0)
        model = MixedShapes()
        run_fixed_gradients(model, cls(matrix_group(model), lr=0.02, **{option: method}, **hparams), 5)
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls, hparams, rms", [
    (SUMO, dict(rank=4, perp_scale=0.0, orthogonalizer="eigh"), 0.2),  # orthogonal rank-r update, at 0.2
    (SWAN, dict(whitening="eigh"), 0.2),  # unit-RMS update, at 0.2
    (GaLore, dict(rank=4, scale=0.25), 1.0),  # Adam's first step is sign-like: AdamW's first update has RMS 1
])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_lr_scale_adamw_gives_every_matrix_update_adamw_rms(cls, hparams, rms, shape):
    """With lr_scale="adamw" the update RMS no longer depends on the shape, the rank or the method's scale; with
    "published" it does (so the option really changes something)."""
    measured = {}
    for lr_scale in ("published", "adamw"):
        weight = nn.Parameter(torch.zeros(shape))
        optimizer = cls([weight], lr=1.0, lr_scale=lr_scale, **hparams)
        weight.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        optimizer.step()
        measured[lr_scale] = weight.detach().pow(2).mean().sqrt().item()
    assert measured["adamw"] == pytest.approx(rms, rel=1e-4)
    assert measured["published"] != pytest.approx(rms, rel=1e-2)


def test_lr_scale_is_checked_and_named():
    weight = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="lr_scale='rms'"):
        SUMO([weight], lr_scale="rms")
    with pytest.raises(ValueError, match=r"scale=0\.0"):
        GaLore([weight], lr_scale="adamw", scale=0.0)
