"""Workers for tests/test_distributed.py: each runs in every rank of a spawned gloo group on CPU.

A worker compares the distributed run with the same run in one process, computed in the same worker (a plain
model and an optimizer without process group take the single-process path), and raises on any mismatch:
``torch.multiprocessing`` re-raises it in the test.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import slimopt
from slimopt.distributed import checkpoint as dcp_checkpoint
from slimopt.distributed import state_bytes_here
from slimopt.rso import RSO, apply

STEPS = 6
BATCH, SEQ = 4, 12
# Odd sizes, so that FSDP2's shards are uneven (67 rows → 34 + 33, 12 → 6 + 6, 40 → 20 + 20).
CONFIG = dict(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
# Every optimizer the engine must carry, each with a subspace refresh (update_gap=3) inside the 6 steps.
SETUPS = {
    "sumo": lambda groups, **kw: slimopt.SUMO(groups, lr=1e-2, rank=4, update_gap=3, **kw),
    "sumo_svd": lambda groups, **kw: slimopt.SUMO(groups, lr=1e-2, rank=4, update_gap=3, subspace="svd", **kw),
    "swan": lambda groups, **kw: slimopt.SWAN(groups, lr=1e-3, **kw),
    "galore": lambda groups, **kw: slimopt.GaLore(groups, lr=1e-2, rank=4, update_gap=3, **kw),
    "adamw": lambda groups, **kw: slimopt.AdamW(groups, lr=1e-2, **kw),
}


def run(rank: int, world: int, tmp: str, worker, args) -> None:
    torch.set_num_threads(1)  # equal thread counts: the same reduction orders in every process
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=90))
    try:
        worker(rank, world, tmp, *args)
    finally:
        dist.destroy_process_group()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=generator) for _ in range(steps)]


def rows_of(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return batch.chunk(world)[rank]


def build(name: str, model, **options):
    if name == "rso":
        adaptation = model if isinstance(model, slimopt.rso.Adaptation) else apply(model, rank=4)
        return RSO(adaptation, lr=1e-2, update_gap=3, **options)
    return SETUPS[name](slimopt.param_groups(model, adamw={"lr": 3e-3}), **options)


def train(model, optimizer, data, start: int = 0, stop: int = STEPS, after_step=None) -> list[float]:
    losses = []
    for step in range(start, stop):
        loss = model(input_ids=data[step], labels=data[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses


def single_process(name: str) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    adapted = apply(model, rank=4) if name == "rso" else model
    optimizer = build(name, adapted)
    train(model, optimizer, batches())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def shard(model, mesh):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, torch.distributed.tensor.DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def fsdp_matches_single(rank, world, tmp, names, tolerance):
    mesh = init_device_mesh("cpu", (world,))
    data = [rows_of(b, rank, world) for b in batches()]
    report = {}
    for name in names:
        expected = single_process(name)
        model = tiny_llama()
        adaptation = apply(model, rank=4) if name == "rso" else None
        shard(model, mesh)
        optimizer = build(name, adaptation or model)
        train(model, optimizer, data)
        report[name] = max_difference(full_state(model), expected)
    if rank == 0:
        torch.save(report, os.path.join(tmp, "report.pt"))
    for name, difference in report.items():
        assert difference <= tolerance, f"{name}: FSDP2 differs from one process by {difference:.3g}"


def ddp_matches_single(rank, world, tmp, names, tolerance):
    data = [rows_of(b, rank, world) for b in batches()]
    report = {}
    for name in names:
        expected = single_process(name)
        model = tiny_llama()
        adaptation = apply(model, rank=4) if name == "rso" else None
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        options = {} if name == "rso" else {"process_group": dist.group.WORLD}
        optimizer = build(name, adaptation or model, **options)

        def same_on_every_rank(step):
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(g, flat) for g in gathered), f"{name}: ranks differ after step {step + 1}"

        train(ddp, optimizer, data, after_step=same_on_every_rank)
        report[name] = max_difference({k: v.detach() for k, v in model.state_dict().items()}, expected)
    if rank == 0:
        torch.save(report, os.path.join(tmp, "report.pt"))
    for name, difference in report.items():
        assert difference <= tolerance, f"{name}: DDP differs from one process by {difference:.3g}"


def state_split(rank, world, tmp, names):
    """Each rank holds state only for what it owns; the bytes over all ranks add up to one process's."""
    mesh = init_device_mesh("cpu", (world,))
    data = batches(1)
    for name in names:
        model = tiny_llama()
        single = build(name, model)
        train(model, single, data, stop=1)
        for layout in ("fsdp", "ddp"):
            model = tiny_llama()
            if layout == "fsdp":
                optimizer = build(name, shard(model, mesh))
            else:
                optimizer = build(name, model, process_group=dist.group.WORLD)
            plan = optimizer.plan()
            for group in optimizer.param_groups:
                for param in group["params"]:
                    stateful = optimizer._route(param, group).algorithm.stateful
                    assert bool(optimizer.state.get(param)) == (stateful and plan.holds_state(param)), (name, layout)
            here = torch.tensor([state_bytes_here(optimizer)])
            dist.all_reduce(here)
            assert here.item() == state_bytes_here(single), \
                f"{name} {layout}: {here.item()} bytes over the ranks, {state_bytes_here(single)} in one process"
