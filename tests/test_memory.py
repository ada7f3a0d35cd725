"""`slimopt memory`: the analytic optimizer-state bytes equal the real ones exactly; activations and the step's
transient memory are close to measured."""

from dataclasses import replace

import pytest
import torch
from helpers import LiveBytes, measured_step_peak, stepped_optimizers

from slimopt.bench.memory import activation_bytes, estimate
from slimopt.rso import Projection
from slimopt.train.models import PRECISIONS, build_model, meta_model
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, build_optimizers, state_bytes

pytest.importorskip("transformers")

HP = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.0, rank=24, update_gap=5)


def real_state_bytes(name, dtype):
    """The state the optimizers hold after a step trained as ``slimopt train --dtype`` trains."""
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0, dtype=PRECISIONS[dtype].weights)
    return state_bytes(stepped_optimizers(name, model, HP, dtype)), model


@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_bytes_equal_the_built_optimizers(name, dtype):
    real, model = real_state_bytes(name, dtype)
    analytic = OPTIMIZERS[name].state_bytes(meta_model("tiny", 300, 32, PRECISIONS[dtype].weights), HP)
    assert analytic == real
    # The formula reads shapes only: the meta model and the real one give the same answer.
    if name != "rso":
        assert OPTIMIZERS[name].state_bytes(model, HP) == real


@pytest.mark.parametrize("dtype_name", list(PRECISIONS))
def test_estimate_uses_the_exact_state_and_parameter_counts(dtype_name):
    breakdown = estimate("tiny", "sumo", rank=24, update_gap=5, vocab_size=300, seq_len=32, dtype=dtype_name)
    real, model = real_state_bytes("sumo", dtype_name)
    assert breakdown.optimizer_state == real
    assert breakdown.parameters == sum(p.nbytes for p in model.parameters())
    assert breakdown.gradients == breakdown.parameters
    per_layer = estimate("tiny", "sumo", rank=24, vocab_size=300, seq_len=32, dtype=dtype_name, per_layer=True)
    assert per_layer.gradients == max(p.nbytes for p in model.parameters())
    backward = breakdown.activations + breakdown.backward_transient
    assert breakdown.total == breakdown.parameters + breakdown.optimizer_state + \
        max(backward, breakdown.gradients + breakdown.step_transient)


# (optimizer, micro-batch, dtype, activation checkpointing, chunked loss): each phase wins somewhere: backward's
# start (with HF's loss and the chunked one, over one chunk and two), the last layer's recompute, the step.
TRAINING_STEPS = [("adamw", 16, "fp32", False, True), ("adamw", 8, "fp32", False, False),
                  ("swan", 4, "fp32", True, True), ("sumo", 16, "bf16", False, True),
                  ("adamw", 2, "bf16-pure", True, True)]


@pytest.mark.parametrize("optimizer, batch, dtype, checkpointing, chunked", TRAINING_STEPS)
def test_estimate_matches_the_live_tensors_of_a_training_step(tmp_path, optimizer, batch, dtype, checkpointing,
                                                              chunked):
    """The Trainer's own step (forward, backward, optimizer step), its live tensors counted as CUDA's
    max_memory_allocated would count them; the CPU's RSS is benchmarks/memory_accuracy.py's."""
    from slimopt.train.loop import TrainConfig, Trainer
    config = TrainConfig(model="tiny", optimizer=optimizer, batch_size=batch, seq_len=128, dtype=dtype,
                         activation_checkpointing=checkpointing, chunked_loss=chunked, steps=4, device="cpu")
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.train_step()
    held = [*trainer.model.parameters(), *(value for opt in trainer.optimizers for state in opt.state.values()
                                           for value in state.values() if isinstance(value, torch.Tensor))]
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
    with LiveBytes(ignore=held) as live:
        trainer.train_step()
    measured = before + live.peak
    estimated = estimate("tiny", optimizer, batch_size=batch, seq_len=128, dtype=dtype, chunked_loss=chunked,
                         activation_checkpointing=checkpointing).total
    assert abs(estimated / measured - 1) <= 0.05, (estimated, measured)


def saved_activation_bytes(model, x, dtype="fp32") -> int:
    """Bytes of the distinct storages autograd saves for backward, the model's parameters and buffers left out."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = PRECISIONS[dtype].autocast
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)):
        model(input_ids=x, labels=x)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize("batch, seq_len", [(2, 64), (4, 32)])
def test_activation_estimate_is_within_5_percent_of_the_saved_tensors(batch, seq_len, dtype):
    model = build_model("tiny", vocab_size=512, seq_len=seq_len, seed=0, dtype=PRECISIONS[dtype].weights)
    x = torch.randint(0, 512, (batch, seq_len))
    measured = saved_activation_bytes(model, x, dtype)
    estimated = activation_bytes(model, batch, seq_len, dtype)
    assert abs(estimated - measured) / measured < 0.05, (estimated, measured)


def test_memory_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer='adam'"):
        estimate("tiny", "adam")
    with pytest.raises(ValueError, match="model='llama_7b'"):
        estimate("llama_7b", "adamw")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        estimate("tiny", "adamw", dtype="fp8")


@pytest.mark.parametrize("dtype", list(PRECISIONS))
def test_rso_parameters_and_activations_match_the_built_model(dtype):
    breakdown = estimate("tiny", "rso", rank=24, vocab_size=512, seq_len=64, batch_size=2, dtype=dtype)
    model = build_model("tiny", vocab_size=512, seq_len=64, seed=0, dtype=PRECISIONS[dtype].weights)
    dense_activations = saved_activation_bytes(model, torch.randint(0, 512, (2, 64)), dtype)
    build_optimizers("rso", model, HP)
    projections = {b.data_ptr(): b.nbytes for m in model.modules() if isinstance(m, Projection)
                   for b in m.buffers() if b.is_floating_point()}
    assert breakdown.parameters == sum(p.nbytes for p in model.parameters()) + sum(projections.values())
    assert breakdown.gradients == sum(p.nbytes for p in model.parameters() if p.requires_grad)
    measured = saved_activation_bytes(model, torch.randint(0, 512, (2, 64)), dtype)
    assert abs(breakdown.activations - measured) / measured < 0.05, (breakdown.activations, measured)
    assert measured < 0.85 * dense_activations


# Every optimizer with its default route ("auto": eigh on the CPU), and the polar route of SUMO's orthogonalizer and
# SWAN's whitening (the CUDA default).
ROUTES = [(name, "auto") for name in sorted(OPTIMIZERS)] + [("sumo", "polar"), ("swan", "polar")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16-pure"])
@pytest.mark.parametrize("name, route", ROUTES)
def test_step_transient_estimate_matches_the_measured_peak(name, route, dtype):
    """The temporaries of a step, measured as the peak of live tensor storages created inside optimizer.step(),
    against ``OptimizerEntry.step_bytes``: the largest over the steps of one update_gap cycle (plain steps 2 to 4,
    the subspace refresh at step 5, RSO's end of a subproblem in step 4), not the first (stacks and state exist by
    then)."""
    precision = PRECISIONS[dtype]
    hp = replace(HP, orthogonalizer=route)
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0, dtype=precision.weights)
    optimizers = build_optimizers(name, model, hp)
    peak = measured_step_peak(model, optimizers, HP.update_gap + 1, skip=2)
    estimated = OPTIMIZERS[name].step_bytes(meta_model("tiny", 300, 32, precision.weights), hp)
    slack = 4096  # step counters and other scalars
    assert 0.9 * peak - slack <= estimated <= 1.25 * peak + slack, (estimated, peak)
