"""Which parameters slimopt can update across ranks, and which rows of a sharded one each rank holds.

FSDP2 (``fully_shard``) turns every parameter into a DTensor sharded on dim 0 over a 1-D mesh, with
``torch.chunk`` semantics: each rank holds ⌈rows / world⌉ consecutive rows, the last ones fewer, possibly
none. Anything else (tensor parallelism's ``Shard(1)``, 2-D meshes of HSDP or FSDP + TP, replicated
DTensors) is refused by name, before a step can fail deep inside a transform.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def check_placement(param: torch.Tensor, name: str) -> None:
    """Raise NotImplementedError, naming the parameter and its layout, unless it is plain or FSDP2's."""
    if not is_sharded(param):
        return
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{name} is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with placements {placements!r}: "
            "slimopt supports FSDP2's Shard(0) on a 1-D mesh only (not HSDP, tensor or expert parallelism)"
        )
    placement = placements[0]
    if type(placement) is not Shard or placement.dim != 0:
        raise NotImplementedError(
            f"{name} is a DTensor placed as {placement!r}: slimopt supports FSDP2's Shard(0) only (tensor "
            "parallelism's Shard(1), strided and replicated placements are not supported)"
        )


def row_counts(rows: int, world: int) -> list[int]:
    """Rows each rank holds of a dim-0 shard of ``rows`` rows (``torch.chunk`` semantics, as FSDP2)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world)]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds (a view: in-place updates reach the DTensor); a plain tensor is itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_shard_like(param: DTensor, local_tensor: torch.Tensor) -> DTensor:
    """``local_tensor`` (this rank's rows of a tensor shaped like ``param``) as a DTensor placed like it."""
    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
