"""Fidelity fixes from the review: routing of real models, batched 3-D weights, mixed devices and dtypes,
zero-gradient steps, torch.optim conventions, stochastic rounding and the small hyperparameters."""

import copy
import warnings

import pytest
import torch
from torch import nn

from slimopt import SUMO, SWAN, AdamW, GaLore, param_groups
from slimopt.optim import ALGORITHMS, FallbackWarning, SlimOptimizer
from slimopt.optim.optimizer import round_stochastically

# Exact subspaces: a 3-D weight's experts and separate matrices then see the same maths (the randomized
# sketch seeds come from the parameter's position, which differs between the two layouts).
MATRIX_CONFIGS = {
    "sumo": (SUMO, dict(rank=3, update_gap=2, subspace="svd")),
    "sumo-eigh": (SUMO, dict(rank=3, update_gap=2, subspace="svd", orthogonalizer="eigh")),
    "swan": (SWAN, dict(ns_steps=5)),
    "galore": (GaLore, dict(rank=3, update_gap=2, subspace="svd")),
    "galore-long": (GaLore, dict(rank=3, update_gap=2, side="long", subspace="svd")),
}


def gradients(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


# --- routing real models -------------------------------------------------------------------------


class TinyGPT2Block(nn.Module):
    """The GPT-2 layout: HF Conv1D layers (weights stored in × out), an embedding, a norm and a tied head."""

    def __init__(self, conv_cls):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.c_attn = conv_cls(24, 8)  # nf=24 outputs from nx=8 inputs: weight 8 × 24
        self.c_proj = conv_cls(8, 8)  # square: the orientation matters
        self.c_fc = conv_cls(16, 24)  # weight 24 × 16
        self.ln = nn.LayerNorm(16)

    def forward(self, ids):
        h = self.wte(ids)
        q, k, v = self.c_attn(h).split(8, dim=-1)
        h = self.c_proj(torch.tanh(q * k + v))
        h = self.ln(self.c_fc(torch.cat([h, h * h, h.sin()], dim=-1)))
        return h.square().mean()

    def get_output_embeddings(self):
        return None


def conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def test_conv1d_model_routes_its_hidden_matrices_to_the_matrix_algorithm():
    model = TinyGPT2Block(conv1d())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings: every Conv1D weight is a matrix
        groups = param_groups(model, rank=4)
    matrix_names = {name for group in groups if group.get("algorithm") != "adamw" for name, _ in group["params"]}
    assert matrix_names == {"c_attn.weight", "c_proj.weight", "c_fc.weight"}
    assert [g.get("layout") for g in groups if g.get("algorithm") != "adamw"] == ["in_out"]
    optimizer = SUMO(groups, lr=0.01)
    model(torch.randint(0, 11, (2, 5))).backward()
    optimizer.step()
    assert set(optimizer.state[model.c_proj.weight]) == {"Q", "M", "o_norm", "seed", "step"}


class LinearAsConv1D(nn.Module):
    """An nn.Linear with the same interface as HF Conv1D(nf, nx), for the twin model."""

    def __init__(self, nf, nx):
        super().__init__()
        self.linear = nn.Linear(nx, nf)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("name", MATRIX_CONFIGS)
def test_conv1d_weights_update_exactly_as_the_transposed_linear_weights(name):
    """Orientation handled: a Conv1D (in × out) trains as the nn.Linear (out × in) holding its transpose."""
    cls, hparams = MATRIX_CONFIGS[name]
    torch.manual_seed(0)
    gpt2 = TinyGPT2Block(conv1d())
    twin = TinyGPT2Block(LinearAsConv1D)
    with torch.no_grad():
        for layer in ("c_attn", "c_proj", "c_fc"):
            getattr(twin, layer).linear.weight.copy_(getattr(gpt2, layer).weight.T)
            getattr(twin, layer).linear.bias.copy_(getattr(gpt2, layer).bias)
        twin.wte.weight.copy_(gpt2.wte.weight)
    opt, twin_opt = cls(param_groups(gpt2), lr=0.02, **hparams), cls(param_groups(twin), lr=0.02, **hparams)
    # The same gradients, transposed for the twin (a forward pass would differ in rounding between the layers).
    pairs = [(gpt2.wte.weight, twin.wte.weight, False), (gpt2.ln.weight, twin.ln.weight, False)]
    for layer in ("c_attn", "c_proj", "c_fc"):
        pairs += [(getattr(gpt2, layer).weight, getattr(twin, layer).linear.weight, True),
                  (getattr(gpt2, layer).bias, getattr(twin, layer).linear.bias, False)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q, transposed in pairs:
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.T.contiguous() if transposed else p.grad.clone()
        opt.step()
        twin_opt.step()
    for layer in ("c_attn", "c_proj", "c_fc"):
        torch.testing.assert_close(getattr(gpt2, layer).weight.T, getattr(twin, layer).linear.weight,
                                   atol=1e-5, rtol=1e-4)
    assert not torch.allclose(gpt2.c_proj.weight, TinyGPT2Block(conv1d()).c_proj.weight)


def test_param_groups_warns_when_no_hidden_matrix_is_found():
    class Custom(nn.Module):  # a library's own linear class, unknown to the default rule
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))

    model = nn.Sequential(Custom(), nn.LayerNorm(6))
    with pytest.warns(FallbackWarning, match="no hidden matrix.*every parameter trains with plain AdamW"):
        groups = param_groups(model)
    assert [g["algorithm"] for g in groups] == ["adamw"]


def test_param_groups_warns_about_2d_weights_that_go_to_adamw():
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(2, 3, 3), nn.Embedding(5, 4), nn.LayerNorm(6))
    with pytest.warns(FallbackWarning, match=r"1 weight\(s\) with ≥ 2 dimensions.*1\.weight") as record:
        param_groups(model)
    assert len(record) == 1  # the embedding and the norm go to AdamW as intended, without a warning


# --- batches of matrices (MoE experts) -------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", MATRIX_CONFIGS)
def test_moe_weight_updates_as_independent_matrices(name, foreach):
    """An E × out × in weight is E matrices: the same updates and states as E separate 2-D parameters."""
    cls, hparams = MATRIX_CONFIGS[name]
    experts, out_features, in_features = 3, 7, 5
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(experts, out_features, in_features))
    initial = stacked.detach().clone()
    separate = [nn.Parameter(stacked.detach()[e].clone()) for e in range(experts)]
    other = nn.Parameter(torch.randn(out_features, in_features))  # a 2-D matrix sharing the bucket
    other_twin = nn.Parameter(other.detach().clone())
    opt = cls([stacked, other], lr=0.05, foreach=foreach, **hparams)
    twin_opt = cls([*separate, other_twin], lr=0.05, foreach=foreach, **hparams)
    for grads in gradients([(experts, out_features, in_features), (out_features, in_features)], 4):
        stacked.grad, other.grad = grads[0].clone(), grads[1].clone()
        for e, p in enumerate(separate):
            p.grad = grads[0][e].clone()
        other_twin.grad = grads[1].clone()
        opt.step()
        twin_opt.step()
    for e, p in enumerate(separate):
        torch.testing.assert_close(stacked[e], p, atol=1e-5, rtol=1e-4)
        for key, value in twin_opt.state[p].items():
            if key not in ("step", "seed"):
                torch.testing.assert_close(opt.state[stacked][key][e], value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other, other_twin, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stacked, initial)  # the run moved the weights: the comparison was not vacuous


def test_moe_weight_checkpoint_round_trip():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 6, 5))
    optimizer = SUMO([weight], lr=0.05, rank=2, update_gap=2)
    for grads in gradients([(4, 6, 5)], 3):
        weight.grad = grads[0]
        optimizer.step()
    state = optimizer.state[weight]
    assert state["Q"].shape == (4, 6, 2) and state["M"].shape == (4, 2, 5) and state["seed"].shape == (4,)
    assert len(set(state["seed"].tolist())) == 4  # each expert its own sketch
    twin = nn.Parameter(weight.detach().clone())
    fresh = SUMO([twin], lr=0.05, rank=2, update_gap=2)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for grads in gradients([(4, 6, 5)], 3, seed=7):
        weight.grad, twin.grad = grads[0].clone(), grads[0].clone()
        optimizer.step()
        fresh.step()
    assert torch.equal(weight, twin)


# --- several devices and dtypes ----------------------------------------------------------------------


def test_mixed_dtypes_step_and_name_the_nonfinite_parameter():
    torch.manual_seed(0)
    params = {
        "fp32": nn.Parameter(torch.randn(6, 4)),
        "bf16": nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16)),
        "fp64": nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
        "bias": nn.Parameter(torch.randn(6, dtype=torch.bfloat16)),
    }
    optimizer = SUMO([{"params": list(params.items())[:3]},
                      {"params": [("bias", params["bias"])], "algorithm": "adamw"}], lr=0.05, rank=2)
    for p in params.values():
        p.grad = torch.randn_like(p)
    before = {k: p.detach().clone() for k, p in params.items()}
    optimizer.step()
    assert all(not torch.equal(before[k], p) for k, p in params.items())
    params["fp64"].grad[2, 1] = float("nan")
    snapshot = {k: p.detach().clone() for k, p in params.items()}
    with pytest.raises(FloatingPointError, match="non-finite gradient in fp64: 1 of 24"):
        optimizer.step()
    assert all(torch.equal(snapshot[k], p) for k, p in params.items())


def test_huge_finite_gradients_are_not_mistaken_for_nonfinite_ones():
    param = nn.Parameter(torch.randn(6, 4))
    optimizer = AdamW([param], lr=0.01)
    param.grad = torch.full((6, 4), 3e38)  # its 2-norm overflows fp32; every entry is finite
    param.grad[0, 0] = -3e38
    before = param.detach().clone()
    optimizer.step()  # no FloatingPointError
    assert not torch.equal(param, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parameters_on_cuda_and_cpu_in_one_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4).cuda())
    optimizer = SUMO(param_groups(model, rank=2), lr=0.05)
    x = torch.randn(3, 8)
    model[1](model[0](x).cuda()).square().sum().backward()
    optimizer.step()
    assert {p.device.type for p in optimizer.state} == {"cpu", "cuda"}
    for state in optimizer.state.values():
        assert all(state[k].device.type == "cpu" for k in ("step", "seed") if k in state)


# --- an all-zero gradient (DCP's state initialization) changes nothing ------------------------------------


@pytest.mark.parametrize("cls, hparams", [(SUMO, dict(rank=2, update_gap=5)), (GaLore, dict(rank=2, update_gap=5)),
                                          (SWAN, {}), (AdamW, {})])
def test_dcp_state_dict_before_the_first_step_changes_nothing(cls, hparams):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        return model, cls(param_groups(model), lr=0.05, **hparams)

    model, optimizer = build()
    twin, twin_opt = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's note that no process group is initialized
        saved = get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    if cls is not SWAN:
        assert all(int(state["step"]) == 0 for state in optimizer.state.values())  # no step was counted
        assert saved["state"]  # the state exists, so DCP can shard and load into it
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        for m, o in ((model, optimizer), (twin, twin_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key, value in twin_opt.state[q].items():
            assert torch.equal(optimizer.state[p][key], value), key


@pytest.mark.parametrize("cls", [SUMO, GaLore])
def test_a_zero_matrix_at_a_refresh_never_takes_a_coordinate_axis_subspace(cls):
    """An idle expert (exactly zero gradient) inside a batch: at the first refresh it gets a random orthonormal
    basis, at later ones it keeps its basis; its neighbours in the stack refresh from their gradients."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 5)) for _ in range(3)]
    optimizer = cls(params, lr=0.1, rank=2, update_gap=2)
    for step in range(4):
        for index, param in enumerate(params):
            param.grad = torch.zeros(8, 5) if index == 1 else torch.randn(8, 5)
        before = optimizer.state[params[1]]["Q"].clone()
        optimizer.step()
        for param in params:
            Q = optimizer.state[param]["Q"]
            torch.testing.assert_close(Q.mT @ Q, torch.eye(2), atol=1e-5, rtol=0)
        Q = optimizer.state[params[1]]["Q"]
        assert (Q.abs() > 1e-3).sum() > 2 * Q.shape[1]  # dense: not a selection of coordinate axes
        if step > 0:
            assert torch.equal(Q, before)  # kept across the refresh at step 2
    assert [int(optimizer.state[p]["step"]) for p in params] == [4, 4, 4]  # counted, as torch counts steps
    assert len({optimizer.state[p]["Q"].untyped_storage().data_ptr() for p in params}) == 1  # one stack still


# --- torch.optim conventions -------------------------------------------------------------------------------


def two_matrices():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))]


def test_load_state_dict_post_hooks_see_the_loaded_state():
    params = two_matrices()
    optimizer = SUMO([{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}], lr=0.1, rank=2)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    fresh = SUMO([{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}], lr=0.1, rank=2)
    seen = []

    def steps(opt):
        return sorted(int(state["step"]) for state in opt.state.values())

    fresh.register_load_state_dict_pre_hook(lambda opt, sd: seen.append(("pre", steps(opt))))
    fresh.register_load_state_dict_post_hook(lambda opt: seen.append(("post", steps(opt))))
    fresh.load_state_dict(saved)
    assert seen == [("pre", [0, 0]), ("post", [1, 1])]  # the state made at construction, then the loaded one


def test_tensor_lr_works_like_a_float_lr():
    results = []
    for lr in (0.05, torch.tensor(0.05)):
        params = two_matrices()
        optimizer = SUMO([{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}], lr=lr, rank=2)
        for grads in gradients([(6, 4), (5,)], 3):
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls, hparams", [(SUMO, dict(rank=2, update_gap=2)), (SWAN, {}), (GaLore, dict(rank=2)),
                                          (AdamW, {})])
def test_maximize_equals_minimizing_the_negated_objective(cls, hparams):
    results = []
    for maximize in (False, True):
        params = two_matrices()
        optimizer = cls([{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}], lr=0.05,
                        maximize=maximize, **hparams)
        for grads in gradients([(6, 4), (5,)], 3):
            for p, g in zip(params, grads):
                p.grad = -g if maximize else g
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], two_matrices()[0])


def test_slimopt_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamW(ours, lr=0.01, weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)
    for grads in gradients([(6, 4), (5,)], 5):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_stochastic_rounding_is_unbiased_and_bf16_training_keeps_small_updates():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of the way from 1 to the next bf16
    rounded = round_stochastically(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert round_stochastically(torch.tensor([float("inf"), -2.5])).tolist() == [float("inf"), -2.5]

    # An update of 1/8 ulp per step vanishes under round-to-nearest; stochastic rounding keeps it on average.
    finals = {}
    for stochastic in (False, True):
        param = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        optimizer = AdamW([param], lr=2**-10, weight_decay=0.0, stochastic_rounding=stochastic)
        for _ in range(32):
            param.grad = torch.full_like(param, -1.0)  # Adam's step is lr·1 after bias correction
            optimizer.step()
        finals[stochastic] = param.float().mean().item()
    assert finals[False] == 1.0
    assert finals[True] == pytest.approx(1.0 + 32 * 2**-10, rel=2e-3)


def test_stochastic_rounding_refuses_float16_weights():
    with pytest.raises(ValueError, match=r"stochastic_rounding=True supports bf16.*float16"):
        SWAN([nn.Parameter(torch.randn(4, 4, dtype=torch.float16))], stochastic_rounding=True)


def test_unknown_keyword_names_itself():
    with pytest.raises(TypeError, match="unexpected keyword argument 'amsgrad'"):
        SUMO([nn.Parameter(torch.randn(4, 4))], amsgrad=True)
    SUMO([nn.Parameter(torch.randn(4, 4))], fused=None, capturable=False)  # torch's defaults are accepted


# --- small ones -----------------------------------------------------------------------------------------------


def test_swan_gradnorm_eps_is_its_own_hyperparameter():
    grad = torch.randn(6, 9)
    grad[0] = 1e-3  # a constant row: its std is 0, so norm_eps alone sets its scale
    results = {}
    for adam_eps, norm_eps in ((1e-8, 1e-8), (1e-3, 1e-8), (1e-8, 1e-2)):
        param = nn.Parameter(torch.zeros(6, 9))
        optimizer = SWAN([param], lr=1.0, eps=adam_eps, norm_eps=norm_eps, whitening="eigh")
        param.grad = grad.clone()
        optimizer.step()
        results[(adam_eps, norm_eps)] = param.detach().clone()
    assert torch.equal(results[(1e-8, 1e-8)], results[(1e-3, 1e-8)])  # Adam's eps: the fallback only
    assert not torch.equal(results[(1e-8, 1e-8)], results[(1e-8, 1e-2)])


def test_rank_rtol_decides_which_directions_are_dropped():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))
    G = (U * torch.tensor([1.0, 0.5, 0.1, 1e-4], dtype=torch.float64)) @ V.T
    updates = {}
    for rtol in (None, 1e-3, 0.0):
        param = nn.Parameter(torch.zeros(8, 12))
        optimizer = SWAN([param], lr=1.0, whitening="eigh", rank_rtol=rtol)
        param.grad = G.T.float().contiguous()
        optimizer.step()
        updates[rtol] = torch.linalg.matrix_rank(param.detach().double(), rtol=1e-6).item()
    # rtol=0 keeps even the fp32 rounding noise of a rank-4 gradient, whitened to unit length: why a cut exists.
    # How many of the 4 noise directions clear matrix_rank's 1e-6 depends on the LAPACK build's rounding (all 4
    # on one CPU, 3 on another): more than the gradient's 4 is the point.
    assert updates[None] == 4 and updates[1e-3] == 3
    assert updates[0.0] > 4


def test_importing_rso_leaves_the_core_algorithm_table_alone():
    import slimopt.rso

    assert set(ALGORITHMS) == {"adamw", "adamw8bit", "adamw_factored", "apollo", "galore", "sumo", "swan"}
    assert SlimOptimizer.algorithms is ALGORITHMS
    assert "rso" in slimopt.rso.RSO.algorithms
    with pytest.raises(ValueError, match="algorithm='rso'"):
        SUMO([{"params": [nn.Parameter(torch.randn(3, 3))], "algorithm": "rso"}])


def test_rso_refuses_a_trainable_frozen_weight():
    from slimopt.rso import RSO

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    RSO(model, lr=1e-2, rank=2)
    model[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"W_k frozen.*slimopt\.rso\.merge"):
        model(torch.randn(2, 8))


@pytest.mark.parametrize("cls, hparams", [(SUMO, dict(rank=2, update_gap=10)), (GaLore, dict(rank=2, update_gap=10)),
                                          (AdamW, {})])
def test_an_idle_matrix_coasts_on_its_momentum_as_torch_optimizers_do(cls, hparams):
    """A gradient of exactly zero (an expert no token reached) is a step like any other: the moments carry the
    weight on, and its step is counted, so it stays in its stack."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 5)) for _ in range(2)]
    optimizer = cls(params, lr=0.1, weight_decay=0.0, **hparams)
    for step in range(3):
        for index, param in enumerate(params):
            param.grad = torch.zeros(8, 5) if (index == 1 and step == 2) else torch.randn(8, 5)
        before = params[1].detach().clone()
        optimizer.step()
    assert not torch.equal(params[1], before)  # moved on momentum alone
    assert [int(optimizer.state[p]["step"]) for p in params] == [3, 3]
