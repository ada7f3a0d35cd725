"""param_groups on HF LLaMA models: hidden Linear weights to the matrix group, the rest to AdamW."""

import pytest
import torch
from torch import nn

from slimopt import SUMO, param_groups

transformers = pytest.importorskip("transformers")


def tiny_llama(tie: bool, cls=None):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tie, num_labels=3, pad_token_id=0,
    )
    torch.manual_seed(0)
    return (cls or transformers.LlamaForCausalLM)(config)


def names(group):
    return {name for name, _ in group["params"]}


HIDDEN = {f"model.layers.{i}.{kind}.weight" for i in range(2) for kind in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("tie", [False, True])
def test_llama_split(tie):
    model = tiny_llama(tie)
    matrices, others = param_groups(model, rank=4)
    assert matrices["rank"] == 4 and "algorithm" not in matrices
    assert others["algorithm"] == "adamw"
    assert names(matrices) == HIDDEN
    assert "model.embed_tokens.weight" in names(others)
    assert ("lm_head.weight" in names(others)) == (not tie)  # a tied head is the embedding, listed once
    assert "model.norm.weight" in names(others)
    every = [p for g in (matrices, others) for _, p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_tied_head_is_the_embedding_and_goes_to_adamw():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _, others = param_groups(model)
    assert any(p is model.lm_head.weight for _, p in others["params"])


def test_classification_head_goes_to_adamw():
    model = tiny_llama(False, transformers.LlamaForSequenceClassification)
    matrices, others = param_groups(model)
    assert "score.weight" in names(others) and names(matrices) == HIDDEN


def test_frozen_parameters_are_left_out():
    model = tiny_llama(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    matrices, _ = param_groups(model)
    assert "model.layers.0.self_attn.q_proj.weight" not in names(matrices)


def test_rule_and_adamw_hyperparameters_are_overridable():
    model = tiny_llama(False)
    matrices, others = param_groups(
        model, is_matrix=lambda name, module: isinstance(module, nn.Linear) and "mlp" in name,
        adamw={"lr": 3e-4}, algorithm="swan")
    assert names(matrices) == {n for n in HIDDEN if ".mlp." in n}
    assert matrices["algorithm"] == "swan"
    assert others["lr"] == 3e-4
    assert "model.layers.0.self_attn.q_proj.weight" in names(others)


def test_groups_drive_an_optimizer_and_name_parameters_in_errors():
    model = tiny_llama(False)
    optimizer = SUMO(param_groups(model, rank=4), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    model.model.layers[1].mlp.down_proj.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        optimizer.step()


def test_model_without_trainable_parameters_raises():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model)
