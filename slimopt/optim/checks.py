"""Checks a step and a checkpoint make before they change anything: finite gradients, well-formed state.

Across ranks every collective here has the same shape on every rank: the gradient check reduces one slot per
gradient, in the optimizer's order, whatever each rank holds of it (0 for an empty FSDP2 shard).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from slimopt.distributed.placement import local


def largest_magnitudes(grads: list[torch.Tensor], across_ranks=None) -> list[float]:
    """max |g| of every gradient: NaN or Inf exactly when it has a non-finite entry, 0 exactly when it is all zero.

    One fused pass per (device, dtype) and one host transfer per device; unlike the 2-norm, the max-norm neither
    overflows on large finite entries nor underflows on tiny ones. Every gradient has a slot, an empty one 0, so
    ``across_ranks`` (which combines each device's maxima with the other ranks') reduces vectors of one length.
    """
    by_device = defaultdict(list)
    for position, grad in enumerate(grads):
        by_device[grad.device].append(position)
    largest = [0.0] * len(grads)
    for device, positions in by_device.items():
        # fp32 holds every bf16/fp16/fp32 max exactly; fp64 gradients keep fp64.
        dtype = torch.float64 if any(grads[p].dtype == torch.float64 for p in positions) else torch.float32
        norms = torch.zeros(len(positions), dtype=dtype, device=device)
        by_dtype = defaultdict(list)
        for slot, position in enumerate(positions):
            if grads[position].numel() > 0:
                by_dtype[grads[position].dtype].append(slot)
        for slots in by_dtype.values():
            maxima = torch._foreach_norm([grads[positions[s]] for s in slots], ord=float("inf"))
            norms[slots] = torch.stack(maxima).to(dtype)
        if across_ranks is not None:
            norms = across_ranks(norms)
        for position, value in zip(positions, norms.tolist()):
            largest[position] = value
    return largest


def max_over_ranks(group):
    """Elementwise max over the ranks of ``group``; NaN becomes Inf first, which MAX keeps on every backend."""
    def combine(norms: torch.Tensor) -> torch.Tensor:
        norms = torch.nan_to_num(norms, nan=math.inf)
        torch.distributed.all_reduce(norms, torch.distributed.ReduceOp.MAX, group=group)
        return norms
    return combine


def finite(value: float) -> bool:
    return value - value == 0  # False for NaN and ±Inf


def nonfinite_gradient_error(name: str, grad: torch.Tensor) -> FloatingPointError:
    rows = local(grad)
    count = int((~torch.isfinite(rows)).sum())
    where = f"{count} of {rows.numel()} entries" + (" on this rank" if rows is not grad else "")
    return FloatingPointError(f"non-finite gradient in {name}: {where} are NaN or Inf; nothing was updated "
                              "(pass skip_nonfinite=True to skip such steps)")


def check_saved_state(where: str, saved: dict, expected: dict) -> None:
    """Raise ValueError unless ``saved`` has exactly the keys, shapes and kinds of ``expected`` (meta tensors)
    and finite values."""
    if set(saved) != set(expected):
        raise ValueError(f"{where} has keys {sorted(saved)}, expected {sorted(expected)}")
    for key, reference in expected.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if key == "step" and value.is_floating_point() and value.shape == reference.shape == ():
            # torch.optim counts steps in a float32 tensor: a whole count loads as slimopt's int64 one
            if not float(value).is_integer():
                raise ValueError(f"{where}: step={float(value)} is not a whole number of steps")
        elif value.shape != reference.shape or value.is_floating_point() != reference.is_floating_point():
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"expected shape {tuple(reference.shape)} and dtype {reference.dtype}"
            )
        if value.is_floating_point() and key != "step" and not bool(torch.isfinite(local(value)).all()):
            raise ValueError(f"{where}: {key!r} contains NaN or Inf")
        if key == "step" and int(value) < 0:
            raise ValueError(f"{where}: step={int(value)} is negative")
