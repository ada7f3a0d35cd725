"""``slimopt train --parallel ddp|fsdp`` under torchrun: the process group, the wrapped model, each rank's rows.

Every rank builds the same model from the same seed and reads the same batch stream, keeping only its rows
of each global batch (``batch_size`` must divide by the world size), so positions stay equal on every rank
and a resume continues each rank's stream exactly. DDP wraps the model (gradients all-reduced) and slimopt's
optimizers split their work over the ranks (``process_group``); FSDP2 shards each decoder layer and the root
on a 1-D mesh, and slimopt's optimizers find the mesh in the parameters. Rank 0 logs and writes metrics.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class Ranks:
    mode: str
    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.chunk(self.world)[self.rank]


def join(parallel: str, device: torch.device) -> tuple[Ranks | None, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); returns the ranks and this rank's device."""
    if parallel == "none":
        return None, device
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--parallel {parallel} runs under torchrun, e.g. torchrun --nproc-per-node 2 -m slimopt "
                         "train ... (WORLD_SIZE is not set)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(parallel, dist.get_rank(), dist.get_world_size()), device


def leave(ranks: Ranks | None) -> None:
    """Tear the process group down together: a rank that exits while another still talks to it aborts
    (gloo: "terminate called without an active exception")."""
    if ranks is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks | None, device: torch.device) -> nn.Module:
    """The module to call in training: DDP around ``model``, or ``model`` itself sharded in place by FSDP2
    (each of HF's no-split blocks, the decoder layers, then the root)."""
    if ranks is None:
        return model
    if ranks.mode == "ddp":
        # P of RSO is redrawn from its seed on every rank: no buffer needs broadcasting. torch ≥ 2.13 names that
        # forward_sync_buffers and warns (FutureWarning, once per rank) about the old broadcast_buffers.
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                   else "broadcast_buffers")
        return ddp(model, device_ids=[device] if device.type == "cuda" else None, **{no_sync: False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def leader_first(ranks: Ranks | None, work):
    """Run ``work`` on rank 0, then on the others (which then find its cached result): no two ranks write
    one cache file at once."""
    if ranks is None:
        return work()
    if ranks.leader:
        result = work()
    dist.barrier()
    if not ranks.leader:
        result = work()
    return result


def mean_over_ranks(value: torch.Tensor, ranks: Ranks | None) -> torch.Tensor:
    if ranks is not None:
        value = value.clone()
        dist.all_reduce(value)
        value /= ranks.world
    return value


def any_rank(value: int, ranks: Ranks | None, device: torch.device) -> int:
    """The largest of every rank's ``value`` (e.g. a signal number, 0 for none), so that all ranks decide alike."""
    if ranks is None:
        return value
    agreed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


def gather(value, ranks: Ranks | None) -> list:
    if ranks is None:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values
