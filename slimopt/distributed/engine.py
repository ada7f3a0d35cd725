"""The distributed step: whole-matrix work on owner ranks, the same maths as one process.

It drives the optimizer only through its engine interface (``route``, ``chunks``, ``run_chunk``,
``apply_update``, ``step_local``, ``lr_of``, ``step_of``, ``state_template``).

DDP (replicated params, averaged gradients): each rank steps the params it owns, exactly as one process would,
then the owners broadcast the new values, in buckets of at most ``max_stack_bytes`` in flight.

FSDP2 (params sharded on dim 0): elementwise params step on their local rows. Matrices travel in the plan's
buckets (across shapes, at most ``world × max_stack_bytes`` bytes each, owners balanced within each bucket),
with one all-to-all each way per bucket:
    1. every rank sends each owner its rows of the owner's gradients, from one buffer; the owners assemble
       the full gradients;
    2. every owner runs the algorithm's batched update on all the matrices it owns in the bucket at once
       (stacked by shape, its own state, full-matrix shaped);
    3. every owner sends each rank its rows of the Δs, and each rank applies W ← W·(1 − lr·wd) − lr·Δ locally.
The next bucket's gather is in flight while a bucket computes; a bucket's Δs are applied once the next
bucket's gather is issued, before that bucket computes, so at most one bucket's exchanges are held besides the
one computing.

Checkpoints (``share_state``, ``gather_state``): under FSDP2 each owner-held state tensor is presented as a
DTensor sharded on dim 0 over the params' mesh (scattered from its owner), so that torch's sharded and full
state dicts, and DCP, carry it like any FSDP2 state; loading gathers the rows back to the owner. Under DDP,
every rank gets every owner's state. Scalars travel in one ``all_gather_object``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from slimopt.distributed.placement import local, row_counts
from slimopt.distributed.plan import Plan
from slimopt.optim.stacking import HOST_STATE, chunk_by_bytes
from slimopt.transforms.numerics import compute_dtype


def retire(plan: Plan, work, *buffers: torch.Tensor) -> None:
    """Keep a finished collective's ``work`` until the next step, and free its ``buffers`` now.

    When ``wait()`` returns, gloo's worker thread may not have dropped its own reference to the Work yet. If it
    drops the last one, the Work's tensors are freed on that thread, which takes the GIL to free their Python
    objects; when the interpreter is already exiting, that aborts the process ("terminate called without an active
    exception", after a script has finished and destroyed its process group). Keeping a reference here makes this
    thread free them. Their memory goes at once: the buffers' storages shrink to nothing (they are used up)."""
    for buffer in buffers:
        buffer.untyped_storage().resize_(0)
    plan.finished.append(work)


# --------------------------------------------------------------------- DDP


def step_ddp(optimizer, plan: Plan, items) -> None:
    plan.finished.clear()  # the previous step's collectives: long released by gloo's threads
    optimizer.step_local([item for item in items if plan.owner(item[1]) == plan.rank])
    params = [param for _, param, _, _ in items]
    for chunk in chunk_by_bytes([p.numel() * p.element_size() for p in params], optimizer.max_stack_bytes):
        by_owner = defaultdict(list)  # in param order: the same on every rank
        for i in chunk:
            by_owner[(plan.owner(params[i]), params[i].dtype, params[i].device)].append(params[i])
        pending = []
        for (owner, dtype, device), owned in by_owner.items():
            if owner == plan.rank:
                flat = torch.cat([p.reshape(-1) for p in owned])
            else:
                flat = torch.empty(sum(p.numel() for p in owned), dtype=dtype, device=device)
            work = dist.broadcast(flat, src=plan.global_rank(owner), group=plan.group, async_op=True)
            pending.append((owner, owned, flat, work))
        for owner, owned, flat, work in pending:
            work.wait()
            if owner != plan.rank:
                torch._foreach_copy_(owned, [part.view_as(p) for part, p in
                                             zip(flat.split([p.numel() for p in owned]), owned)])
            retire(plan, work, flat)


# -------------------------------------------------------------------- FSDP2


def step_fsdp(optimizer, plan: Plan, items) -> None:
    plan.finished.clear()  # the previous step's collectives: long released by gloo's threads
    if plan.world == 1:  # every row is here: the one-process step on the local tensors, nothing to exchange
        optimizer.step_local([(group, param, local(grad), route) for group, param, grad, route in items])
        return
    optimizer.step_local([item for item in items if not item[3].algorithm.matrix])
    by_id = {id(item[1]): item for item in items if item[3].algorithm.matrix}
    buckets = [[by_id[i] for i in bucket if i in by_id] for bucket in plan.buckets]
    buckets = [bucket for bucket in buckets if bucket]
    gather = _Exchange.gather(plan, buckets[0]) if buckets else None
    applying = None
    for index, bucket in enumerate(buckets):
        current = gather
        gather = _Exchange.gather(plan, buckets[index + 1]) if index + 1 < len(buckets) else None
        if applying is not None:  # the previous bucket's Δs, before this one computes: its buffers are freed
            _apply(optimizer, plan, *applying)
        deltas = _owner_deltas(optimizer, plan, bucket, current.finish())
        current.retire(plan)
        del current
        applying = (bucket, _Exchange.scatter(plan, bucket, deltas))
        del deltas  # the scatter holds what it sends
    if applying is not None:
        _apply(optimizer, plan, *applying)


def _apply(optimizer, plan: Plan, bucket, scatter) -> None:
    deltas = scatter.finish()
    by_group = defaultdict(list)
    for item, delta in zip(bucket, deltas):
        by_group[id(item[0])].append((item, delta))
    for pairs in by_group.values():
        group = pairs[0][0][0]
        optimizer.apply_update([local(param) for (_, param, _, _), _ in pairs], [d for _, d in pairs],
                               optimizer.lr_of(group), group["weight_decay"])
    del deltas, by_group, pairs
    scatter.retire(plan)  # the Δs were views of what it received


def _owner_deltas(optimizer, plan: Plan, bucket, full_grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Δ of the matrices this rank owns in ``bucket``, in bucket order: all of them, stacked by shape (and
    step count) into the optimizer's bounded chunks."""
    owned = [(group, param, grad, route) for (group, param, _, route), grad in
             zip([item for item in bucket if plan.owner(item[1]) == plan.rank], full_grads)]
    runs = defaultdict(list)
    for position, (group, param, _, route) in enumerate(owned):
        runs[(id(group), route.algorithm.name, route.shape, param.dtype, optimizer.step_of(param))].append(position)
    deltas = [None] * len(owned)
    for positions in runs.values():
        _, param, _, route = owned[positions[0]]
        step = optimizer.step_of(param)
        for chunk in optimizer.chunks([owned[p] + (p,) for p in positions]):
            chunk_deltas = optimizer.run_chunk(route.algorithm, route.shape, step, [item[:4] for item in chunk])
            for item, delta in zip(chunk, chunk_deltas):
                deltas[item[4]] = delta
    return deltas


class _Exchange:
    """One all-to-all of a bucket's rows in flight; ``finish`` waits and returns what this rank received."""

    def __init__(self, work, sent: torch.Tensor, received: torch.Tensor, assemble):
        self.work, self.sent, self.received, self.assemble = work, sent, received, assemble

    def finish(self) -> list[torch.Tensor]:
        """Wait, free what was sent, and return what was received (a gather's as copies, a scatter's as views)."""
        self.work.wait()
        self.sent.untyped_storage().resize_(0)
        return self.assemble(self.received)

    def retire(self, plan: Plan) -> None:
        """Once what was received is used up: its memory goes, the Work is kept until the next step (:func:`retire`)."""
        retire(plan, self.work, self.sent, self.received)
        self.work = self.sent = self.received = None

    @classmethod
    def gather(cls, plan: Plan, bucket) -> _Exchange:
        """Rows of every gradient to its owner; the owner gets the full gradients of its matrices."""
        layout = _RowLayout(plan, bucket)
        send = [[local(grad).reshape(-1) for _, param, grad, _ in bucket if plan.owner(param) == rank]
                for rank in range(plan.world)]
        counts = [[layout.rows[i][source] * layout.width[i] for i in layout.mine] for source in range(plan.world)]

        def assemble(received):
            pieces = iter(received.split([n for per_source in counts for n in per_source]))
            by_source = [[next(pieces) for _ in layout.mine] for _ in range(plan.world)]
            return [torch.cat([by_source[source][k] for source in range(plan.world)]).view(bucket[i][1].shape)
                    for k, i in enumerate(layout.mine)]

        grad = bucket[0][2]
        return cls._start(plan, send, counts, grad.dtype, local(grad).device, assemble)

    @classmethod
    def scatter(cls, plan: Plan, bucket, deltas: list[torch.Tensor]) -> _Exchange:
        """Every rank's rows of the owners' Δs; each rank gets its rows of every matrix in the bucket."""
        layout = _RowLayout(plan, bucket)
        send = []
        for rank in range(plan.world):
            send.append([delta.reshape(layout.rows_total[i], -1)[layout.start[i][rank]:][:layout.rows[i][rank]]
                         .reshape(-1) for i, delta in zip(layout.mine, deltas)])
        owners = [plan.owner(param) for _, param, _, _ in bucket]
        counts = [[layout.rows[i][plan.rank] * layout.width[i] for i in range(len(bucket)) if owners[i] == source]
                  for source in range(plan.world)]

        def assemble(received):
            pieces = iter(received.split([n for per_source in counts for n in per_source]))
            by_source = {source: [next(pieces) for _ in per_source] for source, per_source in enumerate(counts)}
            taken = defaultdict(int)
            deltas_here = []
            for i, (_, param, _, _) in enumerate(bucket):
                piece = by_source[owners[i]][taken[owners[i]]]
                taken[owners[i]] += 1
                deltas_here.append(piece.view(local(param).shape))
            return deltas_here

        param = bucket[0][1]
        return cls._start(plan, send, counts, compute_dtype(param.dtype), local(param).device, assemble)

    @classmethod
    def _start(cls, plan: Plan, send, counts, dtype, device, assemble) -> _Exchange:
        """Copy what goes out into one buffer (destination by destination) and start the all-to-all."""
        sizes = [sum(part.numel() for part in parts) for parts in send]
        send_buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
        parts = [part for per_rank in send for part in per_rank]
        if parts:
            torch._foreach_copy_(list(send_buffer.split([part.numel() for part in parts])), parts)
        received = torch.empty(sum(map(sum, counts)), dtype=dtype, device=device)
        work = dist.all_to_all_single(received, send_buffer, [sum(c) for c in counts], sizes,
                                      group=plan.group, async_op=True)
        return cls(work, send_buffer, received, assemble)


class _RowLayout:
    """Per matrix of a bucket: its rows on each rank (FSDP2's chunking of dim 0), where they start, and the
    elements per row; ``mine``: the bucket positions of the matrices this rank owns."""

    def __init__(self, plan: Plan, bucket):
        self.rows_total = [param.shape[0] for _, param, _, _ in bucket]
        self.rows = [row_counts(rows, plan.world) for rows in self.rows_total]
        self.start = [[sum(counts[:rank]) for rank in range(plan.world)] for counts in self.rows]
        self.width = [param.numel() // max(1, param.shape[0]) for _, param, _, _ in bucket]
        self.mine = [i for i, (_, param, _, _) in enumerate(bucket) if plan.owner(param) == plan.rank]


# -------------------------------------------------------------- checkpoints


def share_state(optimizer, plan: Plan, packed: dict) -> dict:
    """The packed state (position → state, this rank's) with every owner-held state made visible to all ranks:
    FSDP2, a DTensor sharded on dim 0 per tensor; DDP, the full tensors. Collective."""
    shared, scalars = dict(packed), {}
    entries = [(group, param) for group in optimizer.param_groups for param in group["params"]]
    for position, (group, param) in enumerate(entries):
        owner = plan.owner(param)
        template = optimizer.state_template(param, group) if param.requires_grad else {}
        if owner is None or not template:
            continue  # FSDP2's elementwise state is sharded already; a stateless param has none
        mine = packed.get(position) if owner == plan.rank else None
        entry = {}
        for key in sorted(template):
            if template[key].ndim == 0 or key in HOST_STATE:  # host counters stay off the device
                if mine is not None:
                    scalars.setdefault(position, {})[key] = mine[key].tolist()
                continue
            device = local(param).device
            value = mine[key] if mine is not None else None
            if plan.mode == "fsdp":
                entry[key] = _scatter_rows(plan, owner, value, template[key], device)
            else:
                if value is None:
                    value = torch.empty(template[key].shape, dtype=template[key].dtype, device=device)
                value = value.contiguous()
                dist.broadcast(value, src=plan.global_rank(owner), group=plan.group)
                entry[key] = value
        shared[position] = entry
    everyone = [None] * plan.world
    dist.all_gather_object(everyone, scalars, group=plan.group)
    for per_rank in everyone:
        for position, values in per_rank.items():
            group, param = entries[position]
            template = optimizer.state_template(param, group)
            for key, value in values.items():
                device = "cpu" if key in HOST_STATE else local(param).device
                shared[position][key] = torch.tensor(value, dtype=template[key].dtype, device=device)
    return shared


def gather_state(optimizer, plan: Plan, saved: dict) -> dict:
    """``saved`` (param → state) with each DTensor of an owner-held state gathered to its owner, and what
    another rank holds dropped. Collective when the state holds DTensors (as ``share_state`` made them)."""
    gathered = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = saved.get(param) or {}
            owner = plan.owner(param)
            if owner is None:
                gathered[param] = state
                continue
            entry = {}
            for key in sorted(state):
                value = state[key]
                if isinstance(value, DTensor):
                    value = _gather_rows(plan, owner, value)
                if owner == plan.rank:
                    entry[key] = value
            gathered[param] = entry
    return gathered


def _scatter_rows(plan: Plan, owner: int, value, template: torch.Tensor, device) -> DTensor:
    """The owner's ``value`` as a DTensor sharded on dim 0 (torch.chunk rows) over the plan's mesh."""
    shape = template.shape
    rows = row_counts(shape[0], plan.world)
    chunk = max(rows)
    out = torch.empty((chunk, *shape[1:]), dtype=template.dtype, device=device)
    pieces = None
    if owner == plan.rank:
        pieces, start = [], 0
        for count in rows:
            piece = torch.zeros_like(out)
            piece[:count] = value[start:start + count]
            pieces.append(piece)
            start += count
    dist.scatter(out, pieces, src=plan.global_rank(owner), group=plan.group)
    mine = out[:rows[plan.rank]].contiguous()
    return DTensor.from_local(mine, plan.mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _gather_rows(plan: Plan, owner: int, value: DTensor) -> torch.Tensor | None:
    """The full tensor of a dim-0-sharded DTensor on the owner (None elsewhere)."""
    shape = value.shape
    rows = row_counts(shape[0], plan.world)
    chunk = max(rows)
    rows_here = value.to_local()
    padded = torch.zeros((chunk, *shape[1:]), dtype=rows_here.dtype, device=rows_here.device)
    padded[:rows_here.shape[0]] = rows_here
    pieces = [torch.empty_like(padded) for _ in range(plan.world)] if owner == plan.rank else None
    dist.gather(padded, pieces, dst=plan.global_rank(owner), group=plan.group)
    if owner != plan.rank:
        return None
    return torch.cat([piece[:count] for piece, count in zip(pieces, rows)])
