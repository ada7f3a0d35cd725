"""``slimopt bench``: every optimizer on the same model, data, seed, token budget and schedule.

Each run is a ``slimopt train`` in a fresh process, so its peak memory is its
own (the allocator of a previous run cannot hide or inflate it) and a crash in
one optimizer cannot take down the others. Everything is then compared with
AdamW measured in the same bench.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import platform
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.bench.memory import estimate
from slimopt.bench.report import write_plots, write_report
from slimopt.environment import device_name, git_revision
from slimopt.train.loop import TrainConfig, Trainer, validate
from slimopt.train.models import vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS

DEFAULT_OPTIMIZERS = ("adamw", "galore", "sumo", "swan", "muon", "rso")
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # around each optimizer's documented default lr


def _train_in_child(config: TrainConfig, out: Path, progress: bool) -> None:
    Trainer(config, out, progress=progress).run()


def train_in_fresh_process(config: TrainConfig, out: Path, progress: bool) -> dict:
    """Run one training in a new process; returns its summary and metrics."""
    process = multiprocessing.get_context("spawn").Process(target=_train_in_child, args=(config, out, progress))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the {config.optimizer} run failed (exit code {process.exitcode}); see its output above")
    summary = json.loads((out / "summary.json").read_text())
    summary["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def sweep_lr(config: TrainConfig, out: Path, steps: int, progress: bool) -> tuple[float, list[dict]]:
    """Try each factor × the default lr on a short budget (its own full schedule); keep the lowest val loss."""
    default = OPTIMIZERS[config.optimizer].lr if config.lr is None else config.lr
    trials = []
    for factor in SWEEP_FACTORS:
        lr = default * factor
        short = replace(config, lr=lr, steps=steps, warmup=None, eval_every=steps, save_every=steps)
        summary = train_in_fresh_process(short, out / f"lr_{lr:.3g}", progress)
        trials.append({"lr": lr, "val_loss": summary["final_val_loss"]})
    best = min(trials, key=lambda t: t["val_loss"] if math.isfinite(t["val_loss"]) else math.inf)
    return best["lr"], trials


def steps_to_reach(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose val loss is at or below ``target``."""
    return next((m["step"] for m in metrics if "val_loss" in m and m["val_loss"] <= target), None)


def compare(results: dict[str, dict], baseline: str = "adamw") -> dict[str, dict]:
    """Per optimizer: the headline numbers, and ratios against the baseline from the same bench."""
    base = results[baseline]
    target = base["final_val_loss"]
    rows = {}
    for name, r in results.items():
        reached = steps_to_reach(r["metrics"], target)
        rows[name] = {
            "lr": r["hyperparameters"]["lr"],
            "final_val_loss": r["final_val_loss"],
            "final_val_ppl": r["final_val_ppl"],
            "steps_to_baseline_loss": reached,
            "steps_ratio": reached / base["steps"] if reached is not None else None,
            "peak_memory": r["peak_memory"],
            "peak_memory_ratio": r["peak_memory"] / base["peak_memory"],
            "estimated_memory": r["estimated_memory"],
            "optimizer_state_bytes": r["optimizer_state_bytes"],
            "state_ratio": r["optimizer_state_bytes"] / base["optimizer_state_bytes"],
            "median_step_time": r["median_step_time"],
            "step_time_ratio": r["median_step_time"] / base["median_step_time"],
            "median_optimizer_time": r["median_optimizer_time"],
            "optimizer_time_ratio": r["median_optimizer_time"] / base["median_optimizer_time"],
        }
    return rows


def run_bench(base: TrainConfig, optimizers: list[str], out: Path, *, lr_sweep: bool = False,
              sweep_steps: int | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Train every optimizer, compare against AdamW, write results.json, report.md and plots into ``out``.

    ``command`` is the command line to record in the report, if there was one.
    """
    if "adamw" not in optimizers:
        optimizers = ["adamw", *optimizers]  # every ratio is against AdamW from the same bench
    for name in optimizers:
        validate(replace(base, optimizer=name))
    out.mkdir(parents=True, exist_ok=True)
    _prepare_data_once(base, progress)
    results, sweeps = {}, {}
    for name in optimizers:
        config = replace(base, optimizer=name)
        if lr_sweep:
            best, sweeps[name] = sweep_lr(config, out / "runs" / name, sweep_steps or max(1, base.steps // 3), progress)
            config = replace(config, lr=best)
        result = train_in_fresh_process(config, out / "runs" / name, progress)
        breakdown = estimate(base.model, name, rank=result["hyperparameters"]["rank"], update_gap=base.update_gap,
                             batch_size=base.batch_size, seq_len=base.seq_len, dtype=base.dtype,
                             vocab_size=result["vocab_size"], per_layer=base.per_layer)
        result["estimated_memory"] = breakdown.total
        results[name] = result

    report = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device(base.device)),
        "torch": torch.__version__,
        "slimopt": git_revision(),
        "python": platform.python_version(),
        "config": asdict(base),
        "memory_kind": results["adamw"]["memory_kind"],
        "lr_sweep": sweeps or None,
        "comparison": compare(results),
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plots(report, out)
    write_report(report, out)
    return report


def _prepare_data_once(config: TrainConfig, progress: bool) -> None:
    """Build the corpus, tokenizer and token files in this process, so the runs all find them cached."""
    from slimopt.data import prepare

    prepare(config.data, vocab_size=vocab_size_for(config.model, config.vocab_size), tokenizer=config.tokenizer,
            seq_len=config.seq_len, progress=progress)
