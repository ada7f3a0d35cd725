"""How well ``Algorithm.cost`` (what the distributed plan balances owners by) predicts measured step time.

For each matrix algorithm and each shape of a LLaMA preset's hidden matrices, times the batched ``update`` on a
stack of 4 fixed random gradients (median over steps after a warm-up; refresh steps amortized as in training:
``(refresh + (update_gap − 1)·plain) / update_gap``) and divides by ``cost(shape)``. Owners are balanced within
an algorithm's matrices, so what matters is that the ratio is flat across one algorithm's shapes.

    OMP_NUM_THREADS=1 python benchmarks/owner_cost.py --shapes llama_60m
"""

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.environment import device_name, git_revision
from slimopt.optim import ALGORITHMS

SHAPES = {"tiny": (128, 352), "llama_60m": (512, 1376), "llama_130m": (768, 2048)}  # hidden, intermediate
SETTINGS = {"sumo": {"rank": 128, "update_gap": 200}, "galore": {"rank": 128, "update_gap": 200}, "swan": {}}


def group_for(name: str) -> dict:
    algorithm = ALGORITHMS[name]
    return {**algorithm.defaults, **SETTINGS[name], "lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999),
            "eps": 1e-8, "maximize": False}


def timed(name: str, shape, steps: int, batch: int = 4) -> float:
    """Seconds per matrix of an amortized step."""
    algorithm, group = ALGORITHMS[name], group_for(name)
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(batch, *shape, generator=generator)
    fresh = [algorithm.init_state(shape, group, dtype=torch.float32, device="cpu", seed=s) for s in range(batch)]
    state = {k: torch.stack([f[k] for f in fresh]) for k in fresh[0]}
    times = {}
    for step in [0, *range(1, steps + 1), group.get("update_gap", 1)]:
        start = time.perf_counter()
        algorithm.update(G.clone(), state, group, step)
        times.setdefault(step % group.get("update_gap", 1) == 0, []).append(time.perf_counter() - start)
    plain = statistics.median(times[False]) if False in times else statistics.median(times[True])
    gap = group.get("update_gap", 1)
    refresh = statistics.median(times[True][1:] or times[True])
    return (refresh + (gap - 1) * plain) / gap / batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama_60m", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    hidden, intermediate = SHAPES[args.shapes]
    stored = {"square (q, k, v, o)": (hidden, hidden), "up, gate": (intermediate, hidden),
              "down": (hidden, intermediate)}
    rows = []
    for name in SETTINGS:
        algorithm, group = ALGORITHMS[name], group_for(name)
        for label, (out_features, in_features) in stored.items():
            # the orientation the optimizer gives this algorithm (see Algorithm.orientation)
            m, n = out_features, in_features
            orientation = algorithm.orientation(group)
            if (orientation == "tall" and m < n) or (orientation.startswith("wide") and m > n):
                m, n = n, m
            seconds = timed(name, (m, n), args.steps)
            rows.append({"algorithm": name, "matrix": label, "shape": [m, n], "seconds": seconds,
                         "cost": algorithm.cost((m, n), group)})
    lines = [f"# Owner cost model against measured step time: {args.shapes} shapes, {device_name(torch.device('cpu'))}",
             "", f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/owner_cost.py --shapes {args.shapes}`, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_revision()}. Seconds per matrix of an "
             "amortized step (update_gap 200) over `Algorithm.cost`, normalized to each algorithm's square matrix: "
             "1.00 everywhere would be a perfect model.", "",
             "| algorithm | matrix | oriented shape | ms per matrix | cost (GFLOP) | measured / cost, normalized |",
             "|---|---|---|---:|---:|---:|"]
    for name in SETTINGS:
        mine = [r for r in rows if r["algorithm"] == name]
        base = mine[0]["seconds"] / mine[0]["cost"]
        for r in mine:
            lines.append(f"| {name} | {r['matrix']} | {r['shape'][0]}×{r['shape'][1]} | {r['seconds'] * 1e3:.2f} | "
                         f"{r['cost'] / 1e9:.3f} | {r['seconds'] / r['cost'] / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"owner_cost_{args.shapes}_cpu"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"revision": git_revision(), "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
