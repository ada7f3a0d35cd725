"""On a GPU, the batched path gives what it gives on the CPU. Skipped where CUDA is absent (CI)."""

import pytest
import torch
from helpers import MixedShapes, matrix_group

from slimopt import SUMO, SWAN, GaLore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Exact subspaces only: a randomized sketch draws different numbers on each device.
CONFIGS = {
    "sumo-svd": (SUMO, dict(rank=3, update_gap=2, subspace="svd")),
    "sumo-eigh": (SUMO, dict(rank=3, update_gap=2, subspace="svd", orthogonalizer="eigh")),
    "swan": (SWAN, dict(ns_steps=5)),
    "galore": (GaLore, dict(rank=3, update_gap=2)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_matches_cpu(name):
    cls, hparams = CONFIGS[name]
    torch.backends.cuda.matmul.allow_tf32 = False
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
