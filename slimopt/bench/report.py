"""The bench's outputs: a table (terminal and report.md) and PNG plots.

Every number is summarized over the seeds as mean ± sample standard deviation (`run.spread`); with one seed,
the value alone.
"""

from __future__ import annotations

from pathlib import Path

MiB = 2**20


def _mean(stat: dict, form: str, scale: float = 1.0) -> str:
    """The mean alone: for numbers the seed cannot change (state bytes, the analytic estimate)."""
    return "n/a" if stat["n"] == 0 else format(stat["mean"] * scale, form)


def _spread(stat: dict, form: str, scale: float = 1.0) -> str:
    if stat["n"] == 0 or stat["std"] is None:
        return _mean(stat, form, scale)
    return f"{format(stat['mean'] * scale, form)} ± {format(stat['std'] * scale, form.lstrip('+'))}"


def _ratio(stat: dict) -> str:
    return f"{_spread(stat, '.2f')}×"


def _steps(row: dict) -> str:
    reached = row["steps_to_baseline_loss"]
    if reached["n"] == 0:
        return "not reached"
    text = f"{_spread(reached, '.0f')} ({_ratio(row['steps_ratio'])})"
    return text if reached["n"] == reached["of"] else f"{text}, {reached['n']} of {reached['of']} seeds"


def _loss(stat: dict) -> str:
    text = _spread(stat, ".3f")
    return text if stat["n"] < 2 else f"{text} [{stat['min']:.3f}, {stat['max']:.3f}]"


def comparison_table(report: dict) -> str:
    lines = [
        "| optimizer | lr | val loss | Δ vs AdamW | val ppl | steps to AdamW's loss | peak memory (MiB) | est. (MiB) "
        "| state (MiB) | step time (ms) | optimizer-step time (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["comparison"].items():
        lines.append(
            f"| {name} | {row['lr']:.3g} | {_loss(row['final_val_loss'])} | {_spread(row['val_loss_delta'], '+.3f')} "
            f"| {_spread(row['final_val_ppl'], '.1f')} | {_steps(row)} "
            f"| {_spread(row['peak_memory'], '.1f', 1 / MiB)} ({_ratio(row['peak_memory_ratio'])}) "
            f"| {_mean(row['estimated_memory'], '.1f', 1 / MiB)} "
            f"| {_mean(row['optimizer_state_bytes'], '.2f', 1 / MiB)} ({_mean(row['state_ratio'], '.2f')}×) "
            f"| {_spread(row['median_step_time'], '.0f', 1e3)} ({_ratio(row['step_time_ratio'])}) "
            f"| {_spread(row['median_optimizer_time'], '.1f', 1e3)} ({_ratio(row['optimizer_time_ratio'])}) |"
        )
    return "\n".join(lines)


def per_seed_table(report: dict) -> str:
    seeds = report["per_seed"]
    lines = ["| optimizer | " + " | ".join(f"seed {entry['seed']}" for entry in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for name in report["comparison"]:
        cells = []
        for entry in seeds:
            row = entry["comparison"][name]
            reached = row["steps_to_baseline_loss"]
            cells.append(f"{row['final_val_loss']:.3f}, " + ("not reached" if reached is None else f"{reached:.0f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _held_out(sizes: dict) -> str:
    if sizes["split_tokens"] is None:
        return f"{sizes['tokens']:,} tokens"
    return f"{sizes['tokens']:,} of its {sizes['split_tokens']:,} tokens"


def write_report(report: dict, out: Path) -> None:
    config, evaluation, sweep = report["config"], report["eval"], report["lr_sweep"]
    tokens = config["steps"] * config["batch_size"] * config["grad_accum"] * config["seq_len"]
    seeds = report["seeds"]
    same_start = "every optimizer starts from the same weights and sees the same batches"
    seeds_line = (f"- seeds {', '.join(map(str, seeds))}: within a seed {same_start}; numbers are mean ± sample "
                  f"standard deviation over n={len(seeds)} seeds, [min, max] after the val loss."
                  if len(seeds) > 1 else
                  f"- seed {seeds[0]} only, so no spread to judge differences by (`--seeds 3` reports mean ± "
                  f"standard deviation); {same_start}.")
    lr = (f"picked per optimizer from {{1/3, 1, 3}}× its default by the loss on the **tuning split** (disjoint from "
          f"validation, {_held_out(evaluation['tuning'])}) after {sweep['steps']}-step trials with seed "
          f"{sweep['seed']}; then used for every seed" if sweep else "each optimizer's documented default")
    lines = [
        "# slimopt bench",
        "",
        f"- command: `{report['command']}`" if report["command"] else "- command: (called from Python)",
        f"- date: {report['date']}; device: {report['device']}; torch {report['torch']}, Python {report['python']}; "
        f"slimopt commit {report['slimopt'] or 'unknown'}",
        f"- model `{config['model']}` on data `{config['data']}`, {config['steps']} steps of "
        f"{config['batch_size'] * config['grad_accum']}×{config['seq_len']} tokens ({tokens / 1e6:.2f}M tokens), "
        f"{config['dtype']}, warmup + cosine to 10%",
        seeds_line + " 'Δ vs AdamW': the difference in val loss from AdamW of the same seed.",
        f"- val loss: the mean loss over every predicted token of the validation split's windows, spread evenly over "
        f"the split: {_held_out(evaluation['validation'])} per evaluation, every {evaluation['every']} steps and at "
        "the end.",
        "- steps to AdamW's loss: where the val-loss curve first comes down to AdamW's final val loss of the same "
        "seed, linearly interpolated between the two evaluations around the crossing (× AdamW's steps).",
        f"- lr: {lr}.",
        f"- peak memory: {report['memory_kind']}; each run had its own process. 'est.' is `slimopt memory`'s "
        "analytic total for the same setting.",
        "- ratios in parentheses are against AdamW of the same seed; times are medians over steps.",
        "",
        comparison_table(report),
        "",
        "![validation loss](val_loss.png)",
        "",
        "![memory](memory.png)",
        "",
        "## Per seed: val loss, steps to AdamW's loss",
        "",
        per_seed_table(report),
    ]
    if sweep:
        lines += ["", f"## Learning-rate sweep (tuning split, seed {sweep['seed']}, {sweep['steps']} steps)", "",
                  "| optimizer | lr → tuning loss | picked |", "|---|---|---:|"]
        for name, trials in sweep["trials"].items():
            tried = ", ".join(f"{t['lr']:.3g} → {t['tuning_loss']:.3f}" for t in trials)
            lines.append(f"| {name} | {tried} | {sweep['picked'][name]:.3g} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def write_plots(report: dict, out: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in report["comparison"]:
        steps, losses, clocks = None, [], []
        for entry in report["per_seed"]:
            metrics = entry["runs"][name]["metrics"]
            clock = np.cumsum([m["step_time"] for m in metrics])
            evaluated = [i for i, m in enumerate(metrics) if "val_loss" in m]
            steps = [metrics[i]["step"] for i in evaluated]  # the same evaluation steps in every seed
            losses.append([metrics[i]["val_loss"] for i in evaluated])
            clocks.append(clock[evaluated])
        losses, clock = np.array(losses), np.mean(clocks, axis=0)
        for axis, x in ((by_step, steps), (by_time, clock)):
            line, = axis.plot(x, losses.mean(axis=0), marker=".", label=name)
            if len(losses) > 1:
                axis.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
    band = f"mean of {len(report['seeds'])} seeds, band min–max" if len(report["seeds"]) > 1 else "one seed"
    by_step.set(xlabel="step", ylabel="validation loss", title=f"validation loss against steps ({band})")
    by_time.set(xlabel="training time (s, sum of step times; mean over seeds)", ylabel="validation loss",
                title="validation loss against wall-clock")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{report['config']['model']} on {report['config']['data']} — {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "val_loss.png", dpi=120)
    plt.close(figure)

    names = list(report["comparison"])
    rows = list(report["comparison"].values())
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    positions = np.arange(len(names))
    for offset, (label, key) in enumerate([("peak memory (measured)", "peak_memory"),
                                           ("estimate (slimopt memory)", "estimated_memory"),
                                           ("optimizer state", "optimizer_state_bytes")]):
        errors = [(row[key]["std"] or 0) / MiB for row in rows]
        axis.bar(positions + (offset - 1) * width, [row[key]["mean"] / MiB for row in rows], width, yerr=errors,
                 label=label)
    axis.set_xticks(positions, names)
    axis.set(ylabel="MiB", title=f"memory ({report['memory_kind']}; error bars: std over seeds)")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "memory.png", dpi=120)
    plt.close(figure)
