"""The transient memory of an optimizer step, measured on fake tensors by running the step's own code.

``slimopt memory`` and the bench need the peak of the temporaries one step allocates (on top of the params,
gradients and state). Counting them by hand from each algorithm's code gives a copy of its allocation pattern that
drifts whenever the code changes. Here the code itself runs instead, on fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and devices, no memory), under a dispatch mode
that counts live storages the way ``tests/helpers.LiveBytes`` does on real tensors: each new output storage counts
its bytes from the op that creates it until its last tensor dies; storages of the inputs never count.

What runs:

* :func:`update_bytes`: an algorithm's batched ``update(G, state, group, step)`` on a fresh (count, m, n) stack
  and stacked fresh state, as ``SlimOptimizer`` calls it; the larger of a first step (0), a refresh step
  (``update_gap``) and a plain one (1), for algorithms that refresh;
* :func:`step_params_bytes`: an elementwise algorithm's ``step_params`` (the AdamW fallback) on one chunk;
* :func:`apply_bytes`: ``SlimOptimizer.apply_update`` on one chunk's Δs (fp32 copies of low-precision weights,
  stochastic rounding);
* :func:`optimizer_step_bytes`: a built optimizer's step, bucketed and chunked by the optimizer's own ``route`` and
  ``chunks``, as ``SlimOptimizer.step_local`` runs them one after another: its peak is the largest chunk's.

What fake tensors cannot run, and how it is handled:

* Host reads of device values (``aten._local_scalar_dense``: ``bool(t)``, ``t.item()``) have no value. The only one
  on these paths is the polar route's ``missed.any()`` on the CPU, which redoes by eigh the matrices whose
  certificate missed; it is read as False (the certificate passes, as it does on every gradient the tests see), so
  that exceptional redo is not estimated. Any other host read raises.
* Host state (the int64 subspace ``seed``, read with ``.tolist()``) is passed as real CPU tensors, as the optimizer
  keeps it; the random sketches' ``torch.Generator`` is a real one and costs nothing.
* Iteration counts are host values (the QDWH and polar_express schedules are fixed on the host from the shape
  and ``rank_rtol``), so every route runs exactly the iterations a real step runs.
* Kernel workspaces (LAPACK, cuSOLVER) are invisible, as they are to ``LiveBytes``.

The ``device`` of the fake tensors decides device-dependent choices, as on real ones: ``"auto"`` is "polar_express"
on CUDA and on a CPU with fast bf16 from a smaller side of 256, "eigh" otherwise (fake CUDA tensors need a CUDA
build of torch, for the sketches' generator and the device's capability).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from slimopt.optim.algorithm import Algorithm
from slimopt.optim.optimizer import HOST_STATE, SlimOptimizer
from slimopt.transforms.numerics import compute_dtype, round_stochastically

__all__ = ["LiveStorages", "UpdateBytes", "apply_bytes", "optimizer_step_bytes", "step_params_bytes", "update_bytes"]


def _key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (its StorageImpl), fake or real: views share it."""
    return tensor.untyped_storage()._cdata


class LiveStorages(TorchDispatchMode):
    """Peak bytes of the storages created while active and still alive, those of ``inputs`` left out.

    Entered inside a ``FakeTensorMode`` it sees every op before the fake mode does, so it counts the ops a real
    run dispatches, not the fake mode's decompositions. A host read of a fake boolean is answered False (see the
    module docstring); ``host_reads`` counts them."""

    def __init__(self, inputs=()):
        super().__init__()
        self.ignored = {_key(t) for t in inputs}
        self.live: dict[int, list[int]] = {}  # storage key: [bytes, tensors alive on it]
        self.current = self.peak = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._host_read(args[0])
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _host_read(self, tensor: torch.Tensor):
        if tensor.dtype != torch.bool:
            raise RuntimeError(f"slimopt.optim.transient: the step reads a {tensor.dtype} device value on the host; "
                               "fake tensors have none, so its transient memory cannot be estimated this way")
        self.host_reads += 1
        return False

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.ignored or storage.nbytes() == 0:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def _fake_mode() -> FakeTensorMode:
    # Real inputs (the host seeds) are allowed: the fake mode reads their metadata only.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):  # a tensor lr: its value does not change what a step allocates
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _hyperparameters(group: dict) -> tuple:
    """The group's hyperparameters, all of them (its params left out): the cache key, and the group ``update``
    sees (a tensor lr as a float)."""
    return tuple(sorted((k, _freeze(v)) for k, v in group.items() if k not in ("params", "param_names")))


def _group(hyperparameters: tuple) -> dict:
    group = dict(hyperparameters)
    if isinstance(group.get("lr"), tuple):
        group["lr"] = 1e-3
    return group


@dataclass(frozen=True)
class UpdateBytes:
    """Bytes on top of the stack G and the stacked state: ``peak`` while ``update`` runs; ``retained``, what is
    still alive once it returned and its new state was copied back (Δ when it is not written over G)."""

    peak: int
    retained: int


def _stacked_state(algorithm: Algorithm, shape, count: int, group: dict, dtype, device, mode) -> dict:
    """Fresh state stacked to (count, ...), as ``SlimOptimizer`` keeps it: fake, but for the host entries (the
    subspace seeds), which are real CPU tensors there as here."""
    with mode:
        state = algorithm.init_state(shape, group, dtype=dtype, device=device, seed=0)
        stacked = {key: torch.empty((count, *value.shape), dtype=value.dtype, device=device)
                   for key, value in state.items() if key not in HOST_STATE}
    stacked.update({key: torch.zeros((count, *value.shape), dtype=value.dtype)
                    for key, value in state.items() if key in HOST_STATE})
    return {key: stacked[key] for key in state}


def _steps(group: dict) -> tuple[int, ...]:
    """A first step, a refresh and a plain step for algorithms that refresh every ``update_gap`` steps."""
    gap = group.get("update_gap")
    return (0,) if gap is None else tuple(sorted({0, gap, 1}))


@functools.lru_cache(maxsize=4096)
def _update_bytes(algorithm: Algorithm, shape: tuple[int, int], count: int, hyperparameters: tuple, dtype,
                  device: str, step: int) -> UpdateBytes:
    group = _group(hyperparameters)
    mode = _fake_mode()
    with torch.no_grad(), mode:
        G = torch.empty((count, *shape), dtype=dtype, device=device)
    state = _stacked_state(algorithm, shape, count, group, dtype, device, mode)
    inputs = [G, *state.values()]
    with torch.no_grad(), mode, LiveStorages(inputs) as live:
        delta, new_state = algorithm.update(G, state, group, step)
        del new_state  # copied into the stacked state by the optimizer, then dropped
        retained = live.current
        del delta
    return UpdateBytes(peak=live.peak, retained=retained)


def update_bytes(algorithm: Algorithm, shape, count: int, group: dict, *, dtype=torch.float32,
                 device="cpu") -> UpdateBytes:
    """What ``algorithm.update`` allocates on a (count, *shape) stack of ``dtype`` (the compute dtype: fp32, or
    fp64 for fp64 weights), beyond the stack and the state: the larger, field by field, of a first step, a
    refresh (step ``update_gap``) and a plain step. Cached by (algorithm, shape, count, the group's hyperparameters,
    dtype, device)."""
    hyperparameters = _hyperparameters(group)
    runs = [_update_bytes(algorithm, tuple(shape), count, hyperparameters, dtype, str(device), step)
            for step in _steps(group)]
    return UpdateBytes(peak=max(r.peak for r in runs), retained=max(r.retained for r in runs))


@functools.lru_cache(maxsize=4096)
def _step_params_bytes(algorithm: Algorithm, shapes: tuple, dtype, hyperparameters: tuple, stochastic_rounding: bool,
                       device: str) -> int:
    group = _group(hyperparameters)
    mode = _fake_mode()
    with torch.no_grad(), mode:
        params = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        grads = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        states = [algorithm.init_state(shape, group, dtype=compute_dtype(dtype), device=device, seed=0)
                  for shape in shapes]
    inputs = [*params, *grads, *(v for state in states for v in state.values())]
    round_bf16 = (lambda x: round_stochastically(x)) if stochastic_rounding else None
    with torch.no_grad(), mode, LiveStorages(inputs) as live:
        algorithm.step_params(params, grads, states, group, 0, round_bf16=round_bf16)
    return live.peak


def step_params_bytes(algorithm: Algorithm, shapes, dtype, group: dict, *, stochastic_rounding: bool = False,
                      device="cpu") -> int:
    """What an elementwise algorithm's ``step_params`` allocates for params of these shapes and ``dtype``; cached
    by the hyperparameters it reads (``Algorithm.reads``: a key read but not declared fails the run loudly)."""
    if algorithm.reads is not None:
        group = {key: group[key] for key in algorithm.reads if key in group}
    return _step_params_bytes(algorithm, tuple(tuple(s) for s in shapes), dtype, _hyperparameters(group),
                              bool(stochastic_rounding), str(device))


def apply_bytes(optimizer: SlimOptimizer, shapes, dtype, weight_decay: float = 0.0, *, device="cpu") -> int:
    """What ``optimizer.apply_update`` allocates for params of these shapes and ``dtype``, their Δs given."""
    mode = _fake_mode()
    with torch.no_grad(), mode:
        params = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        deltas = [torch.empty(shape, dtype=compute_dtype(dtype), device=device) for shape in shapes]
    with torch.no_grad(), mode, LiveStorages([*params, *deltas]) as live:
        optimizer.apply_update(params, deltas, 1e-3, weight_decay, steps=[0] * len(params))
    return live.peak


def optimizer_step_bytes(optimizer: SlimOptimizer, *, device="cpu") -> int:
    """The transient peak of one ``optimizer.step()``: the largest over its chunks, which step one after another.

    A matrix chunk holds its fp32 gradient stack, plus the larger of ``update``'s peak and what ``update`` leaves
    alive plus ``apply_update``'s own temporaries; an elementwise chunk, its ``step_params`` temporaries. The
    params are grouped as ``SlimOptimizer.step_local`` groups them (group, algorithm, matrix shape, dtype) and
    chunked by the optimizer's own ``chunks``. Shapes only: the optimizer may be built on the meta device."""
    buckets = defaultdict(list)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not param.requires_grad:
                continue
            route = optimizer.route(param, group)
            shape = route.shape if route.algorithm.matrix else None
            buckets[(id(group), route.algorithm.name, shape, param.dtype)].append((group, param, None, route))
    if not optimizer.foreach:
        raise NotImplementedError("foreach=False steps one matrix at a time through the reference step; its "
                                  "transient memory is not estimated")
    peak = 0
    applying = {}  # apply_update's temporaries by (shapes, dtype, weight decay): the same for every same-shape chunk
    for (_, _, shape, dtype), bucket in buckets.items():
        group, algorithm = bucket[0][0], bucket[0][3].algorithm
        for chunk in optimizer.chunks(bucket):
            shapes = tuple(tuple(param.shape) for _, param, _, _ in chunk)
            if not algorithm.matrix:
                peak = max(peak, step_params_bytes(algorithm, shapes, dtype, group,
                                                   stochastic_rounding=optimizer.stochastic_rounding, device=device))
                continue
            count = sum(route.count for _, _, _, route in chunk)
            work = compute_dtype(dtype)
            stack = count * math.prod(shape) * work.itemsize
            update = update_bytes(algorithm, shape, count, group, dtype=work, device=device)
            key = (shapes, dtype, group["weight_decay"])
            if key not in applying:
                applying[key] = apply_bytes(optimizer, shapes, dtype, group["weight_decay"], device=device)
            peak = max(peak, stack + max(update.peak, update.retained + applying[key]))
    return peak
