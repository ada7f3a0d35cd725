"""MoE routing: the fused 3-D experts of transformers 5.x (Mixtral, Qwen2-MoE, Qwen3-MoE) go to the matrix
algorithm as E matrices, routers and gates stay on AdamW, and ``is_matrix`` sees parameter names."""

import re
import warnings

import pytest
import torch
from torch import nn

from slimopt import SUMO, param_groups
from slimopt.optim import FallbackWarning
from slimopt.transforms.subspace import sketch_seed

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
EXPERTS = 4
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_local_experts=EXPERTS, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=24, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=EXPERTS, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=24, moe_intermediate_size=24, num_experts=EXPERTS, num_experts_per_tok=2,
                       head_dim=16)),
}
# Routers and gates: E × hidden scores (Qwen2-MoE's shared-expert gate is 1 × hidden).
ROUTERS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


def tiny_moe(kind):
    config_name, model_name, extra = MODELS[kind]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**COMMON, **extra))


def fused_experts(model):
    return {n: p for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3}


@pytest.mark.parametrize("kind", MODELS)
def test_installed_transformers_fuses_experts_out_in(kind):
    """The layout the routing assumes: E × out × in per expert, read by F.linear (not transposed)."""
    model = tiny_moe(kind)
    experts = model.model.layers[0].mlp.experts
    h, i = COMMON["hidden_size"], MODELS[kind][2]["moe_intermediate_size" if kind != "mixtral" else
                                                  "intermediate_size"]
    assert experts.gate_up_proj.shape == (EXPERTS, 2 * i, h)
    assert experts.down_proj.shape == (EXPERTS, h, i)
    assert getattr(experts, "is_transposed", False) is False


@pytest.mark.parametrize("kind", MODELS)
def test_param_groups_route_fused_experts_to_the_matrix_group_and_routers_to_adamw(kind):
    model = tiny_moe(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        groups = param_groups(model, rank=4)
        matrices = groups[0]
        matrix_names, other_names = ({n for n, _ in g["params"]} for g in groups)
        optimizer = SUMO(groups, lr=1e-3)  # the optimizer's per-parameter check warns about no expert either
    assert matrices["layout"] == "out_in"  # the default, set by the optimizer
    assert set(fused_experts(model)) <= matrix_names
    assert len(fused_experts(model)) == 2 * COMMON["num_hidden_layers"]
    routers = {n for n in other_names if n.endswith(ROUTERS)}
    assert len(routers) == COMMON["num_hidden_layers"] * (2 if kind == "qwen2_moe" else 1)
    assert not {n for n in matrix_names if n.endswith(ROUTERS)}
    assert "model.embed_tokens.weight" in other_names and "lm_head.weight" in other_names
    down = model.model.layers[0].mlp.experts.down_proj
    assert optimizer.state[down]["Q"].shape[0] == EXPERTS  # E matrices, state stacked


@pytest.mark.parametrize("kind", MODELS)
def test_build_optimizer_trains_a_tiny_moe_with_sumo_on_its_experts(kind):
    hf = pytest.importorskip("slimopt.hf")
    model = tiny_moe(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        optimizer = hf.build_optimizer(model, "sumo", lr=1e-2, weight_decay=0.1, rank=4, update_gap=2)
    algorithm = {n: g["algorithm"] for g in optimizer.param_groups for n in g["param_names"]}
    assert all(algorithm[n] == "sumo" for n in fused_experts(model))
    assert all(a == "adamw" for n, a in algorithm.items() if n.endswith(ROUTERS))
    before = {n: p.detach().clone() for n, p in fused_experts(model).items()}
    ids = torch.randint(0, COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in fused_experts(model).items() if not torch.equal(p, before[n])]
    assert moved, "no fused expert weight changed"  # experts no token reached have zero gradients
    state = optimizer.state[model.model.layers[0].mlp.experts.gate_up_proj]
    assert set(state) == {"Q", "M", "o_norm", "seed", "step"} and state["M"].shape[:2] == (EXPERTS, 4)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("subspace", ["randomized", "svd"])
def test_sumo_updates_a_fused_expert_tensor_as_e_separate_matrices(layout, subspace):
    """Matrix k of a batched param is seeded sketch_seed(base, k), base = sketch_seed(seed, position): E separate
    matrices at positions 0..E-1 of a group seeded ``base`` get exactly those seeds, and stack alike."""
    E, out, inp = EXPERTS, 48, 32
    torch.manual_seed(0)
    separate = [nn.Parameter(torch.randn(out, inp)) for _ in range(E)]
    stored = torch.stack([p.detach() for p in separate])  # E × out × in
    fused = nn.Parameter(stored.mT.contiguous() if layout == "in_out" else stored.clone())
    hparams = dict(rank=4, update_gap=2, subspace=subspace)
    fused_opt = SUMO([{"params": [fused], "layout": layout, "seed": 7}], lr=1e-2, weight_decay=0.1, **hparams)
    separate_opt = SUMO([{"params": separate, "seed": sketch_seed(7, 0)}], lr=1e-2, weight_decay=0.1, **hparams)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):  # refreshes at steps 0, 2 and 4
        grads = torch.randn(E, out, inp, generator=generator)
        fused.grad = grads.mT.contiguous() if layout == "in_out" else grads.clone()
        for k, p in enumerate(separate):
            p.grad = grads[k].clone()
        fused_opt.step()
        separate_opt.step()
        as_out_in = fused.mT if layout == "in_out" else fused
        for k, p in enumerate(separate):
            assert torch.equal(as_out_in[k], p), f"expert {k} differs"
    assert not torch.equal(as_out_in, stored)


# ------------------------------------------------------------- is_matrix by parameter name


class Blocks(nn.Module):
    """A library's own MoE layer, unknown to the default rule: a fused E × out × in weight on a plain module."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.w1 = nn.Parameter(torch.randn(3, 16, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.norm(torch.einsum("bi,eoi->beo", h, self.w1).sum(1)[:, :8])


def test_the_fallback_warnings_suggested_fix_works_as_written():
    model = nn.Sequential(Blocks(), Blocks())
    with pytest.warns(FallbackWarning, match=r"2 weight\(s\).*0\.w1") as record:
        param_groups(model)
    fix = re.search(r"pass is_matrix=(lambda .*? or None)", str(record[0].message)).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        groups = param_groups(model, is_matrix=eval(fix))
    matrices = {n for g in groups if g.get("algorithm") != "adamw" for n, _ in g["params"]}
    assert matrices == {"0.up.weight", "1.up.weight", "0.w1", "1.w1"}  # the default rule still routes the Linears


def test_is_matrix_sees_parameter_names_and_may_choose_a_layout():
    model = nn.Sequential(Blocks())

    def rule(name, param, module):
        if name == "0.w1":
            return "in_out"
        if name == "0.up.weight":
            return False  # keep a Linear on AdamW
        return None

    groups = param_groups(model, is_matrix=rule)
    by_layout = {g.get("layout", "out_in") if g.get("algorithm") != "adamw" else "adamw": {n for n, _ in g["params"]}
                 for g in groups}
    assert by_layout == {"in_out": {"0.w1"}, "adamw": {"0.up.weight", "0.up.bias", "0.norm.weight", "0.norm.bias"}}
    with pytest.raises(ValueError, match=r"is_matrix.*returned 'sideways'"):
        param_groups(model, is_matrix=lambda name, param, module: "sideways")


def test_the_module_form_of_is_matrix_still_works_and_now_reaches_fused_experts():
    model = tiny_moe("mixtral")
    matrices, others = param_groups(model, is_matrix=lambda name, module: "experts" in name)
    assert {n for n, _ in matrices["params"]} == set(fused_experts(model))
    assert "model.layers.0.self_attn.q_proj.weight" in {n for n, _ in others["params"]}


def test_target_modules_reach_experts_by_module_name_but_not_routers():
    hf = pytest.importorskip("slimopt.hf")
    model = tiny_moe("qwen2_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        optimizer = hf.build_optimizer(model, "sumo", rank=4, target_modules=["mlp"])
    sumo = {n for g in optimizer.param_groups if g["algorithm"] == "sumo" for n in g["param_names"]}
    assert set(fused_experts(model)) <= sumo
    assert all(".mlp." in n for n in sumo) and not any(n.endswith(ROUTERS) for n in sumo)
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in sumo
