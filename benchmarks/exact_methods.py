"""Does the route matter to the loss? SUMO's orthogonalizer and SWAN's whitening, each route against eigh.

Each (optimizer, method, seed) is a full `slimopt train` run in the bench's setting (the tiny preset, 300 steps,
evaluation every 75 steps on the validation split), each in a fresh process. The report gives the final
validation loss per run and, per optimizer, the mean over seeds of polar − eigh from the same seed.

    python benchmarks/exact_methods.py --seeds 3
    python benchmarks/exact_methods.py --seeds 3 --methods polar_express eigh \
        --out benchmarks/results/exact_methods_polar_express_tiny_cpu.json
    python benchmarks/exact_methods.py --device cuda --model llama_60m --dtype bf16 --seeds 1
"""

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import slimopt
from slimopt.bench.run import train_in_fresh_process
from slimopt.cli import BENCH_EVAL_EVERY
from slimopt.environment import device_name, git_revision
from slimopt.train.loop import TrainConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["swan", "sumo"], choices=["swan", "sumo"])
    parser.add_argument("--methods", nargs="+", default=["polar", "eigh"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=Path, default=Path("runs/exact_methods"))
    parser.add_argument("--out", type=Path, help="JSON path (default: results/exact_methods_<model>_<device>.json)")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"exact_methods_{args.model}_{args.device}.json"

    base = TrainConfig(model=args.model, steps=args.steps, dtype=args.dtype, device=args.device,
                       eval_every=BENCH_EVAL_EVERY)
    runs = []
    for name in args.optimizers:
        for method in args.methods:
            for seed in range(args.seeds):
                config = replace(base, optimizer=name, orthogonalizer=method, seed=seed)
                print(f"{name} {method} seed {seed} ...", file=sys.stderr, flush=True)
                run = args.runs / f"{name}_{method}_{seed}"
                done = run / "summary.json"  # a finished run is reused: the comparison can be extended
                summary = json.loads(done.read_text()) if done.exists() and json.loads(done.read_text())[
                    "config"] == asdict(config) else train_in_fresh_process(config, run, progress=False)
                runs.append({"optimizer": name, "method": method, "seed": seed,
                             "final_val_loss": summary["final_val_loss"],
                             "median_optimizer_time": summary["median_optimizer_time"]})


    def loss(name, method, seed):
        key = (name, method, seed)
        return next(r["final_val_loss"] for r in runs if (r["optimizer"], r["method"], r["seed"]) == key)


    lines = ["| optimizer | method | val loss per seed | mean | mean Δ vs eigh (same seed) | optimizer step ms |",
             "|---|---|---|---:|---:|---:|"]
    for name in args.optimizers:
        for method in args.methods:
            losses = [loss(name, method, s) for s in range(args.seeds)]
            deltas = [loss(name, method, s) - loss(name, "eigh", s) for s in range(args.seeds)] \
                if "eigh" in args.methods else []
            times = [r["median_optimizer_time"] for r in runs if (r["optimizer"], r["method"]) == (name, method)]
            delta = f"{statistics.mean(deltas):+.4f} (max |Δ| {max(abs(d) for d in deltas):.4f})" if deltas else "–"
            per_seed = ", ".join(f"{v:.4f}" for v in losses)
            lines.append(f"| {name} | {method} | {per_seed} | {statistics.mean(losses):.4f} | {delta} "
                         f"| {1e3 * statistics.median(times):.1f} |")
    header = {
        "device": device_name(args.device),
        "slimopt": f"{slimopt.__version__} ({git_revision() or 'no git'})",
        "setting": f"{args.model}, {args.steps} steps, {args.dtype}, seeds 0..{args.seeds - 1}, bench evaluation",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *sys.argv]),
    }
    report = "\n".join([*(f"- {k}: {v}" for k, v in header.items()), "", *lines])
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "runs": runs}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# Exact methods: {' against '.join(args.methods)}\n\n{report}\n")


if __name__ == "__main__":  # each run spawns a fresh process, which re-imports this file
    main()
