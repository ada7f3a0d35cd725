"""Optimizer-step time and optimizer state per rank: one process against FSDP2 and DDP on 1 to 4 ranks.

A LLaMA preset trains a few steps (real forward and backward, a small batch); only optimizer.step() is timed,
median over the timed steps after one warm-up step (which also holds SUMO's and GaLore's first subspace
refresh). Every layout runs with one thread per rank, so 2 ranks use 2 cores where one process uses 1:
the ratios say what splitting the work over ranks buys and what the exchanges cost. More ranks than cores
(3 and 4 ranks on a 2-core machine) time-share the cores: those rows measure the engine's overheads, not a
speed-up.

    python benchmarks/distributed_step.py --model tiny --steps 6 --worlds 1,2,3,4
    python benchmarks/distributed_step.py --model llama_60m --steps 4 --device cuda   # on a GPU: W=1 only
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slimopt
from slimopt.distributed import state_bytes_here
from slimopt.environment import device_name, git_revision
from slimopt.train.models import build_model
from slimopt.train.parallel import Ranks, wrap

OPTIMIZERS = {
    "adamw": lambda groups, pg: slimopt.AdamW(groups, lr=1e-3, process_group=pg),
    "galore": lambda groups, pg: slimopt.GaLore(groups, lr=1e-3, rank=64, process_group=pg),
    "sumo": lambda groups, pg: slimopt.SUMO(groups, lr=1e-3, rank=64, process_group=pg),
    "swan": lambda groups, pg: slimopt.SWAN(groups, lr=1e-3, process_group=pg),
}


def layouts(worlds: list[int]) -> list[tuple[str, str, int]]:
    return [("one process", "none", 1)] + [("fsdp", "fsdp", w) for w in worlds] + \
        [("ddp", "ddp", w) for w in worlds if w > 1]


def measure(rank: int, world: int, store: str, mode: str, args, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if mode != "none":
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=600))
    results = {}
    for name in args.optimizers.split(","):
        model = build_model(args.model, vocab_size=args.vocab_size, seq_len=args.seq_len, seed=0, device=device)
        wrapped = wrap(model, Ranks(mode, rank, world) if mode != "none" else None, device)
        group = dist.group.WORLD if mode == "ddp" else None
        optimizer = OPTIMIZERS[name](slimopt.param_groups(model), group)
        generator = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(args.steps):
            x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
            wrapped(input_ids=x, labels=x).loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            optimizer.zero_grad(set_to_none=True)
        step_time = torch.tensor([statistics.median(times[1:])])
        state = torch.tensor([float(state_bytes_here(optimizer))])
        if mode != "none":  # the slowest rank sets the pace; report the largest state on a rank
            dist.all_reduce(step_time, dist.ReduceOp.MAX)
            dist.all_reduce(state, dist.ReduceOp.MAX)
        results[name] = {"step_time": step_time.item(), "state_bytes_per_rank": int(state.item())}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if mode != "none":
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes for FSDP2 (and DDP, above 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    chosen = layouts([int(w) for w in args.worlds.split(",")])
    chosen = [layout for layout in chosen if args.device == "cpu" or layout[2] <= torch.cuda.device_count()]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode, world in chosen:
            out = os.path.join(tmp, f"{mode}{world}.json")
            store = os.path.join(tmp, f"store-{mode}{world}")
            mp.start_processes(measure, args=(world, store, mode, args, out), nprocs=world, start_method="spawn")
            rows[(label, world)] = json.loads(Path(out).read_text())
            print(label, world, rows[(label, world)], flush=True)

    base = rows[("one process", 1)]
    lines = [f"# Distributed optimizer step: {args.model}, {device_name(torch.device(args.device))}",
             "", f"`python benchmarks/distributed_step.py {shlex.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_revision()}; one thread per rank "
             f"on {os.cpu_count()} cores; median optimizer.step() of the slowest rank, the largest state on a rank.",
             "", "Ranks beyond the core count time-share the cores: those rows show overheads, not speed-ups.", "",
             "| optimizer | layout | ranks | step time | × one process | state per rank | × one process |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in args.optimizers.split(","):
        for (label, world), result in rows.items():
            r, one = result[name], base[name]
            lines.append(f"| {name} | {label} | {world} | {r['step_time'] * 1e3:.1f} ms | "
                         f"{r['step_time'] / one['step_time']:.2f}× | {r['state_bytes_per_rank'] / 2**20:.2f} MiB | "
                         f"{r['state_bytes_per_rank'] / max(1, one['state_bytes_per_rank']):.2f}× |")
    stem = f"distributed_step_{args.model}_{args.device}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"model": args.model, "device": device_name(torch.device(args.device)), "revision": git_revision(),
         "rows": [{"layout": label, "ranks": world, **{n: r for n, r in result.items()}}
                  for (label, world), result in rows.items()]}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
