"""How a batched step moves memory: state kept stacked between steps, stacks bounded in bytes, the AdamW
fallback as one torch call."""

import io

import pytest
import torch
from helpers import MixedShapes, run_fixed_gradients
from torch import nn

import slimopt.optim.adamw
from slimopt import SUMO, SWAN, GaLore


def same_shape_matrices(count=3, shape=(16, 8)):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(shape)) for _ in range(count)]


def step_with_random_gradients(optimizer, params, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("cls, hparams", [(SUMO, dict(rank=3, update_gap=2)), (GaLore, dict(rank=3, update_gap=2))])
def test_state_stays_stacked_and_is_updated_in_place(cls, hparams):
    params = same_shape_matrices()
    optimizer = cls(params, lr=0.01, **hparams)
    step_with_random_gradients(optimizer, params, 1)
    keys = [k for k in optimizer.state[params[0]] if k != "step"]
    pointers = {(i, k): optimizer.state[p][k].data_ptr() for i, p in enumerate(params) for k in keys}
    # One storage per state key, shared by the three parameters' views.
    for key in keys:
        storages = {optimizer.state[p][key].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1, key
    step_with_random_gradients(optimizer, params, 3, seed=1)  # across a refresh (update_gap=2)
    assert pointers == {(i, k): optimizer.state[p][k].data_ptr() for i, p in enumerate(params) for k in keys}


def test_stacked_state_saves_each_value_once_and_resumes_identically():
    params = same_shape_matrices()
    optimizer = SUMO(params, lr=0.01, rank=3, update_gap=2)
    step_with_random_gradients(optimizer, params, 3)
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    assert buffer.tell() < 1.5 * state_bytes + 20_000  # the shared storage once, not once per parameter's view

    buffer.seek(0)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    twin_optimizer = SUMO(twin, lr=0.01, rank=3, update_gap=2)
    twin_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    step_with_random_gradients(optimizer, params, 3, seed=5)
    step_with_random_gradients(twin_optimizer, twin, 3, seed=5)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_a_parameter_that_skips_a_step_is_restacked_without_changing_results():
    params = same_shape_matrices()
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    optimizer = SUMO(params, lr=0.01, rank=3, update_gap=3)
    reference = SUMO(twin, lr=0.01, rank=3, update_gap=3, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for ps in (params, twin):
            for index, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (step == 2 and index == 1) else g.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_stacks_are_bounded_in_bytes(monkeypatch):
    params = same_shape_matrices(count=5, shape=(16, 8))
    optimizer = SWAN(params, lr=0.01, max_stack_bytes=2 * 16 * 8 * 4)  # room for two fp32 matrices
    algorithm = optimizer.algorithms["swan"]
    sizes = []
    original = type(algorithm).update

    def recording_update(self, G, state, group, step):
        sizes.append(G.shape[0])
        return original(self, G, state, group, step)

    monkeypatch.setattr(type(algorithm), "update", recording_update)
    step_with_random_gradients(optimizer, params, 1)
    assert sizes == [2, 2, 1]


def test_adamw_fallback_is_one_call_of_torchs_adamw(monkeypatch):
    calls = []
    original = slimopt.optim.adamw.torch_adamw

    def recording(params, *args, **kwargs):
        calls.append((len(params), kwargs["fused"]))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(slimopt.optim.adamw, "torch_adamw", recording)
    model = MixedShapes()
    fallback = [p for p in model.parameters() if p.ndim == 1]  # biases and the norm's weight and bias
    optimizer = SUMO([{"params": fallback, "algorithm": "adamw"}], lr=0.01)
    run_fixed_gradients(model, optimizer, 2)
    fused = torch.device("cpu").type in torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    assert calls == [(len(fallback), fused)] * 2
