"""State is tensors only: torch.save / torch.load(weights_only=True) round trips and resumes exactly."""

import copy
import io
import warnings

import pytest
import torch
from helpers import MixedShapes, matrix_group, run_steps

from slimopt import SUMO, SWAN, AdamW, GaLore
from slimopt.rso import RSO

CONFIGS = {
    "sumo": (SUMO, dict(rank=3, update_gap=3)),
    "sumo-exact": (SUMO, dict(rank=3, update_gap=3, subspace="svd", orthogonalizer="eigh")),
    "sumo-polar": (SUMO, dict(rank=3, update_gap=3, orthogonalizer="polar")),
    "sumo-polar-express": (SUMO, dict(rank=3, update_gap=3, orthogonalizer="polar_express")),
    "swan": (SWAN, {}),
    "swan-polar": (SWAN, dict(whitening="polar")),
    "swan-polar-express": (SWAN, dict(whitening="polar_express")),
    "galore": (GaLore, dict(rank=3, update_gap=3)),
    "sumo-adamw-lr": (SUMO, dict(rank=3, update_gap=3, lr_scale="adamw")),
    "swan-adamw-lr": (SWAN, dict(lr_scale="adamw")),
    "galore-adamw-lr": (GaLore, dict(rank=3, update_gap=3, lr_scale="adamw")),
}


def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def build(cls, hparams, dtype=torch.float32):
    torch.manual_seed(0)
    model = MixedShapes().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, cls(matrix_group(model), lr=0.02, **hparams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_resume_continues_bit_identically(name, dtype):
    cls, hparams = CONFIGS[name]
    # Uninterrupted: 7 steps, crossing the subspace refreshes at steps 3 and 6.
    model, optimizer = build(cls, hparams, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_steps(model, optimizer, 4, seed=1)
        checkpoint = save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        expected_losses = run_steps(model, optimizer, 3, seed=2)

        # Resumed: a fresh model and optimizer, loaded mid-subproblem.
        resumed_model, resumed = build(cls, hparams, dtype)
        resumed_model.load_state_dict(checkpoint["model"])
        resumed.load_state_dict(checkpoint["optimizer"])
        resumed_losses = run_steps(resumed_model, resumed, 3, seed=2)

    assert resumed_losses == expected_losses
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key in optimizer.state[p]:
            assert optimizer.state[p][key].dtype == resumed.state[q][key].dtype
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])


def test_state_dict_holds_only_tensors_and_plain_values():
    model, optimizer = build(SUMO, dict(rank=3))
    run_steps(model, optimizer, 2)
    state_dict = optimizer.state_dict()
    for per_param in state_dict["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in per_param.values())
    assert state_dict["param_groups"][0]["algorithm"] == "sumo"
    assert "param_names" in state_dict["param_groups"][0]


def test_skipped_step_count_survives_a_checkpoint():
    param = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = SUMO([param], skip_nonfinite=True)
    param.grad = torch.full((6, 4), float("nan"))
    optimizer.step()
    fresh = SUMO([param], skip_nonfinite=True)
    fresh.load_state_dict(save_and_load(optimizer.state_dict()))
    assert fresh.skipped_steps == 1


def corrupt(state_dict, mutate):
    broken = copy.deepcopy(state_dict)
    mutate(broken)
    return broken


def first_matrix_state(state_dict):
    return state_dict["state"][0]  # MixedShapes' first parameter is a1.weight


@pytest.mark.parametrize("mutation, message", [
    (lambda sd: first_matrix_state(sd).update(Q=torch.zeros(5, 5)), "'Q' has shape"),
    (lambda sd: first_matrix_state(sd).pop("M"), "has keys"),
    (lambda sd: first_matrix_state(sd)["M"].fill_(float("nan")), "'M' contains NaN"),
    (lambda sd: first_matrix_state(sd).update(step=torch.tensor(-3)), "step=-3"),
    (lambda sd: first_matrix_state(sd).update(Q="not a tensor"), "'Q' is a str"),
    (lambda sd: sd["param_groups"][0].update(rank=0), "rank=0"),
    (lambda sd: sd["param_groups"][0].update(algorithm="adam"), "algorithm='adam'"),
    (lambda sd: sd["param_groups"].append(sd["param_groups"][0]), "param groups"),
    (lambda sd: sd.pop("state"), "not an optimizer state dict"),
])
def test_corrupt_checkpoint_raises_and_changes_nothing(mutation, message):
    model, optimizer = build(SUMO, dict(rank=3))
    run_steps(model, optimizer, 2)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message) as error:
        optimizer.load_state_dict(corrupt(optimizer.state_dict(), mutation))
    if "state of" in str(error.value):
        assert "a1.weight" in str(error.value)  # names the parameter
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, per_param in before["state"].items():
        for key, value in per_param.items():
            assert torch.equal(after["state"][index][key], value)


def test_distributed_checkpoint_round_trip_resumes_identically(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = build(SUMO, dict(rank=3, update_gap=3))
    run_steps(model, optimizer, 4)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp_path)
    expected = run_steps(model, optimizer, 3, seed=5)

    fresh_model, fresh = build(SUMO, dict(rank=3, update_gap=3))
    target = {"model": get_model_state_dict(fresh_model), "optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(target, checkpoint_id=tmp_path)
    fresh_model.load_state_dict(target["model"])
    set_optimizer_state_dict(fresh_model, fresh, target["optim"])
    assert run_steps(fresh_model, fresh, 3, seed=5) == expected


def build_any(name):
    """Every slimopt optimizer on MixedShapes, refreshing (or resampling) its subspaces every 2 steps."""
    torch.manual_seed(0)
    model = MixedShapes()
    builders = {
        "sumo": lambda: SUMO(matrix_group(model), lr=0.02, rank=3, update_gap=2),
        "swan": lambda: SWAN(matrix_group(model), lr=0.02),
        "galore": lambda: GaLore(matrix_group(model), lr=0.02, rank=3, update_gap=2),
        "adamw": lambda: AdamW(model.parameters(), lr=0.02),
        "rso": lambda: RSO(model, lr=0.02, rank=3, update_gap=2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, builders[name]()


def assert_same_values(value, other):
    assert type(value) is type(other)
    if isinstance(value, torch.Tensor):
        assert value.dtype == other.dtype and value.device == other.device and torch.equal(value, other)
    elif isinstance(value, (dict, list, tuple)):
        assert len(value) == len(other)
        if isinstance(value, dict):
            assert value.keys() == other.keys()
            value, other = list(value.values()), list(other.values())
        for item, other_item in zip(value, other):
            assert_same_values(item, other_item)
    else:
        assert value == other


@pytest.mark.parametrize("name", ["sumo", "swan", "galore", "adamw", "rso"])
def test_every_state_dict_value_round_trips_through_a_weights_only_load(name):
    """torch.load(weights_only=True), as Trainer and accelerate load optimizers, accepts every value, after a
    step and after load_state_dict; host counters come back to the CPU from a dict moved to the device."""
    model, optimizer = build_any(name)
    run_steps(model, optimizer, 3)  # crosses the subspace refresh (RSO: the resample) at step 2
    state_dict = optimizer.state_dict()
    assert_same_values(save_and_load(state_dict), state_dict)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    moved = copy.deepcopy(state_dict)  # what accelerate's prepare(optimizer) loads
    for per_param in moved["state"].values():
        per_param.update({key: value.to(device) for key, value in per_param.items()})
    fresh_model, fresh = build_any(name)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(moved)
    for state in fresh.state.values():
        counters = [state[k] for k in ("step", "seed") if k in state]
        assert all(c.device.type == "cpu" and c.dtype == torch.int64 for c in counters)
    assert_same_values(save_and_load(fresh.state_dict()), state_dict)
    assert run_steps(fresh_model, fresh, 2, seed=1) == run_steps(model, optimizer, 2, seed=1)
