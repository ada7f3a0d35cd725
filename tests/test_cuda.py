"""On a GPU, the batched path gives what it gives on the CPU, and a step reads the device once. Skipped where
CUDA is absent (CI)."""

import warnings

import pytest
import torch
from helpers import MixedShapes, matrix_group

from slimopt import SUMO, SWAN, AdamW, GaLore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Exact subspaces only: a randomized sketch draws different numbers on each device.
CONFIGS = {
    "sumo-svd": (SUMO, dict(rank=3, update_gap=2, subspace="svd")),
    "sumo-eigh": (SUMO, dict(rank=3, update_gap=2, subspace="svd", orthogonalizer="eigh")),
    "sumo-polar": (SUMO, dict(rank=3, update_gap=2, subspace="svd", orthogonalizer="polar")),
    "swan": (SWAN, dict(whitening="newton_schulz", ns_steps=5)),
    "swan-polar": (SWAN, dict(whitening="polar")),
    "swan-auto": (SWAN, {}),  # polar on the GPU, eigh on the CPU: exact both, so they agree
    "galore": (GaLore, dict(rank=3, update_gap=2, subspace="svd")),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_matches_cpu(name, monkeypatch):
    cls, hparams = CONFIGS[name]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    models = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = models[device] = MixedShapes().to(device)
        optimizer = cls(matrix_group(model), lr=0.02, **hparams)
        generator = torch.Generator().manual_seed(0)  # gradients drawn on the CPU: the same on both devices
        for _ in range(4):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator).to(device)
            optimizer.step()
    for p, q in zip(models["cpu"].parameters(), models["cuda"].parameters()):
        torch.testing.assert_close(p, q.cpu(), atol=1e-4, rtol=1e-3)
    state = optimizer.state[models["cuda"].a1.weight]
    assert all(v.device.type == ("cpu" if k in ("step", "seed") else "cuda") for k, v in state.items())


def test_host_counters_return_to_the_cpu_after_a_load_that_moved_them():
    """accelerate's prepare() loads a state dict whose every tensor was moved to the GPU."""
    model = MixedShapes().cuda()
    optimizer = SUMO(matrix_group(model), lr=0.02, rank=3)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    moved = optimizer.state_dict()
    moved["state"] = {i: {k: v.cuda() for k, v in s.items()} for i, s in moved["state"].items()}
    optimizer.load_state_dict(moved)
    for state in optimizer.state.values():
        assert all(state[k].device.type == "cpu" for k in ("step", "seed") if k in state)


SYNC_CONFIGS = {
    "sumo": (SUMO, dict(rank=3, update_gap=100)),
    "galore": (GaLore, dict(rank=3, update_gap=100)),
    "swan": (SWAN, {}),
    "adamw": (AdamW, {}),
}


def count_syncs(function) -> int:
    """Synchronizing CUDA calls made by ``function``, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


@pytest.mark.parametrize("name", SYNC_CONFIGS)
def test_a_step_reads_the_device_once(name):
    """The finite check's one host read; no other sync between refreshes (a refresh's eigh checks convergence
    on the host, once per update_gap steps)."""
    cls, hparams = SYNC_CONFIGS[name]
    model = MixedShapes().cuda()
    optimizer = cls(matrix_group(model), lr=0.02, **hparams)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()  # the first step builds state and stacks and refreshes the subspaces
    torch.cuda.synchronize()
    assert count_syncs(optimizer.step) == 1
