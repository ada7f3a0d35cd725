"""Which rank updates which parameter: balanced by cost, decided by every rank alike without talking.

Two layouts, told apart by the parameters themselves:
    "fsdp": FSDP2 DTensors, sharded on dim 0. Each matrix has an owner, which gathers the full gradient,
        runs the algorithm on the whole matrix and sends every rank its rows of the update; the owner alone
        holds the matrix's state. Elementwise parameters (the AdamW fallback) step on their local shards.
    "ddp": replicated parameters whose gradients DDP has already averaged, with ``process_group`` given.
        Every parameter has an owner, which steps it and sends its new value to the other ranks; the owner
        alone holds its state (as ZeRO-1).

Owners come from a longest-processing-time-first assignment of each parameter's cost
(:meth:`slimopt.optim.Algorithm.cost`), ties broken by name: a pure function of names, shapes and
hyperparameters, checked once to be the same on every rank.

Under FSDP2 the matrices are cut, in parameter order and across shapes, into buckets of at most
``world × max(max_stack_bytes, largest matrix)`` bytes of fp32 gradients, and the owners are balanced within
each bucket: a bucket is one all-to-all there and one back, every rank computes its share of it at the same
time, and a rank receives about ``max_stack_bytes`` (or one matrix, if larger) per bucket. Under DDP the owners
are balanced over all parameters at once, and the new values are broadcast in buckets of at most
``max_stack_bytes`` bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from slimopt.distributed.placement import check_placement, is_sharded
from slimopt.optim.stacking import HOST_STATE, chunk_by_bytes

MODES = ("ddp", "fsdp")


def assign_owners(costs: list[float], names: list[str], world: int, prior: list[float] | None = None) -> list[int]:
    """Greedy LPT: the costliest first, each to the least-loaded rank; among equals, the one with the least
    ``prior`` load (what earlier buckets gave it), then the lowest rank."""
    owners = [0] * len(costs)
    loads = [0.0] * world
    prior = prior or [0.0] * world
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], names[i])):
        rank = min(range(world), key=lambda r: (loads[r], prior[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def bucket_owners(sizes: list[int], costs: list[float], names: list[str], world: int,
                  max_bytes: int) -> tuple[list[list[int]], list[int]]:
    """FSDP2's exchange plan for matrices in parameter order: buckets (index lists) and each matrix's owner.

    A bucket holds at most ``world × max(max_bytes, largest matrix)`` bytes, so that every rank can own a
    matrix of it even when one matrix exceeds ``max_bytes`` (70B's MLP matrices: 0.9 GB each in fp32). Owners
    are balanced by cost within each bucket, ties going to the rank with the least load so far."""
    buckets = chunk_by_bytes(sizes, world * max(max_bytes, max(sizes, default=0)))
    owners = [0] * len(sizes)
    total = [0.0] * world
    for bucket in buckets:
        chosen = assign_owners([costs[i] for i in bucket], [names[i] for i in bucket], world, prior=total)
        for index, owner in zip(bucket, chosen):
            owners[index] = owner
            total[owner] += costs[index]
    return buckets, owners


@dataclass
class Plan:
    mode: str
    group: dist.ProcessGroup
    rank: int
    world: int
    owners: dict[int, int]  # id(param) → the rank that owns it (fsdp: matrices only)
    buckets: list[list[int]] = field(default_factory=list)  # fsdp: ids of the matrices exchanged together
    mesh: object = None  # fsdp: the params' 1-D device mesh
    finished: list = field(default_factory=list)  # the last step's collectives, kept until the next (engine.retire)

    def owner(self, param: torch.Tensor) -> int | None:
        return self.owners.get(id(param))

    def holds_state(self, param: torch.Tensor) -> bool:
        """This rank keeps the param's optimizer state: it owns it, or (fsdp, elementwise) holds a shard."""
        owner = self.owners.get(id(param))
        return owner == self.rank or (owner is None and self.mode == "fsdp")

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)


def build_plan(optimizer, process_group: dist.ProcessGroup | None) -> Plan | None:
    """The plan for ``optimizer``'s params, or None when one process updates everything (no sharded params
    and no ``process_group``, or a group of one rank)."""
    entries = [(group, index, param) for group in optimizer.param_groups for index, param in enumerate(group["params"])]
    sharded = [is_sharded(param) for _, _, param in entries]
    if any(sharded):
        if not all(sharded):
            group, index, _ = entries[sharded.index(False)]
            raise ValueError(
                f"the optimizer mixes FSDP2 DTensor parameters with plain ones ({optimizer.param_name(group, index)} "
                "is a plain tensor): shard the whole model with fully_shard, the root module included"
            )
        meshes = {param.device_mesh for _, _, param in entries}
        if len(meshes) > 1:
            raise NotImplementedError(f"the parameters are sharded over {len(meshes)} different device meshes; "
                                      "slimopt supports one 1-D FSDP2 mesh")
        for group, index, param in entries:
            check_placement(param, optimizer.param_name(group, index))
        mesh_group = meshes.pop().get_group()
        if process_group is not None and process_group != mesh_group:
            raise ValueError("process_group differs from the FSDP2 mesh's group; leave it None for FSDP2")
        mode, process_group = "fsdp", mesh_group
    elif process_group is None or dist.get_world_size(process_group) == 1:
        return None
    else:
        mode = "ddp"

    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    owned = []
    for group, index, param in entries:
        route = optimizer.route(param, group)
        if mode == "fsdp" and not route.algorithm.matrix and not route.algorithm.shards_like_param:
            raise ValueError(f"{optimizer.param_name(group, index)}: the {route.algorithm.name!r} state does not shard "
                             "like its parameter (FSDP2 steps elementwise groups on each rank's rows); use "
                             "'adamw' for this group under FSDP2, or DDP")
        if mode == "ddp" or route.algorithm.matrix:
            cost = route.algorithm.cost(route.shape, group) * route.count
            size = route.count * math.prod(route.shape) * torch.promote_types(param.dtype, torch.float32).itemsize
            owned.append((optimizer.param_name(group, index), tuple(param.shape), cost, size, param))
    names = [name for name, *_ in owned]
    if len(set(names)) != len(names):
        raise ValueError("two parameters share a name; give each param group unique 'param_names'")
    costs = [cost for _, _, cost, _, _ in owned]
    if mode == "fsdp":
        buckets, owners = bucket_owners([size for *_, size, _ in owned], costs, names, world,
                                        optimizer.max_stack_bytes)
    else:
        buckets, owners = [], assign_owners(costs, names, world)
    _check_same_on_every_rank(mode, [(name, shape, owner) for (name, shape, *_), owner in zip(owned, owners)],
                              process_group, world)
    return Plan(mode, process_group, rank, world, {id(item[-1]): owner for item, owner in zip(owned, owners)},
                [[id(owned[i][-1]) for i in bucket] for bucket in buckets],
                entries[0][2].device_mesh if mode == "fsdp" else None)


def _check_same_on_every_rank(mode: str, assignment: list, group, world: int) -> None:
    digest = hashlib.sha256(repr((mode, assignment)).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    differing = [rank for rank, other in enumerate(digests) if other != digest]
    if differing:
        raise ValueError(
            f"ranks {differing} built a different {mode} plan (parameter names, shapes, hyperparameters or owners) "
            "than this one: every rank must build the same model and optimizer"
        )


def state_bytes_here(optimizer) -> int:
    """Bytes of optimizer state this rank holds: full tensors it owns, its rows of sharded ones. Host-side
    counters (``step``, ``seed``: a few bytes on the CPU, replicated with sharded state) are left out."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key not in HOST_STATE:
                value = value.to_local() if is_sharded(value) else value
                if value.device.type != "meta":  # a placeholder of state held by another rank
                    total += value.numel() * value.element_size()
    return total
