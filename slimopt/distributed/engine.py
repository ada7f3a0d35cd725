"""The distributed step: whole-matrix work on owner ranks, the same maths as one process.

DDP (replicated params, averaged gradients): each rank steps the params it owns, exactly as one process
would, then every owner broadcasts the new values of its params (one flat buffer per owner and dtype).

FSDP2 (params sharded on dim 0): elementwise params step on their local rows. Matrices travel in the
optimizer's own chunks of same-shape matrices (bounded by ``max_stack_bytes``), two all-to-alls each:
    1. every rank sends each owner its rows of the owner's gradients; the owner concatenates full gradients;
    2. the owner runs the algorithm's batched update on them (its own state, full-matrix shaped);
    3. the owner sends every rank its rows of Δ, and each rank applies W ← W·(1 − lr·wd) − lr·Δ locally.
The next chunk's gather is in flight while the current one computes.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from slimopt.distributed.placement import local, row_counts
from slimopt.distributed.plan import Plan
from slimopt.optim.algorithm import read_lr
from slimopt.transforms.numerics import compute_dtype


def step_ddp(optimizer, plan: Plan, items) -> None:
    optimizer._step_here([item for item in items if plan.owner(item[1]) == plan.rank])
    by_owner = defaultdict(list)
    for _, param, _, _ in items:
        by_owner[(plan.owner(param), param.dtype, param.device)].append(param)
    pending = []
    for (owner, _, _), params in by_owner.items():
        if owner == plan.rank:
            flat = torch.cat([p.reshape(-1) for p in params])
        else:
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        work = dist.broadcast(flat, src=plan.global_rank(owner), group=plan.group, async_op=True)
        pending.append((owner, params, flat, work))
    for owner, params, flat, work in pending:
        work.wait()
        if owner != plan.rank:
            torch._foreach_copy_(params, [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]),
                                                                            params)])


def step_fsdp(optimizer, plan: Plan, items) -> None:
    if plan.world == 1:  # every row is here: the one-process step on the local tensors, nothing to exchange
        optimizer._step_here([(group, param, local(grad), route) for group, param, grad, route in items])
        return
    elementwise = [item for item in items if not item[3].algorithm.matrix]
    matrices = [item for item in items if item[3].algorithm.matrix]
    optimizer._step_here(elementwise)
    buckets = defaultdict(list)
    for item in matrices:
        group, param, _, route = item
        buckets[(id(group), route.algorithm.name, route.shape, param.dtype, param.device)].append(item)
    chunks = [chunk for bucket in buckets.values() for chunk in optimizer._chunks(bucket)]
    gathers = [_Exchange.gather(plan, chunks[0])] if chunks else []
    returns = []
    for index, chunk in enumerate(chunks):
        if index + 1 < len(chunks):
            gathers.append(_Exchange.gather(plan, chunks[index + 1]))
        deltas = _owner_deltas(optimizer, plan, chunk, gathers[index].finish())
        gathers[index] = None  # frees the received gradients once this chunk has used them
        returns.append(_Exchange.scatter(plan, chunk, deltas))
        del deltas  # the scatter holds what it sends
    for chunk, exchange in zip(chunks, returns):
        deltas = exchange.finish()
        group = chunk[0][0]
        optimizer._apply_update([local(param) for _, param, _, _ in chunk], deltas, read_lr(group["lr"]),
                                group["weight_decay"])


def _owner_deltas(optimizer, plan: Plan, chunk, full_grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Δ of the matrices this rank owns in ``chunk``, in chunk order, each run with its own step count."""
    owned = [(group, param, grad, route) for (group, param, _, route), grad in
             zip([item for item in chunk if plan.owner(item[1]) == plan.rank], full_grads)]
    by_step = defaultdict(list)
    for position, item in enumerate(owned):
        by_step[int(optimizer.state[item[1]].get("step", 0))].append(position)
    deltas = [None] * len(owned)
    for step, positions in by_step.items():
        algorithm = owned[positions[0]][3].algorithm
        shape = owned[positions[0]][3].shape
        for position, delta in zip(positions, optimizer._deltas(algorithm, shape, step,
                                                                        [owned[p] for p in positions])):
            deltas[position] = delta
    return deltas


class _Exchange:
    """One all-to-all of a chunk's rows in flight; ``finish`` waits and returns what this rank received."""

    def __init__(self, work, received: torch.Tensor, assemble):
        self.work, self.received, self.assemble = work, received, assemble

    def finish(self) -> list[torch.Tensor]:
        self.work.wait()
        return self.assemble(self.received)

    @classmethod
    def gather(cls, plan: Plan, chunk) -> _Exchange:
        """Rows of every gradient to its owner; the owner gets the full gradients of its matrices."""
        layout = _RowLayout(plan, chunk)
        send = [[local(grad).reshape(-1) for _, param, grad, _ in chunk if plan.owner(param) == rank]
                for rank in range(plan.world)]
        counts = [[layout.rows[i][source] * layout.width[i] for i in layout.mine] for source in range(plan.world)]

        def assemble(received):
            pieces = iter(received.split([n for per_source in counts for n in per_source]))
            by_source = [[next(pieces) for _ in layout.mine] for _ in range(plan.world)]
            return [torch.cat([by_source[source][k] for source in range(plan.world)]).view(chunk[i][1].shape)
                    for k, i in enumerate(layout.mine)]

        return cls._start(plan, send, counts, chunk[0][1].dtype, chunk[0][1].device, assemble)

    @classmethod
    def scatter(cls, plan: Plan, chunk, deltas: list[torch.Tensor]) -> _Exchange:
        """Every rank's rows of the owners' Δs; each rank gets its rows of every matrix in the chunk."""
        layout = _RowLayout(plan, chunk)
        send = []
        for rank in range(plan.world):
            send.append([delta.reshape(layout.rows_total[i], -1)[layout.start[i][rank]:][:layout.rows[i][rank]]
                         .reshape(-1) for i, delta in zip(layout.mine, deltas)])
        owners = [plan.owner(param) for _, param, _, _ in chunk]
        counts = [[layout.rows[i][plan.rank] * layout.width[i] for i in range(len(chunk)) if owners[i] == source]
                  for source in range(plan.world)]

        def assemble(received):
            pieces = iter(received.split([n for per_source in counts for n in per_source]))
            by_source = {source: [next(pieces) for _ in per_source] for source, per_source in enumerate(counts)}
            taken = defaultdict(int)
            deltas_here = []
            for i, (_, param, _, _) in enumerate(chunk):
                piece = by_source[owners[i]][taken[owners[i]]]
                taken[owners[i]] += 1
                deltas_here.append(piece.view(local(param).shape))
            return deltas_here

        param = chunk[0][1]
        return cls._start(plan, send, counts, compute_dtype(param.dtype), param.device, assemble)

    @classmethod
    def _start(cls, plan: Plan, send, counts, dtype, device, assemble) -> _Exchange:
        outgoing = [torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device) for parts in send]
        send_buffer = torch.cat(outgoing).to(dtype)
        received = torch.empty(sum(map(sum, counts)), dtype=dtype, device=device)
        work = dist.all_to_all_single(received, send_buffer, [sum(c) for c in counts], [t.numel() for t in outgoing],
                                      group=plan.group, async_op=True)
        return cls(work, received, assemble)


class _RowLayout:
    """Per matrix of a chunk: its rows on each rank (FSDP2's chunking of dim 0), where they start, and the
    elements per row; ``mine``: the chunk positions of the matrices this rank owns."""

    def __init__(self, plan: Plan, chunk):
        self.rows_total = [param.shape[0] for _, param, _, _ in chunk]
        self.rows = [row_counts(rows, plan.world) for rows in self.rows_total]
        self.start = [[sum(counts[:rank]) for rank in range(plan.world)] for counts in self.rows]
        self.width = [param.numel() // max(1, param.shape[0]) for _, param, _, _ in chunk]
        self.mine = [i for i, (_, param, _, _) in enumerate(chunk) if plan.owner(param) == plan.rank]
