"""``slimopt bench``: every optimizer on the same model, data, token budget and schedule, over one or more seeds.

Each run is a ``slimopt train`` in a fresh process, so its peak memory is its
own (the allocator of a previous run cannot hide or inflate it) and a crash in
one optimizer cannot take down the others. Within a seed every optimizer starts
from the same initialization and sees the same batches; each is compared with
AdamW from the same seed, and the comparisons are summarized over the seeds.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import platform
import statistics
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.bench.memory import estimate
from slimopt.bench.report import write_plots, write_report
from slimopt.environment import device_name, git_revision
from slimopt.train.loop import TrainConfig, Trainer, resolve_device, validate
from slimopt.train.models import tokenizer_for, vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS

DEFAULT_OPTIMIZERS = ("adamw", "galore", "sumo", "swan", "muon", "rso")
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # around each optimizer's documented default lr


def _train_in_child(config: TrainConfig, out: Path, progress: bool) -> None:
    Trainer(config, out, progress=progress).run()


def run_in_fresh_process(target, args: tuple, what: str) -> None:
    """Calls ``target(*args)`` in a new (spawned) process and waits for it; RuntimeError if it fails."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the {what} run failed (exit code {process.exitcode}); see its output above")


def train_in_fresh_process(config: TrainConfig, out: Path, progress: bool) -> dict:
    """Run one training in a new process; returns its summary and metrics."""
    run_in_fresh_process(_train_in_child, (config, out, progress), config.optimizer)
    summary = json.loads((out / "summary.json").read_text())
    summary["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def sweep_lr(config: TrainConfig, out: Path, steps: int, progress: bool) -> tuple[float, list[dict]]:
    """Try each factor × the default lr on a short budget (its own full schedule); keep the lowest loss on the
    tuning split. The validation split, which the bench reports, plays no part in the choice."""
    default = OPTIMIZERS[config.optimizer].lr if config.lr is None else config.lr
    trials = []
    for factor in SWEEP_FACTORS:
        lr = default * factor
        short = replace(config, lr=lr, steps=steps, warmup=None, eval_every=steps, save_every=steps,
                        eval_split="tuning")
        summary = train_in_fresh_process(short, out / f"lr_{lr:.3g}", progress)
        trials.append({"lr": lr, "tuning_loss": summary["final_val_loss"]})  # the run's eval split is tuning
    best = min(trials, key=lambda t: t["tuning_loss"] if math.isfinite(t["tuning_loss"]) else math.inf)
    return best["lr"], trials


def steps_to_reach(metrics: list[dict], target: float) -> float | None:
    """The step at which the val-loss curve first comes down to ``target``, linearly interpolated between the
    two evaluations that bracket the crossing; None if no evaluation gets there.

    Reached at the first evaluation, there is no earlier point to interpolate from: that step, an upper bound.
    """
    previous = None
    for step, loss in ((m["step"], m["val_loss"]) for m in metrics if "val_loss" in m):
        if loss <= target:
            if previous is None:
                return float(step)
            before_step, before_loss = previous  # before_loss > target >= loss
            return before_step + (step - before_step) * (before_loss - target) / (before_loss - loss)
        previous = step, loss
    return None


def compare(results: dict[str, dict], baseline: str = "adamw") -> dict[str, dict]:
    """Per optimizer: the headline numbers, and ratios against the baseline from the same bench and seed."""
    base = results[baseline]
    target = base["final_val_loss"]
    rows = {}
    for name, r in results.items():
        reached = steps_to_reach(r["metrics"], target)
        rows[name] = {
            "lr": r["hyperparameters"]["lr"],
            "final_val_loss": r["final_val_loss"],
            "val_loss_delta": r["final_val_loss"] - target,
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


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (None from a single value), min and max over the seeds that have a value
    (steps to AdamW's loss is None where a seed never got there): `n` of them, out of `of`."""
    present = [value for value in values if value is not None]
    if not present:
        return {"n": 0, "of": len(values)}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "min": min(present), "max": max(present), "n": len(present), "of": len(values)}


def summarize(comparisons: list[dict[str, dict]]) -> dict[str, dict]:
    """One row per optimizer: its lr, and every other number of `compare` as a spread over the seeds."""
    rows = {}
    for name, first in comparisons[0].items():
        rows[name] = {"lr": first["lr"]}
        rows[name].update({key: spread([each[name][key] for each in comparisons]) for key in first if key != "lr"})
    return rows


def run_bench(base: TrainConfig, optimizers: list[str], out: Path, *, seeds: int = 1, lr_sweep: bool = False,
              sweep_steps: int | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Train every optimizer once per seed (``base.seed``, ``base.seed + 1``, ...), compare each with AdamW from
    the same seed, and write results.json, report.md and plots into ``out``.

    With ``lr_sweep``, each optimizer's lr is first picked on the tuning split with the first seed, then used
    for every seed. ``command`` is the command line to record in the report, if there was one.
    """
    if "adamw" not in optimizers:
        optimizers = ["adamw", *optimizers]  # every ratio is against AdamW from the same bench
    base = replace(base, time_optimizer=True)  # the report compares optimizer-step times
    for name in optimizers:
        validate(replace(base, optimizer=name))
    if seeds < 1:
        raise ValueError(f"invalid seeds={seeds!r}: expected an integer ≥ 1")
    out.mkdir(parents=True, exist_ok=True)
    evaluation = _eval_sizes(_prepare_data_once(base, progress), base, lr_sweep)  # a too small split fails here

    sweep, lrs = None, {}
    if lr_sweep:
        steps, trials = sweep_steps or max(1, base.steps // 3), {}
        for name in optimizers:
            lrs[name], trials[name] = sweep_lr(replace(base, optimizer=name), out / "sweep" / name, steps, progress)
        sweep = {"split": "tuning", "seed": base.seed, "steps": steps, "trials": trials, "picked": lrs}

    per_seed = []
    for seed in range(base.seed, base.seed + seeds):
        results = {}
        for name in optimizers:
            config = replace(base, optimizer=name, seed=seed, lr=lrs.get(name, base.lr))
            result = train_in_fresh_process(config, out / "runs" / f"seed_{seed}" / name, progress)
            breakdown = estimate(base.model, name, rank=result["hyperparameters"]["rank"],
                                 update_gap=base.update_gap, batch_size=base.batch_size, seq_len=base.seq_len,
                                 dtype=base.dtype, vocab_size=result["vocab_size"], per_layer=base.per_layer,
                                 chunked_loss=base.chunked_loss,
                                 activation_checkpointing=base.activation_checkpointing,
                                 embedding_state=base.embedding_state, freeze_embeddings=base.freeze_embeddings)
            result["estimated_memory"] = breakdown.total
            results[name] = result
        per_seed.append({"seed": seed, "comparison": compare(results), "runs": results})

    report = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device(resolve_device(base.device))),
        "torch": torch.__version__,
        "slimopt": git_revision(),
        "python": platform.python_version(),
        "config": asdict(base),
        "seeds": [entry["seed"] for entry in per_seed],
        "eval": evaluation,
        "memory_kind": per_seed[0]["runs"]["adamw"]["memory_kind"],
        "lr_sweep": sweep,
        "comparison": summarize([entry["comparison"] for entry in per_seed]),
        "per_seed": per_seed,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plots(report, out)
    write_report(report, out)
    return report


def _prepare_data_once(config: TrainConfig, progress: bool):
    """Build the corpus, tokenizer and token files in this process, so the runs all find them cached."""
    from slimopt.data import prepare

    return prepare(config.data, vocab_size=vocab_size_for(config.model, config.vocab_size),
                   tokenizer=tokenizer_for(config.model, config.tokenizer), seq_len=config.seq_len,
                   progress=progress)


def _eval_sizes(data, config: TrainConfig, lr_sweep: bool) -> dict:
    """Tokens one evaluation reads from each split the bench used (the runs cut the same windows), and the
    split's size where it is a file."""
    from slimopt.data import TokenizedCorpus

    files = isinstance(data, TokenizedCorpus)  # else c4's stream, of no known size
    splits = {"validation": (data.val_batches, data.val_tokens if files else None)}
    if lr_sweep:
        splits["tuning"] = (data.tune_batches, data.tune_tokens if files else None)
    sizes = {"every": config.eval_every}
    for split, (batches_of, tokens) in splits.items():
        batches = batches_of(config.batch_size, config.seq_len, config.eval_tokens)
        sizes[split] = {"tokens": sum(b.numel() for b in batches),
                        "split_tokens": None if tokens is None else len(tokens)}
    return sizes
