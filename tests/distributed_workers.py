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
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
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
    # The exact routes: the bf16 route ("auto" on a CPU with fast bf16) is not reproducible to 1e-6 across
    # gradients that differ by an ulp, which is what a different reduction order gives (docs/numerics.md).
    "sumo": lambda groups, **kw: slimopt.SUMO(groups, lr=1e-2, rank=4, update_gap=3, orthogonalizer="eigh", **kw),
    "sumo_svd": lambda groups, **kw: slimopt.SUMO(groups, lr=1e-2, rank=4, update_gap=3, subspace="svd",
                                                  orthogonalizer="eigh", **kw),
    "swan": lambda groups, **kw: slimopt.SWAN(groups, lr=1e-3, whitening="eigh", **kw),
    "galore": lambda groups, **kw: slimopt.GaLore(groups, lr=1e-2, rank=4, update_gap=3, **kw),
    "adamw": lambda groups, **kw: slimopt.AdamW(groups, lr=1e-2, **kw),
}


def run(rank: int, world: int, tmp: str, store: str, worker, args) -> None:
    torch.set_num_threads(1)  # equal thread counts: the same reduction orders in every process
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        worker(rank, world, tmp, *args)
        dist.barrier()  # no rank tears the group down while another still talks to it
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


def rank_data(rank: int, world: int, split: bool) -> list[torch.Tensor]:
    """Each rank's batches: its rows of the global batch (split), or the whole batch on every rank."""
    return [rows_of(b, rank, world) if split else b for b in batches()]


def matches_single(rank, world, tmp, layout, names, split, tolerance):
    mesh = init_device_mesh("cpu", (world,))
    data = rank_data(rank, world, split)
    report = {}
    for name in names:
        expected = single_process(name)
        wrapped, model, optimizer = sharded_run(name, layout, mesh)
        check = (lambda step, model=model, name=name: same_on_every_rank(model, name)) if layout == "ddp" else None
        train(wrapped, optimizer, data, after_step=check)
        report[name] = max_difference(full_state(model), expected)
    finish(rank, tmp, report, tolerance, layout)


def same_on_every_rank(model, name: str) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, flat) for g in gathered), f"{name}: the ranks' parameters differ"


def finish(rank, tmp, report, tolerance, layout) -> None:
    if rank == 0:
        torch.save(report, os.path.join(tmp, "report.pt"))
    for name, difference in report.items():
        assert difference <= tolerance, f"{name}: {layout} differs from one process by {difference:.3g}"


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
                    stateful = optimizer.route(param, group).algorithm.stateful
                    real = any(v.device.type != "meta" for v in optimizer.state.get(param, {}).values())
                    assert real == (stateful and plan.holds_state(param)), (name, layout)
            here = torch.tensor([state_bytes_here(optimizer)])
            dist.all_reduce(here)
            assert here.item() == state_bytes_here(single), \
                f"{name} {layout}: {here.item()} bytes over the ranks, {state_bytes_here(single)} in one process"


def sharded_run(name: str, layout: str, mesh):
    """A fresh model and optimizer for ``layout`` ("fsdp", "ddp"); returns (model to call, model, optimizer)."""
    model = tiny_llama()
    adaptation = apply(model, rank=4) if name == "rso" else None
    if layout == "fsdp":
        shard(model, mesh)
        return model, model, build(name, adaptation or model)
    options = {} if name == "rso" else {"process_group": dist.group.WORLD}
    return DistributedDataParallel(model, broadcast_buffers=False), model, build(name, adaptation or model, **options)


def checkpoint_save(rank, world, tmp, names, layout):
    """Uninterrupted 6 steps (kept for the resumed run to match), and a run saved after step 3."""
    mesh = init_device_mesh("cpu", (world,))
    data = rank_data(rank, world, split=True)
    finals = {}
    for name in names:
        wrapped, model, optimizer = sharded_run(name, layout, mesh)
        train(wrapped, optimizer, data)
        finals[name] = full_state(model)
        wrapped, model, optimizer = sharded_run(name, layout, mesh)
        train(wrapped, optimizer, data, stop=3)
        dcp_checkpoint.save(os.path.join(tmp, f"{name}-{layout}"), model, [optimizer])
    if rank == 0:
        torch.save(finals, os.path.join(tmp, f"finals-{layout}.pt"))


def checkpoint_resume(rank, world, tmp, names, layout):
    """Fresh processes: load the step-3 checkpoint, take steps 4-6, and match the uninterrupted run exactly."""
    mesh = init_device_mesh("cpu", (world,))
    data = rank_data(rank, world, split=True)
    finals = torch.load(os.path.join(tmp, f"finals-{layout}.pt"))
    for name in names:
        wrapped, model, optimizer = sharded_run(name, layout, mesh)
        dcp_checkpoint.load(os.path.join(tmp, f"{name}-{layout}"), model, [optimizer])
        train(wrapped, optimizer, data, start=3)
        difference = max_difference(full_state(model), finals[name])
        assert difference == 0, f"{name} {layout}: resumed run differs by {difference:.3g}"


def reducer_bytes(rank, world, tmp):
    """Bytes DDP's reducer all-reduces per step, RSO against AdamW on the same model."""
    sent = {}
    for name in ("adamw", "rso"):
        model = tiny_llama()
        adaptation = apply(model, rank=4) if name == "rso" else None
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        counted = []

        def count(state, bucket, counted=counted):
            counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, count)
        optimizer = build(name, adaptation or model)
        train(ddp, optimizer, rank_data(rank, world, split=True), stop=2)
        sent[name] = sum(counted) / 2
        if name == "rso":
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            adapted_full = sum(layer.weight.numel() for layer in adaptation.layers.values())
            adapted_low = sum(layer.B.numel() for layer in adaptation.layers.values())
            total = trainable - adapted_low + adapted_full  # what AdamW trains: the same model, unadapted
            sent["expected_ratio"] = trainable / total
    if rank == 0:
        torch.save(sent, os.path.join(tmp, "report.pt"))


def guards(rank, world, tmp):
    """Unsupported layouts and misuse raise clearly, on every rank, without a hang."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    column_sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    expect(NotImplementedError, "Shard(dim=1)", lambda: slimopt.SUMO([column_sharded], rank=2))
    mesh_2d = init_device_mesh("cpu", (1, world))
    on_2d = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh_2d, [Shard(0), Shard(0)]))
    expect(NotImplementedError, "2-D device mesh", lambda: slimopt.SWAN([on_2d]))
    row_sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)]))
    expect(ValueError, "mixes FSDP2 DTensor parameters with plain ones",
           lambda: slimopt.SUMO([row_sharded, torch.nn.Parameter(torch.randn(4, 4))], rank=2))

    model = tiny_llama()
    optimizer = RSO(model, rank=4)
    shard(model, mesh)
    model(input_ids=batches(1)[0], labels=batches(1)[0]).loss.backward()
    expect(RuntimeError, "replaced after RSO was built", optimizer.step)
    expect(ValueError, "RSO does not take process_group",
           lambda: RSO(tiny_llama(), rank=4, process_group=dist.group.WORLD))


def nonfinite_on_one_rank(rank, world, tmp):
    """A NaN in one rank's rows only: every rank raises (or, with skip_nonfinite, skips) the same step."""
    mesh = init_device_mesh("cpu", (world,))
    for skip in (False, True):
        model = shard(tiny_llama(), mesh)
        optimizer = slimopt.SUMO(slimopt.param_groups(model), rank=4, skip_nonfinite=skip)
        data = batches(1)[0]
        model(input_ids=data, labels=data).loss.backward()
        before = full_state(model)
        weight = model.model.layers[0].mlp.up_proj.weight
        if rank == 1:
            weight.grad.to_local()[0, 0] = float("nan")
        if skip:
            optimizer.step()
            assert optimizer.skipped_steps == 1
        else:
            expect(FloatingPointError, "model.layers.0.mlp.up_proj.weight", optimizer.step)
        assert max_difference(full_state(model), before) == 0


def expect(error: type[Exception], text: str, call) -> None:
    try:
        call()
    except error as raised:
        assert text in str(raised), f"{error.__name__} without {text!r}: {raised}"
    else:
        raise AssertionError(f"expected {error.__name__} ({text})")


def ddp_state_dict_round_trip(rank, world, tmp, names):
    """DDP owner mode: ``state_dict()`` on every rank gives every owner's state (what rank 0 would torch.save),
    and a fresh optimizer that loads it continues exactly as the uninterrupted one."""
    data = rank_data(rank, world, split=False)  # the batch of 4 does not split over 3 ranks
    for name in names:
        wrapped, model, optimizer = sharded_run(name, "ddp", None)
        train(wrapped, optimizer, data, stop=3)
        saved = optimizer.state_dict()
        stateful = [p for g in optimizer.param_groups for p in g["params"] if optimizer.route(p, g).algorithm.stateful]
        assert len([s for s in saved["state"].values() if s]) == len(stateful), name  # every owner's, on every rank
        twin_wrapped, twin, twin_optimizer = sharded_run(name, "ddp", None)
        twin.load_state_dict(model.state_dict())
        twin_optimizer.load_state_dict(saved)
        train(wrapped, optimizer, data, start=3)
        train(twin_wrapped, twin_optimizer, data, start=3)
        difference = max_difference(full_state(twin), full_state(model))
        assert difference == 0, f"{name}: DDP state_dict round trip differs by {difference:.3g}"
