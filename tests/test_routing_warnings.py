"""Warnings that save memory, once per optimizer: a rank that leaves no saving, and embeddings or heads handed
to a matrix algorithm (by name where names are known; slimopt.hf also by the model's own accessors)."""

import re
import warnings

import pytest
import torch
from torch import nn

import slimopt
from slimopt import SUMO, SWAN, GaLore, param_groups
from slimopt.optim import RoutingWarning

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def routing_warnings(build):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in record if issubclass(w.category, RoutingWarning)]


def state_bytes(optimizer, params):
    return sum(v.nbytes for p in params for v in optimizer.state[p].values())


@pytest.mark.parametrize("cls", [SUMO, GaLore])
def test_a_rank_at_or_above_the_smaller_side_warns_once_with_the_state_against_adamws(cls):
    model = tiny_llama()
    optimizer, messages = routing_warnings(lambda: cls(param_groups(model, rank=16), lr=1e-3))
    assert len(messages) == 1
    message = messages[0]
    assert f"{cls.__name__}'s rank=16 is ≥ the smaller side of 14 matrices" in message
    assert "model.layers.0.self_attn.q_proj.weight (16×16)" in message and "and 10 more" in message
    matrices = [p for g in optimizer.param_groups if g["algorithm"] != "adamw" for p in g["params"]]
    state = state_bytes(optimizer, matrices)
    adamw = sum(2 * p.numel() * 4 + 8 for p in matrices)
    assert f"their state takes {state:,} bytes against AdamW's {adamw:,} bytes ({state / adamw:.2f}×)" in message
    assert "A rank below 16 makes all of them low-rank" in message
    if cls is GaLore:
        assert state > adamw  # no saving at all


def test_a_rank_below_every_side_does_not_warn_and_neither_does_swan():
    model = tiny_llama()
    _, messages = routing_warnings(lambda: SUMO(param_groups(model, rank=8), lr=1e-3))
    assert messages == []
    _, messages = routing_warnings(lambda: SWAN(param_groups(model), lr=1e-3))
    assert messages == []


def test_the_rank_warning_counts_fused_experts_as_e_matrices():
    experts = nn.Parameter(torch.randn(4, 12, 6))
    optimizer, messages = routing_warnings(lambda: SUMO([{"params": [("experts.w", experts)], "rank": 6}]))
    assert len(messages) == 1 and "experts.w (4×12×6)" in messages[0]
    assert f"{state_bytes(optimizer, [experts]):,} bytes against AdamW's {2 * experts.numel() * 4 + 8:,}" \
        in messages[0]


def test_the_rank_warning_is_given_once_for_all_groups_of_one_optimizer():
    hf = pytest.importorskip("slimopt.hf")
    model = tiny_llama()
    _, messages = routing_warnings(lambda: hf.build_optimizer(model, "sumo", rank=1000, weight_decay=0.1))
    assert len(messages) == 1 and "rank=1000" in messages[0]


def test_per_layer_singles_do_not_repeat_the_rank_warning():
    from slimopt.train.optimizers import Hyperparameters, build_optimizers, split_per_parameter

    model = tiny_llama()
    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.0, rank=1000, update_gap=10)
    optimizers, messages = routing_warnings(lambda: build_optimizers("sumo", model, hp))
    assert len(messages) == 1
    _, messages = routing_warnings(lambda: split_per_parameter(optimizers))
    assert messages == []


@pytest.mark.parametrize("named", ["named_parameters", "group of pairs"])
def test_embeddings_and_the_head_in_a_matrix_group_warn_once_by_name_with_the_fix(named):
    model = tiny_llama()
    params = (model.named_parameters() if named == "named_parameters"
              else [{"params": list(model.named_parameters())}])
    _, messages = routing_warnings(lambda: SUMO(params, lr=1e-3, rank=4))
    embedding = [m for m in messages if "embeddings or an output head" in m]
    assert len(embedding) == 1
    assert "model.embed_tokens.weight, lm_head.weight" in embedding[0]
    assert "not hidden matrices" in embedding[0]
    fix = re.search(r"Fix: (SUMO\(slimopt\.param_groups\(model\), \.\.\.\))", embedding[0]).group(1)
    _, messages = routing_warnings(lambda: eval(fix.replace("...", "lr=1e-3, rank=4"), {"SUMO": SUMO,
                                                                                         "slimopt": slimopt,
                                                                                         "model": model}))
    assert messages == []  # the fix as written: embeddings and head on AdamW, rank 4 below every side


def test_unnamed_model_parameters_get_one_warning_that_says_it_cannot_tell():
    """The documented limit: without names slimopt cannot see which matrix is the embedding. A matrix group that
    mixes matrices with 1-D parameters, as model.parameters() gives them, gets one warning with the fix."""
    model = tiny_llama()
    _, messages = routing_warnings(lambda: SUMO(model.parameters(), lr=1e-3, rank=4))
    assert len(messages) == 1
    assert "unnamed parameters" in messages[0] and "cannot tell" in messages[0]
    assert "SUMO(slimopt.param_groups(model), ...)" in messages[0]
    _, messages = routing_warnings(lambda: SUMO([p for p in model.parameters() if p.ndim == 2], lr=1e-3, rank=4))
    assert messages == []  # matrices only: nothing says they came from model.parameters()


def test_slimopt_hf_recognizes_a_head_by_the_models_accessor_whatever_its_name():
    hf = pytest.importorskip("slimopt.hf")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(64, 16)
            self.hidden = nn.Linear(16, 16)
            self.proj_out = nn.Linear(16, 64, bias=False)

        def get_input_embeddings(self):
            return self.table

        def get_output_embeddings(self):
            return self.proj_out

    model = Tiny()
    _, messages = routing_warnings(lambda: hf.build_optimizer(model, "sumo", rank=4))
    assert messages == []  # the default rule keeps the head on AdamW
    _, messages = routing_warnings(lambda: hf.build_optimizer(model, "sumo", rank=4,
                                                              target_modules=["hidden", "proj_out"]))
    assert len(messages) == 1 and "proj_out.weight" in messages[0] and "output head" in messages[0]
