"""The per-entry RMS of each optimizer's update, Δ = −ΔW / lr, on the hidden matrices of a real training run:
what ``lr_scale="adamw"`` (slimopt.optim.algorithm.ADAMW_RMS and each algorithm's ``adamw_factor``) is chosen
from. AdamW's own update RMS is the target; a matrix method whose RMS matches it at every step can take AdamW's
lr unchanged.

    OMP_NUM_THREADS=1 python benchmarks/update_rms.py            # tiny preset, builtin corpus, 200 steps

Every optimizer runs with ``lr_scale="adamw"`` at AdamW's default lr (torch's AdamW, the baseline, as published;
torch's Muon with ``adjust_lr_fn="match_rms_adamw"``), constant lr, no weight decay, the bench's batches; the
published RMS of the same run is the measured one divided by the algorithm's static factor for that shape.
Writes benchmarks/results/update_rms_tiny_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimopt.data import prepare
from slimopt.environment import device_name, git_revision
from slimopt.optim import SlimOptimizer
from slimopt.optim.optimizer import update_factor
from slimopt.train.models import build_model, tokenizer_for, vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, build_optimizers

OPTIMIZER_NAMES = ("adamw", "galore", "sumo", "swan", "apollo", "apollo_mini", "muon")
RECORD = (1, 2, 5, 10, 25, 50, 100, 150, 200)


def published_factors(optimizers, matrices) -> dict[int, float]:
    """id(param) → the static factor lr_scale="adamw" applied to it (1 for torch's optimizers)."""
    factors = {id(p): 1.0 for p in matrices}
    for optimizer in optimizers:
        if not isinstance(optimizer, SlimOptimizer):
            continue
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in factors and group["algorithm"] != "adamw":
                    route = optimizer.route(param, group)
                    factors[id(param)] = update_factor(route.algorithm, route.shape, group)
    return factors


def measure(name: str, steps: int, model_name: str, batch_size: int, seq_len: int, seed: int) -> dict:
    data = prepare("builtin", vocab_size=vocab_size_for(model_name, None), tokenizer=tokenizer_for(model_name, None),
                   seq_len=seq_len, progress=False)
    model = build_model(model_name, vocab_size=data.vocab_size, seq_len=seq_len, seed=seed)
    lr = OPTIMIZERS["adamw"].lr
    hp = Hyperparameters(lr=lr, adamw_lr=lr, weight_decay=0.0, rank=max(1, model.config.hidden_size // 4),
                         update_gap=200, lr_scale="published" if name == "adamw" else "adamw")
    optimizers = build_optimizers(name, model, hp)
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "proj" in n]
    factors = published_factors(optimizers, matrices)
    stream = data.train_batches(batch_size, seq_len, seed=seed)
    rows = {}
    for step in range(1, steps + 1):
        batch = stream.next_batch()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.detach().clone() for p in matrices]
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step in RECORD:
            rms = [((p.detach() - b).pow(2).mean().sqrt() / lr).item() for p, b in zip(matrices, before)]
            published = [r / factors[id(p)] for r, p in zip(rms, matrices)]
            rows[step] = {"loss": loss.item(), "median": statistics.median(rms), "min": min(rms), "max": max(rms),
                          "published_median": statistics.median(published)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/update_rms_tiny_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    results = {name: measure(name, args.steps, "tiny", 16, 128, 0) for name in args.optimizers.split(",")}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(torch.device("cpu")),
            "torch": torch.__version__, "slimopt": git_revision(), "steps": args.steps,
            "seconds": time.time() - started}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    steps = [s for s in RECORD if s <= args.steps]
    lines = ["# Update RMS per entry, Δ = −ΔW / lr, of the hidden matrices: tiny preset, builtin corpus", "",
             f"- {meta['date']}; {meta['device']}; torch {meta['torch']}; slimopt {meta['slimopt']}; "
             f"`OMP_NUM_THREADS=1 python benchmarks/update_rms.py` ({meta['seconds']:.0f} s)",
             "- 16×128 tokens per step, AdamW's lr 3e-3 constant, clip 1.0, no weight decay, seed 0. Every matrix "
             "method runs with lr_scale=\"adamw\"; 'published' is the same run's RMS over the algorithm's "
             "static factor (what the method's own scaling would give on these gradients).",
             "- each cell: the median over the hidden matrices [min, max]; AdamW is torch.optim.AdamW.", "",
             "| optimizer | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{rows[s]['median']:.3f} [{rows[s]['min']:.3f}, {rows[s]['max']:.3f}]" for s in steps) + " |")
    lines += ["", "Published scaling (median over the matrices):", "",
              "| optimizer | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{rows[s]['published_median']:.3f}" for s in steps) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
