"""Bad input raises a clear error naming the parameter and value, and changes nothing."""

import copy
import warnings

import pytest
import torch
from torch import nn

from slimopt import SUMO, SWAN, GaLore
from slimopt.optim import FallbackWarning


def matrix():
    return nn.Parameter(torch.randn(8, 6))


@pytest.mark.parametrize("cls, kwargs, message", [
    (SUMO, dict(lr=-0.1), "lr=-0.1"),
    (SWAN, dict(lr=-1e-3), "lr=-0.001"),
    (GaLore, dict(lr=float("nan")), "lr=nan"),
    (SUMO, dict(momentum=1.0), "momentum=1.0"),
    (SUMO, dict(momentum=-0.1), "momentum=-0.1"),
    (SUMO, dict(rank=0), "rank=0"),
    (GaLore, dict(rank=2.5), "rank=2.5"),
    (SUMO, dict(update_gap=0), "update_gap=0"),
    (GaLore, dict(update_gap=-5), "update_gap=-5"),
    (SUMO, dict(orthogonalizer="qr"), "orthogonalizer='qr'"),
    (SUMO, dict(subspace="random"), "subspace='random'"),
    (SUMO, dict(norm_growth_limit=0.5), "norm_growth_limit=0.5"),
    (SUMO, dict(perp_scale=-1.0), "perp_scale=-1.0"),
    (SWAN, dict(whitening="zca"), "whitening='zca'"),
    (SWAN, dict(ns_steps=0), "ns_steps=0"),
    (SWAN, dict(norm_eps=0.0), "norm_eps=0.0"),
    (SWAN, dict(rank_rtol=-1e-3), "rank_rtol=-0.001"),
    (SUMO, dict(rank_rtol=2.0), "rank_rtol=2.0"),
    (GaLore, dict(side="left"), "side='left'"),
    (SUMO, dict(maximize=1), "maximize=1"),
    (SUMO, dict(lr=torch.tensor([1e-3, 2e-3])), "lr=tensor"),
    (SWAN, dict(lr=torch.tensor(-1.0)), "lr=-1.0"),
    (SUMO, dict(fused=True), "fused=True.*foreach"),
    (SWAN, dict(capturable=True), "capturable=True"),
    (GaLore, dict(differentiable=True), "differentiable=True"),
    (GaLore, dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0"),
    (GaLore, dict(betas=0.9), "betas=0.9"),
    (SUMO, dict(weight_decay=-0.01), "weight_decay=-0.01"),
    (SUMO, dict(max_stack_bytes=0), "max_stack_bytes=0"),
])
def test_bad_hyperparameters_raise_value_error_naming_them(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([matrix()], **kwargs)


def test_unknown_algorithm_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"algorithm='lion'.*adamw.*galore.*sumo.*swan"):
        SUMO([{"params": [matrix()], "algorithm": "lion"}])


def test_bad_hyperparameter_set_after_construction_raises_before_any_update():
    param = matrix()
    optimizer = SUMO([param], lr=0.1)
    param.grad = torch.randn(8, 6)
    optimizer.step()
    before = param.detach().clone()
    state = copy.deepcopy(optimizer.state[param])
    optimizer.param_groups[0]["rank"] = 0
    param.grad = torch.randn(8, 6)
    with pytest.raises(ValueError, match="rank=0"):
        optimizer.step()
    assert torch.equal(param, before)
    assert all(torch.equal(v, state[k]) for k, v in optimizer.state[param].items())


def test_sparse_gradient_raises_type_error():
    param = matrix()
    optimizer = SWAN([param])
    param.grad = torch.randn(8, 6).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()


def test_complex_parameter_raises_type_error_when_the_optimizer_is_built():
    param = nn.Parameter(torch.randn(8, 6, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex parameters"):
        SUMO([param])


def zero3_partition():
    """A DeepSpeed ZeRO-3 parameter: an empty local tensor that carries the full shape as ds_shape."""
    param = nn.Parameter(torch.empty(0))
    param.ds_shape, param.ds_numel = torch.Size([8, 6]), 48
    return param


@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
@pytest.mark.parametrize("params", [
    lambda: [nn.Parameter(torch.randn(48))],  # ZeRO-1/2: the group's weights flattened into one 1-D partition
    lambda: [nn.Parameter(torch.randn(30)), nn.Parameter(torch.randn(18))],
    lambda: [matrix(), zero3_partition()],
], ids=["one-flat-partition", "flat-partitions", "zero3-ds_shape"])
def test_flattened_partitions_in_a_matrix_group_raise_instead_of_training_as_adamw(cls, params):
    with pytest.raises(ValueError, match=r"flattened partition.*DeepSpeed ZeRO.*would train it as AdamW"):
        cls(params(), lr=0.01)


def two_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))


@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing(cls, bad):
    model = two_layer_model()
    optimizer = cls([{"params": list(model.named_parameters())}], lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()  # state exists now
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())

    model.zero_grad()
    model(torch.randn(3, 6)).sum().backward()
    model[1].weight.grad[0, 0] = bad  # the second layer: the first would be updated before it if we were sloppy
    with pytest.raises(FloatingPointError, match=r"1\.weight.*1 of 32"):
        optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert_same_state(optimizer.state_dict(), state)


@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
def test_skip_nonfinite_skips_counts_and_changes_nothing(cls):
    model = two_layer_model()
    optimizer = cls(model.parameters(), lr=0.1, skip_nonfinite=True)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    model[0].bias.grad[2] = float("nan")
    optimizer.step()
    assert optimizer.skipped_steps == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    state["skipped_steps"] = 1
    assert_same_state(optimizer.state_dict(), state)
    # The next finite step proceeds normally.
    model.zero_grad()
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, weights["0.weight"])


def assert_same_state(actual, expected):
    assert actual["param_groups"] == expected["param_groups"]
    assert actual.get("skipped_steps") == expected.get("skipped_steps")
    assert actual["state"].keys() == expected["state"].keys()
    for index, per_param in expected["state"].items():
        for key, value in per_param.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)


@pytest.mark.parametrize("cls", [SUMO, SWAN, GaLore])
@pytest.mark.parametrize("shape, layout, routed", [
    ((0, 5), "out_in", True), ((5, 0), "out_in", True), ((1, 7), "out_in", True), ((7, 1), "out_in", True),
    ((1, 1), "out_in", True), ((), "out_in", True), ((4, 1, 6), "out_in", True),
    ((4, 3, 2), "out_in", False),  # a batch of four 3×2 matrices (MoE-style)
    ((4, 3, 2), "conv", False),  # a conv kernel: one 4×6 matrix
    ((4, 1, 1), "conv", True),  # a 4×1 conv kernel is no matrix
])
def test_degenerate_batched_and_conv_shapes_work(cls, shape, layout, routed):
    param = nn.Parameter(torch.randn(shape))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = cls([{"params": [param], "layout": layout}], lr=0.1)
        for _ in range(3):
            param.grad = torch.randn(shape)
            optimizer.step()
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]  # not the rank warning (rank 128)
    assert len(fallbacks) == (1 if routed else 0)
    assert set(optimizer.state[param]) >= ({"exp_avg", "exp_avg_sq"} if routed else set())
    assert torch.isfinite(param).all()
