"""Peak memory of `slimopt train` with and without --per-layer, each run in a fresh process.

    python benchmarks/per_layer_memory.py                       # llama_60m, CPU, about 3 minutes on 2 cores
    python benchmarks/per_layer_memory.py --device cuda --model llama_350m --batch-size 8 --dtype bf16-pure

With per-layer updates each gradient is freed right after its parameter's update, inside backward, so the
full set of gradients (as large as the model) never exists at once. The checking pass before it (a first
backward that only takes each gradient's norm) keeps every activation until its end, where the embedding's
gradient arrives: its peak is the activations plus one gradient. Writes
benchmarks/results/per_layer_memory_<model>_<device>.{md,json}.
"""

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.bench.run import train_in_fresh_process
from slimopt.environment import device_name
from slimopt.train.loop import TrainConfig

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--optimizers", default="adamw,sumo,swan")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.optimizers.split(","):
            peaks = {}
            for per_layer in (False, True):
                config = TrainConfig(model=args.model, optimizer=name, per_layer=per_layer, device=args.device,
                                     dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                                     steps=args.steps, eval_every=args.steps,
                                     eval_tokens=args.batch_size * args.seq_len, save_every=args.steps)
                summary = train_in_fresh_process(config, Path(scratch) / f"{name}_{per_layer}", progress=False)
                peaks[per_layer] = summary["peak_memory"]
            rows.append({"optimizer": name, "peak_normal": peaks[False], "peak_per_layer": peaks[True],
                         "ratio": peaks[True] / peaks[False], "parameters": summary["parameters"],
                         "memory_kind": summary["memory_kind"]})

    header = (f"# per-layer updates: peak memory, {args.model} on {args.device}\n\n"
              f"- device: {device_name(torch.device(args.device))}; torch {torch.__version__}\n"
              f"- {args.steps} steps of {args.batch_size}×{args.seq_len} tokens, {args.dtype}, builtin data; "
              f"peak: {rows[0]['memory_kind']}\n"
              f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
              f"- command: python benchmarks/per_layer_memory.py --model {args.model} --device {args.device} "
              f"--dtype {args.dtype} --batch-size {args.batch_size} --seq-len {args.seq_len} --steps {args.steps} "
              f"--optimizers {args.optimizers}\n\n")
    table = ["| optimizer | peak, normal (MiB) | peak, --per-layer (MiB) | × normal |", "|---|---:|---:|---:|"]
    table += [f"| {r['optimizer']} | {r['peak_normal'] / MiB:.0f} | {r['peak_per_layer'] / MiB:.0f} | "
              f"{r['ratio']:.2f}× |" for r in rows]
    text = header + "\n".join(table) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"per_layer_memory_{args.model}_{args.device}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
