"""``slimopt bench``: every optimizer on the same model, data, token budget and schedule, over one or more seeds.

Each run is a ``slimopt train`` in a fresh process, so its peak memory is its
own (the allocator of a previous run cannot hide or inflate it) and a crash in
one optimizer cannot take down the others. Within a seed every optimizer starts
from the same initialization and sees the same batches; each is compared with
AdamW from the same seed, and the comparisons are summarized over the seeds.

With ``tune``, the fair tuning protocol first picks every optimizer's setting with the same budget (see
:func:`run_bench` and docs/benchmark.md): a grid of lrs around its default (AdamW's grid for the
``NAME@adamw-lr`` transfer variants) times the values of its key hyperparameter (:data:`KEY_HYPERPARAMETERS`),
each over the tuning seeds at the full budget, scored on the tuning split by :func:`choose`; then the chosen
settings run over final seeds disjoint from the tuning ones, on the validation split. A run whose
summary.json already holds the same setting in the output directory is reused, not trained again.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import statistics
from collections import deque
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

DEFAULT_OPTIMIZERS = ("adamw", "galore", "sumo", "swan", "muon", "rso", "apollo", "apollo_mini")
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # around each optimizer's documented default lr (--lr-sweep, the quick sweep)

# ----------------------------------------------------------------- the fair tuning protocol (--tune)
# Every optimizer gets the same search: these factors × its default lr (half-decade steps, 10^-1 … 10^1), times
# the values of its key hyperparameter, each over TUNE_SEEDS seeds at the full budget, on the tuning split.
LR_FACTORS = tuple(10 ** (k / 2) for k in range(-2, 3))  # 0.1, 0.316, 1, 3.16, 10
TUNE_SEEDS = 2
FINAL_SEED_OFFSET = 10  # final seeds: --seed + 10, + 11, ...: disjoint from the tuning seeds --seed, --seed + 1
TIE = 0.01  # nats: about the standard error of one evaluation of the default bench (256k tokens)
SPREAD_WARNING = 0.05  # nats: AdamW's seed spread above this makes the report warn that Δs carry it
BENCH_CLIP = 1.0  # the bench's default global gradient-norm clipping, for every optimizer (what LLM users run)
# The one hyperparameter besides the lr that each method's users tune, with the values the protocol tries (the
# first is the default). AdamW: β₂ 0.999 (torch's) or 0.95 (LLM pre-training's). GaLore: its published
# pre-training scale 0.25, and 1.0 (the unscaled Adam direction). SUMO: its published 1.0, and 0.5. With no weight
# decay GaLore's scale only multiplies the step, as the lr does: its second value interleaves the lr grid. SWAN,
# APOLLO, APOLLO-Mini, Muon and RSO: none (the protocol; APOLLO's scale, too, only multiplies the step).
# Under lr_scale="adamw" the rule divides the scale out, so the transfer variants have no second point either.
# A setting at the default value carries no key ({"lr": …}): its run is the plain lr-grid run.
KEY_HYPERPARAMETERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "adamw": ("beta2", (0.999, 0.95)),
    "galore": ("scale", (0.25, 1.0)),
    "sumo": ("scale", (1.0, 0.5)),
}
# How the key hyperparameter is searched: "product" (every lr × every value) or "coordinate" (the lr grid at the
# default value, then the other values at the chosen lr and its neighbours within KEY_RADIUS grid steps).
KEY_SEARCHES = ("product", "coordinate")
KEY_RADIUS = 1
# A row whose best lr is the lowest or highest of its grid gets the next half-decade point beyond it, up to this
# many times: the best may lie outside the grid (the report still flags a choice at the edge of what was tried).
EXTEND_EDGES = 2
# A transfer variant: the optimizer with lr_scale="adamw" (every matrix update at AdamW's RMS), tuned on AdamW's
# grid. Named NAME@adamw-lr in the report; --optimizers takes NAME:adamw (or the report's name).
TRANSFER = "@adamw-lr"
TRANSFER_FLAG = ":adamw"


def split_entry(name: str) -> tuple[str, bool]:
    """(optimizer, is a transfer variant) of a bench row's name: "sumo", "sumo:adamw" or "sumo@adamw-lr"."""
    for suffix in (TRANSFER, TRANSFER_FLAG):
        if name.endswith(suffix):
            return name[: -len(suffix)], True
    return name, False


def entry_name(name: str) -> str:
    """The report's name of a row: "sumo", or "sumo@adamw-lr" for "sumo:adamw"."""
    optimizer, transfer = split_entry(name)
    return optimizer + TRANSFER if transfer else optimizer


def bench_names(text: str) -> list[str]:
    """The rows a comma-separated --optimizers list names, in the report's spelling, each once; ValueError for
    an unknown optimizer or a transfer variant of AdamW (which is AdamW)."""
    from slimopt.train.optimizers import check_optimizer

    names = []
    for item in (n.strip() for n in text.split(",")):
        if not item:
            continue
        optimizer, transfer = split_entry(item)
        check_optimizer(optimizer)
        if transfer and optimizer == "adamw":
            raise ValueError(f"invalid optimizer={item!r}: AdamW's lr needs no transfer; name it adamw")
        if entry_name(item) not in names:
            names.append(entry_name(item))
    if not names:
        raise ValueError(f"invalid optimizers={text!r}: expected a comma-separated list")
    return names


def entry_config(base: TrainConfig, name: str) -> TrainConfig:
    """``base`` for one row: its optimizer, with lr_scale="adamw" for a transfer variant."""
    optimizer, transfer = split_entry(name)
    return replace(base, optimizer=optimizer, lr_scale="adamw" if transfer else base.lr_scale)


def default_lr(name: str) -> float:
    """The centre of a row's lr grid: its optimizer's documented default, AdamW's for a transfer variant."""
    optimizer, transfer = split_entry(name)
    return OPTIMIZERS["adamw" if transfer else optimizer].lr


def key_hyperparameter(config: TrainConfig) -> tuple[str, tuple[float, ...]] | None:
    """(TrainConfig field, values) the protocol tries for this optimizer besides the lr; None where it has none,
    or where lr_scale="adamw" divides its `scale` out."""
    key = KEY_HYPERPARAMETERS.get(config.optimizer)
    if key is None or (key[0] == "scale" and config.lr_scale == "adamw"):
        return None
    return key


def lr_grid(centre: float, factors=LR_FACTORS) -> list[float]:
    """The lrs ``factors`` × ``centre``, lowest first."""
    return sorted(centre * factor for factor in factors)


def grid(base: TrainConfig, name: str, factors=LR_FACTORS, key_search: str = "product") -> list[dict]:
    """Every setting the protocol tries first for a row: {"lr": …} per lr of its grid (its key hyperparameter at
    the default), and with ``key_search="product"`` the same lrs at each other value of its key hyperparameter
    ({"lr": …, "beta2": 0.95}); "coordinate" leaves those to :func:`key_settings`."""
    lrs = lr_grid(default_lr(name), factors)
    settings = [{"lr": lr} for lr in lrs]
    key = key_hyperparameter(entry_config(base, name))
    if key is None or key_search == "coordinate":
        return settings
    field, values = key
    return settings + [{"lr": lr, field: value} for value in values[1:] for lr in lrs]


def key_settings(base: TrainConfig, name: str, lrs: list[float], chosen_lr: float,
                 radius: int = KEY_RADIUS) -> list[dict]:
    """The coordinate search's second stage: the key hyperparameter's other values at the lrs of ``lrs`` within
    ``radius`` grid steps of ``chosen_lr``; [] for a row without one."""
    key = key_hyperparameter(entry_config(base, name))
    if key is None:
        return []
    field, values = key
    near = [lr for lr in lrs if grid_steps_apart(lrs, lr, chosen_lr) <= radius]
    return [{"lr": lr, field: value} for value in values[1:] for lr in near]


def beyond_edge(lrs: list[float], chosen: dict, flags: list[str]) -> float | None:
    """The next lr past the edge of ``lrs`` where the chosen one is (the grid's step, the ratio of its two points
    nearest that edge), or None where the choice is inside the grid."""
    ordered = sorted(lrs)
    if "low-edge" in flags and len(ordered) > 1:
        return ordered[0] * ordered[0] / ordered[1]
    if "high-edge" in flags and len(ordered) > 1:
        return ordered[-1] * ordered[-1] / ordered[-2]
    return None


def _loss(value) -> float:
    """A tuning loss for ranking: a diverged run (None, NaN or ±inf) counts as +inf."""
    return value if value is not None and math.isfinite(value) else math.inf


def _key(settings: dict) -> tuple:
    return tuple(sorted(settings.items()))


def aggregate(trials: list[dict]) -> list[dict]:
    """One row per setting of ``trials`` ({"settings", "seed", "tuning_loss"} each), in first-seen order: its
    losses by seed, their mean (+inf if any seed diverged), sample standard deviation (0 with one seed; None if
    any diverged), min, max and how many diverged."""
    groups: dict[tuple, dict] = {}
    for trial in trials:
        row = groups.setdefault(_key(trial["settings"]), {"settings": dict(trial["settings"]), "seeds": [],
                                                          "losses": []})
        row["seeds"].append(trial["seed"])
        row["losses"].append(_loss(trial["tuning_loss"]))
    rows = []
    for row in groups.values():
        losses, finite = row["losses"], [v for v in row["losses"] if math.isfinite(v)]
        diverged = len(losses) - len(finite)
        rows.append({**row, "losses": [v if math.isfinite(v) else None for v in losses],
                     "mean": statistics.fmean(losses) if not diverged else math.inf,
                     "std": None if diverged else (statistics.stdev(losses) if len(losses) > 1 else 0.0),
                     "min": min(finite) if finite else None, "max": max(finite) if finite else None,
                     "diverged": diverged})
    return rows


def choose(trials: list[dict], tie: float = TIE) -> tuple[dict, list[str]]:
    """The setting to keep from ``trials`` ({"settings", "seed", "tuning_loss"} records), and its flags.

    The best mean tuning loss over the seeds wins, a diverged seed counting as +inf (so a setting that diverges
    in any seed is never chosen while another converged everywhere); of the settings whose mean is within
    ``tie`` of the best, the one with the smallest seed spread (sample std) is kept, then the lower mean.
    Flags: "low-edge" / "high-edge" where the chosen lr is the lowest / highest lr tried, "tie-break" where the
    spread rule moved the choice off the best mean, "all-diverged" where every setting diverged in some seed
    (the lowest lr is kept then).
    """
    if not trials:
        raise ValueError("no trials to choose from")
    rows = aggregate(trials)
    lrs = sorted({row["settings"]["lr"] for row in rows})
    flags = []
    finite = [row for row in rows if math.isfinite(row["mean"])]
    if not finite:
        chosen = min(rows, key=lambda row: row["settings"]["lr"])
        flags.append("all-diverged")
    else:
        best = min(finite, key=lambda row: row["mean"])
        close = [row for row in finite if row["mean"] <= best["mean"] + tie]
        chosen = min(close, key=lambda row: (row["std"], row["mean"]))
        if chosen is not best:
            flags.append("tie-break")
    if len(lrs) > 1 and chosen["settings"]["lr"] == lrs[0]:
        flags.append("low-edge")
    if len(lrs) > 1 and chosen["settings"]["lr"] == lrs[-1]:
        flags.append("high-edge")
    return dict(chosen["settings"]), flags


def spread_warning(std: float | None, threshold: float = SPREAD_WARNING) -> bool:
    """Whether AdamW's seed spread (sample std of its loss over the seeds) is above ``threshold`` nats."""
    return std is not None and std > threshold


def grid_steps_apart(lrs: list[float], a: float, b: float) -> int:
    """How many points of the lr grid ``lrs`` separate ``a`` and ``b`` (both on it, to rounding)."""
    ordered = sorted(lrs)

    def index(lr: float) -> int:
        return min(range(len(ordered)), key=lambda i: abs(math.log(ordered[i] / lr)))
    return abs(index(a) - index(b))


def transfer_summary(trials: dict[str, list[dict]], chosen: dict[str, dict], grids: dict[str, list[float]],
                     baseline: str = "adamw") -> list[dict]:
    """Per transfer variant (a row named NAME@adamw-lr): its best lr, AdamW's, how many grid steps apart (its
    grid is AdamW's), and its mean tuning loss at AdamW's best lr against tuned AdamW's."""
    adamw_lr = chosen[baseline]["lr"]
    adamw_loss = next(row["mean"] for row in aggregate(trials[baseline])
                      if _key(row["settings"]) == _key(chosen[baseline]))
    rows = []
    for name, records in trials.items():
        if not split_entry(name)[1]:
            continue
        at_adamw = [row for row in aggregate(records) if math.isclose(row["settings"]["lr"], adamw_lr)]
        loss = min((row["mean"] for row in at_adamw), default=None)
        steps = grid_steps_apart(grids[name], chosen[name]["lr"], adamw_lr)
        rows.append({"optimizer": name, "best_lr": chosen[name]["lr"], "adamw_lr": adamw_lr, "steps_apart": steps,
                     "within_one_step": steps <= 1, "tuning_loss_at_adamw_lr": loss, "adamw_tuning_loss": adamw_loss,
                     "delta": None if loss is None else loss - adamw_loss})
    return rows


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


DIVERGED = "diverged.json"  # what a tuning trial that stopped on a NaN/inf loss leaves in its run directory


def _run_in_child(config: TrainConfig, out: Path, progress: bool, threads: int | None, tolerate: bool) -> None:
    """One bench run: a fresh start in ``out``; with ``tolerate``, a divergence is recorded, not an error."""
    from slimopt.train.loop import NonFiniteLoss

    if threads is not None:
        torch.set_num_threads(threads)
    (out / DIVERGED).unlink(missing_ok=True)
    trainer = Trainer(config, out, progress=progress)
    trainer.start_over()  # nothing of an earlier, different run in this directory is kept
    try:
        trainer.run()
    except NonFiniteLoss as error:
        if not tolerate:
            raise
        (out / DIVERGED).write_text(json.dumps({"config": asdict(config), "error": str(error)}, indent=2) + "\n")
        print(f"{config.optimizer} diverged ({error}); counted as +inf", flush=True)


# What a run logs and saves, not what it computes: a finished run that differs only in these is the same run.
NOT_RESULTS = ("log_every", "save_every", "time_optimizer", "report_to")


def _same_config(path: Path, config: TrainConfig) -> bool:
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = json.loads(json.dumps(asdict(config)))
    return all(saved.get(k) == v for k, v in wanted.items() if k not in NOT_RESULTS)


def _finished(config: TrainConfig, out: Path) -> dict | None:
    """What the run ``config`` left in ``out`` if it finished there (its summary and metrics, or {"diverged":
    True}); None if ``out`` holds no finished run of exactly this setting."""
    if _same_config(out / "summary.json", config) and (out / "metrics.jsonl").exists():
        summary = json.loads((out / "summary.json").read_text())
        summary["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return summary
    if _same_config(out / DIVERGED, config):
        return {"diverged": True, "config": asdict(config)}
    return None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(jobs: int) -> int | None:
    """Torch threads of each run when ``jobs`` run at once: the CPUs shared out; None (the default) for one."""
    return None if jobs <= 1 else max(1, cpu_count() // jobs)


@contextlib.contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_all(runs: list[tuple[TrainConfig, Path]], *, jobs: int = 1, progress: bool = True,
            tolerate_divergence: bool = False) -> list[dict]:
    """Train every (config, out) of ``runs``, each in a fresh process, ``jobs`` at a time; returns their
    summaries (with metrics) in order. A run whose ``out`` already holds its finished summary.json (the same
    config) is reused, not trained again. With ``tolerate_divergence`` a run that stops on a NaN/inf loss gives
    {"diverged": True}; any other failure raises RuntimeError once the runs under way have ended."""
    results: list[dict | None] = [None] * len(runs)
    pending = deque()
    for index, (config, out) in enumerate(runs):
        done = _finished(config, out)
        if done is None:
            pending.append(index)
        else:
            results[index] = done
            print(f"reused {out}: its {'summary.json' if 'metrics' in done else DIVERGED} holds this setting",
                  flush=True)
    threads = threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")
    running, failed = {}, []
    while pending or running:
        while pending and len(running) < max(1, jobs) and not failed:
            index = pending.popleft()
            config, out = runs[index]
            out.mkdir(parents=True, exist_ok=True)
            process = context.Process(target=_run_in_child,
                                      args=(config, out, progress, threads, tolerate_divergence))
            with _environment(OMP_NUM_THREADS=str(threads)) if threads else contextlib.nullcontext():
                process.start()  # the child's OpenMP reads its environment at start
            running[process.sentinel] = index, process
        if failed and not running:
            break
        for sentinel in multiprocessing.connection.wait(list(running)):
            index, process = running.pop(sentinel)
            process.join()
            config, out = runs[index]
            results[index] = _finished(config, out) if process.exitcode == 0 else None
            if results[index] is None:
                failed.append(f"{config.optimizer} in {out} (exit code {process.exitcode})")
    if failed:
        raise RuntimeError(f"the run of {'; '.join(failed)} failed; see its output above")
    return results


def sweep_lr(config: TrainConfig, out: Path, steps: int, progress: bool,
             default: float | None = None) -> tuple[float, list[dict]]:
    """Try each factor × the default lr on a short budget (its own full schedule); keep the lowest loss on the
    tuning split. The validation split, which the bench reports, plays no part in the choice. ``default``: the
    centre, if not ``config.lr`` nor the optimizer's documented default (a transfer variant's: AdamW's)."""
    default = config.lr if config.lr is not None else default or OPTIMIZERS[config.optimizer].lr
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
              sweep_steps: int | None = None, tune: bool = False, lr_factors=LR_FACTORS, tune_seeds: int = TUNE_SEEDS,
              tie: float = TIE, key_search: str = "product", extend_edges: int = EXTEND_EDGES, jobs: int = 1,
              progress: bool = True, command: str | None = None) -> dict:
    """Train every optimizer once per seed (``base.seed``, ``base.seed + 1``, ...), compare each with AdamW from
    the same seed, and write results.json, report.md and plots into ``out``.

    ``optimizers``: names of OPTIMIZERS, and transfer variants ("sumo@adamw-lr" or "sumo:adamw": lr_scale="adamw"
    at AdamW's lr, see :func:`bench_names`). With ``lr_sweep`` (the quick sweep), each optimizer's lr is first
    picked on the tuning split with the first seed on a short budget, then used for every seed.

    With ``tune``, the fair tuning protocol: every setting of :func:`grid` (``lr_factors`` × the row's default
    lr, times its key hyperparameter's values) runs with seeds ``base.seed`` … ``base.seed + tune_seeds - 1`` at
    the full budget, scored on the tuning split (``key_search="coordinate"``: the key hyperparameter's other values
    only around the chosen lr, :func:`key_settings`); :func:`choose` keeps one setting per row (best mean over the
    seeds, ties within ``tie`` nats to the smaller spread); then the chosen settings run with ``seeds`` final
    seeds from ``base.seed + 10`` (disjoint from the tuning seeds), on the validation split.

    ``jobs`` runs at a time, each with cpu_count // jobs torch threads. A run whose summary.json in ``out``
    holds the same setting is reused. ``command`` is the command line to record in the report, if there was one.
    """
    optimizers = [entry_name(name) for name in optimizers]
    if "adamw" not in optimizers:
        optimizers = ["adamw", *optimizers]  # every ratio is against AdamW from the same bench
    base = replace(base, time_optimizer=True)  # the report compares optimizer-step times
    for name in optimizers:
        validate(entry_config(base, name))
    for label, value in (("seeds", seeds), ("tune_seeds", tune_seeds), ("jobs", jobs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {label}={value!r}: expected an integer ≥ 1")
    lr_factors = check_factors(lr_factors)
    if not (math.isfinite(tie) and tie >= 0):
        raise ValueError(f"invalid tie={tie!r}: expected a finite number ≥ 0")
    if tune and lr_sweep:
        raise ValueError("--tune and --lr-sweep are two ways to pick the lr: choose one")
    out.mkdir(parents=True, exist_ok=True)
    evaluation = _eval_sizes(_prepare_data_once(base, progress), base, lr_sweep or tune)  # too small a split fails

    sweep, tuning, chosen = None, None, {name: {} for name in optimizers}
    if lr_sweep:
        steps, trials = sweep_steps or max(1, base.steps // 3), {}
        for name in optimizers:
            lr, trials[name] = sweep_lr(entry_config(base, name), out / "sweep" / name, steps, progress,
                                        default=default_lr(name))
            chosen[name] = {"lr": lr}
        sweep = {"split": "tuning", "seed": base.seed, "steps": steps, "trials": trials,
                 "picked": {name: settings["lr"] for name, settings in chosen.items()}}
    elif tune:
        tuning = tune_settings(base, optimizers, out / "tune", lr_factors=lr_factors, tune_seeds=tune_seeds, tie=tie,
                               key_search=key_search, extend_edges=extend_edges, jobs=jobs, progress=progress)
        chosen = tuning["chosen"]
    else:
        for name in optimizers:
            if split_entry(name)[1] and base.lr is None:
                chosen[name] = {"lr": default_lr(name)}  # a transfer variant runs at AdamW's lr

    first = base.seed + max(FINAL_SEED_OFFSET, tune_seeds) if tune else base.seed
    final_seeds = list(range(first, first + seeds))
    runs = [(replace(entry_config(base, name), seed=seed, **chosen[name]), out / "runs" / f"seed_{seed}" / name)
            for seed in final_seeds for name in optimizers]
    summaries = iter(run_all(runs, jobs=jobs, progress=progress))
    per_seed = []
    for seed in final_seeds:
        results = {}
        for name in optimizers:
            result = next(summaries)
            breakdown = estimate(base.model, split_entry(name)[0], rank=result["hyperparameters"]["rank"],
                                 update_gap=base.update_gap, batch_size=base.batch_size, seq_len=base.seq_len,
                                 dtype=base.dtype, vocab_size=result["vocab_size"], per_layer=base.per_layer,
                                 chunked_loss=base.chunked_loss,
                                 activation_checkpointing=base.activation_checkpointing,
                                 embedding_state=base.embedding_state, freeze_embeddings=base.freeze_embeddings)
            result["estimated_memory"] = breakdown.total
            results[name] = result
        per_seed.append({"seed": seed, "comparison": compare(results), "runs": results})

    comparison = summarize([entry["comparison"] for entry in per_seed])
    adamw_std = comparison["adamw"]["final_val_loss"]["std"]
    if adamw_std is None and tuning is not None:  # one final seed: the tuning seeds' spread at its setting
        adamw_std = tuning["chosen_rows"]["adamw"]["std"]
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
        "jobs": jobs,
        "threads_per_job": threads_per_job(jobs),
        "adamw_spread": {"std": adamw_std, "threshold": SPREAD_WARNING, "warning": spread_warning(adamw_std)},
        "lr_sweep": sweep,
        "tuning": tuning,
        "comparison": comparison,
        "per_seed": per_seed,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plots(report, out)
    write_report(report, out)
    return report


def check_factors(factors) -> tuple[float, ...]:
    """The lr grid's factors as a tuple, lowest first; ValueError unless they are distinct, finite and > 0."""
    try:
        factors = tuple(sorted(float(f) for f in factors))
    except (TypeError, ValueError):
        raise ValueError(f"invalid lr_factors={factors!r}: expected numbers > 0") from None
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors) or len(set(factors)) < len(factors):
        raise ValueError(f"invalid lr_factors={factors!r}: expected distinct finite numbers > 0")
    return factors


def tune_settings(base: TrainConfig, optimizers: list[str], out: Path, *, lr_factors=LR_FACTORS,
                  tune_seeds: int = TUNE_SEEDS, tie: float = TIE, key_search: str = "product",
                  extend_edges: int = EXTEND_EDGES, jobs: int = 1, progress: bool = True) -> dict:
    """The protocol's search: every setting of each row's :func:`grid` over ``tune_seeds`` seeds, at the full
    budget, one evaluation at the end on the tuning split; with ``key_search="coordinate"`` then the second stage
    (:func:`key_settings` around each row's choice so far); then :func:`choose` per row over all its trials. Before
    the second stage, a row whose best lr is at an edge of its grid gets the next point beyond it
    (:func:`beyond_edge`), up to ``extend_edges`` times.
    Trials that diverge count as +inf. Returns the trials, the chosen settings and flags, the per-setting rows and
    the transfer summary."""
    if key_search not in KEY_SEARCHES:
        raise ValueError(f"invalid key_search={key_search!r}: expected one of {list(KEY_SEARCHES)}")
    seeds = list(range(base.seed, base.seed + tune_seeds))
    grids = {name: lr_grid(default_lr(name), lr_factors) for name in optimizers}
    trials = {name: [] for name in optimizers}

    def run_stage(settings_of: dict[str, list[dict]]) -> None:
        runs, where = [], []
        for name, settings_list in settings_of.items():
            for settings in settings_list:
                for seed in seeds:
                    config = replace(entry_config(base, name), seed=seed, eval_split="tuning", eval_every=base.steps,
                                     save_every=base.steps, **settings)
                    runs.append((config, out / name / trial_dir(settings) / f"seed_{seed}"))
                    where.append((name, settings, seed))
        summaries = run_all(runs, jobs=jobs, progress=progress, tolerate_divergence=True)
        for (name, settings, seed), (_, run), summary in zip(where, runs, summaries):
            loss = None if summary.get("diverged") else summary["final_val_loss"]  # the runs' eval split: tuning
            trials[name].append({"settings": settings, "seed": seed, "tuning_loss": _finite_or_none(loss),
                                 "diverged": loss is None or not math.isfinite(loss), "dir": str(run)})

    run_stage({name: grid(base, name, lr_factors, key_search) for name in optimizers})
    for _ in range(extend_edges):
        extra = {}
        for name in optimizers:
            lr = beyond_edge(grids[name], *choose(trials[name], tie))
            if lr is not None:
                grids[name] = sorted([*grids[name], lr])
                extra[name] = [{"lr": lr}]
        if not extra:
            break
        run_stage(extra)
    if key_search == "coordinate":
        run_stage({name: key_settings(base, name, grids[name], choose(trials[name], tie)[0]["lr"])
                   for name in optimizers})
    chosen, flags, rows, chosen_rows = {}, {}, {}, {}
    for name in optimizers:
        chosen[name], flags[name] = choose(trials[name], tie)
        rows[name] = [_json_row(row) for row in aggregate(trials[name])]
        chosen_rows[name] = next(row for row in rows[name] if _key(row["settings"]) == _key(chosen[name]))
    transfer = [_json_row(row) for row in transfer_summary(trials, chosen, grids)] if "adamw" in trials else []
    return {"split": "tuning", "seeds": seeds, "steps": base.steps, "lr_factors": list(lr_factors), "tie": tie,
            "key_search": key_search, "extend_edges": extend_edges,
            "key_hyperparameters": {name: key_hyperparameter(entry_config(base, name)) for name in optimizers},
            "grids": grids, "trials": trials, "rows": rows, "chosen": chosen, "chosen_rows": chosen_rows,
            "flags": flags, "transfer": transfer}


def trial_dir(settings: dict) -> str:
    """A trial's directory name: lr_0.001, or lr_0.001_beta2_0.95."""
    return "_".join(f"{key}_{value:.3g}" for key, value in settings.items())


def _finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None


def _json_row(row: dict) -> dict:
    """A row with its infinities as None: results.json stays standard JSON."""
    return {key: _finite_or_none(value) if isinstance(value, float) else value for key, value in row.items()}


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
