"""Checkpoints of a model and slimopt optimizers through torch.distributed.checkpoint (DCP).

The optimizer's state is keyed by parameter name, not position or owner: a matrix's state (Q m×r, M r×n,
shaped unlike its parameter) is written by the rank that owns it, under keys no other rank writes; state
sharded like an FSDP2 param is a DTensor, which DCP reshards. So a checkpoint loads into any world size,
any ownership and a single process: each rank reads the entries of the state it holds now. Hyperparameters
and ``skipped_steps`` (which torch's ``get_optimizer_state_dict`` drops) travel with it.

A checkpoint is published atomically: every rank writes into ``<path>.tmp``, and once all have finished,
rank 0 renames it to ``<path>``. A crash mid-save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

METADATA = "run.json"


def optimizer_state_dict(optimizer) -> dict:
    """This rank's state of ``optimizer`` by parameter name, its groups' hyperparameters (as JSON) and its
    count of skipped steps: what :func:`save` writes for it."""
    state = {}
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if optimizer.state.get(param) and optimizer.holds_state(param):
                state[optimizer.param_name(group, index)] = dict(optimizer.state[param])
    hyperparameters = [{k: _plain(v) for k, v in group.items() if k not in ("params", "param_names")}
                       for group in optimizer.param_groups]
    return {"state": state, "param_groups": json.dumps(hyperparameters),
            "skipped_steps": torch.tensor(optimizer.skipped_steps)}


def load_optimizer_state_dict(optimizer, saved: dict) -> None:
    """Install what :func:`optimizer_state_dict` gave (filled in by DCP), through the optimizer's own checked
    ``load_state_dict``: a corrupt entry raises and changes nothing."""
    positions, groups = {}, []
    for group, hyperparameters in zip(optimizer.param_groups, json.loads(saved["param_groups"]), strict=True):
        indices = []
        for index in range(len(group["params"])):
            positions[optimizer.param_name(group, index)] = len(positions)
            indices.append(len(positions) - 1)
        groups.append({**hyperparameters, "params": indices,
                       **({"param_names": group["param_names"]} if "param_names" in group else {})})
    state = {positions[name]: value for name, value in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups, "skipped_steps": int(saved["skipped_steps"])})


def save(path: str | Path, model: torch.nn.Module, optimizers: list, extra: dict | None = None,
         metadata: dict | None = None) -> None:
    """Write ``model``, ``optimizers`` and ``extra`` (tensors, numbers, strings) to the directory ``path``,
    and rank 0's ``metadata`` (JSON) beside them, readable without loading anything (:func:`read_metadata`).

    Every rank calls it. ``extra`` values that differ by rank need keys that differ by rank."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # a save that died half-way
    _barrier()
    dcp.save(_state(model, optimizers, extra or {}), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / METADATA).write_text(json.dumps(metadata or {}))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)  # from here until the next rename, a resume finds the previous one at .old
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def read_metadata(path: str | Path) -> dict:
    """The ``metadata`` that :func:`save` wrote; ValueError if ``path`` is no complete checkpoint."""
    try:
        return json.loads((Path(path) / METADATA).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error


def load(path: str | Path, model: torch.nn.Module, optimizers: list, extra: dict | None = None) -> dict:
    """Read ``path`` into ``model`` and ``optimizers``; returns ``extra`` filled in (pass the keys to read,
    with values of the right type and shape). A checkpoint that lacks something this run needs raises
    ValueError naming it."""
    for optimizer in optimizers:
        optimizer.create_state()
    state = _state(model, optimizers, extra or {}, copy=True)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # DCP reports a missing key or a shape mismatch as a CheckpointException
        raise ValueError(f"cannot load checkpoint {path}: {error}") from error
    set_model_state_dict(model, state["model"])
    for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
        load_optimizer_state_dict(optimizer, saved)
    return state["extra"]


def _state(model, optimizers, extra, copy: bool = False) -> dict:
    """What DCP reads and writes; ``copy``: fresh tensors to load into, so a failed load changes nothing."""
    state = {"model": get_model_state_dict(model), "optimizers": [optimizer_state_dict(o) for o in optimizers],
             "extra": dict(extra)}
    if copy:
        state = _clone(state)
    return state


def _clone(value):
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value.detach().clone() if torch.is_tensor(value) else value


def _plain(value):
    return value.item() if torch.is_tensor(value) else value


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
