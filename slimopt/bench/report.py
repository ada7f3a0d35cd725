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


# ----------------------------------------------------------------- the fair tuning protocol's sections

FLAG_TEXT = {
    "low-edge": "**lowest lr of its grid: the best may lie below it**",
    "high-edge": "**highest lr of its grid: the best may lie above it**",
    "tie-break": "within the tie tolerance of the best mean; kept for its smaller seed spread",
    "all-diverged": "**every setting diverged in some seed**: the lowest lr kept",
}


def _settings(settings: dict, lr: bool = True) -> str:
    items = [(key, value) for key, value in settings.items() if lr or key != "lr"]
    return ", ".join(f"{key} {value:.3g}" for key, value in items) or "–"


def _mean_loss(row: dict) -> str:
    if row["diverged"]:
        return f"diverged ({row['diverged']} of {len(row['losses'])} seeds)"
    text = f"{row['mean']:.3f}"
    return text if len(row["losses"]) < 2 else f"{text} [{row['min']:.3f}, {row['max']:.3f}]"


def _key_values(tuning: dict, name: str) -> str:
    key = tuning["key_hyperparameters"][name]
    return "–" if key is None else f"{key[0]} ∈ {{{', '.join(f'{v:g}' for v in key[1])}}}"


def _lrs(lrs: list[float]) -> str:
    return f"{lrs[0]:.3g} … {lrs[-1]:.3g} ({len(lrs)} points)"


def chosen_table(tuning: dict) -> str:
    """Per row: its key hyperparameter's values, lr grid, chosen setting, its tuning loss and flags."""
    lines = ["| optimizer | key hyperparameter | lr grid | chosen lr | chosen key value | tuning loss, mean "
             "[min, max] over seeds | note |", "|---|---|---|---:|---|---:|---|"]
    for name, settings in tuning["chosen"].items():
        row = tuning["chosen_rows"][name]
        note = "; ".join(FLAG_TEXT[flag] for flag in tuning["flags"][name]) or ""
        lines.append(f"| {name} | {_key_values(tuning, name)} | {_lrs(tuning['grids'][name])} | {settings['lr']:.3g} "
                     f"| {_settings(settings, lr=False)} | {_mean_loss(row)} | {note} |")
    return "\n".join(lines)


def sensitivity_table(tuning: dict) -> str:
    """One line per (row, key value): lr → mean tuning loss [min, max] over the tuning seeds; the chosen in bold."""
    lines = ["| optimizer | key value | lr → tuning loss, mean [min, max] over seeds (chosen in bold) |",
             "|---|---|---|"]
    for name, rows in tuning["rows"].items():
        chosen = tuning["chosen"][name]
        for key, group in _by_key_value(rows).items():
            cells = []
            for row in group:
                cell = f"{row['settings']['lr']:.3g} → {_mean_loss(row)}"
                cells.append(f"**{cell}**" if row["settings"] == chosen else cell)
            lines.append(f"| {name} | {key} | {', '.join(cells)} |")
    return "\n".join(lines)


def _by_key_value(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of one optimizer by the value of its key hyperparameter ("–" where none), each lowest lr first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_settings(row["settings"], lr=False), []).append(row)
    return {key: sorted(group, key=lambda row: row["settings"]["lr"]) for key, group in groups.items()}


def transfer_table(tuning: dict) -> str:
    lines = ["| optimizer | its best lr | AdamW's best lr | grid steps apart | tuning loss at AdamW's best lr "
             "| tuned AdamW's tuning loss | Δ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in tuning["transfer"]:
        apart = f"{row['steps_apart']}" + (" (within one)" if row["within_one_step"] else " (**more than one**)")
        at = "diverged" if row["tuning_loss_at_adamw_lr"] is None else f"{row['tuning_loss_at_adamw_lr']:.3f}"
        adamw = "diverged" if row["adamw_tuning_loss"] is None else f"{row['adamw_tuning_loss']:.3f}"
        delta = "n/a" if row["delta"] is None else f"{row['delta']:+.3f}"
        lines.append(f"| {row['optimizer']} | {row['best_lr']:.3g} | {row['adamw_lr']:.3g} | {apart} | {at} | {adamw} "
                     f"| {delta} |")
    return "\n".join(lines)


def spread_line(report: dict) -> str | None:
    """AdamW's seed spread at its setting; a bold warning above the threshold."""
    spread = report.get("adamw_spread") or {}
    if spread.get("std") is None:
        return None
    where = ("over the final seeds" if report["comparison"]["adamw"]["final_val_loss"]["std"] is not None
             else "over the tuning seeds")
    if spread["warning"]:
        return (f"> **Warning: AdamW's seed spread at its setting is {spread['std']:.3f} nats (sample std {where}), "
                f"above {spread['threshold']:.2f}: a Δ vs AdamW smaller than about that is not resolved by these "
                "seeds. The table shows each Δ with its spread (mean ± std over the seeds).**")
    return (f"- AdamW's seed spread at its setting: {spread['std']:.3f} nats (sample std {where}), within "
            f"{spread['threshold']:.2f}.")


def protocol_lines(report: dict) -> list[str]:
    tuning, config, evaluation = report["tuning"], report["config"], report["eval"]
    factors = ", ".join(f"{f:.3g}" for f in tuning["lr_factors"])
    seeds = ", ".join(map(str, tuning["seeds"]))
    clip = f"clipped to a global norm of {config['clip']:g}" if config["clip"] > 0 else "not clipped"
    lines = [
        "", "## Fair tuning protocol", "",
        f"- the same search for every optimizer: lrs {{{factors}}}× its default lr (a transfer variant "
        "`NAME@adamw-lr`, lr_scale=adamw: AdamW's grid, the same absolute lrs), times the values of its key "
        "hyperparameter (table below; SWAN, Muon, RSO and the transfer variants have none), "
        f"each setting trained with tuning seeds {seeds} at the full budget ({tuning['steps']} steps, the same "
        "schedule) and scored by its final loss on the **tuning split** "
        f"({_held_out(evaluation['tuning'])}); the validation split plays no part in the choice.",
        f"- the choice: the lowest mean tuning loss over the tuning seeds ({len(tuning['seeds'])}); a seed that "
        "diverged "
        "(NaN/inf) counts as +inf, so a setting that diverges in any seed is not chosen. Settings within "
        f"{tuning['tie']:g} nats of the best mean (about the evaluation's standard error) tie: of those, the one "
        "with the smaller seed spread is kept.",
        f"- gradients {clip} for every optimizer, in tuning and final runs alike.",
        f"- the chosen settings then ran over final seeds {', '.join(map(str, report['seeds']))} (disjoint from the "
        "tuning seeds), reported on the validation split above.",
        "- the AdamW group (embeddings, head, norms) of the other optimizers keeps AdamW's default lr.",
        "", "### Chosen settings", "", chosen_table(tuning),
    ]
    if tuning["transfer"]:
        lines += ["", "### lr transfer: lr_scale=adamw on AdamW's grid", "",
                  "Whether each transfer variant's best lr is within one grid step of AdamW's best, and its tuning "
                  "loss (mean over the tuning seeds) at AdamW's best lr against tuned AdamW's.", "",
                  transfer_table(tuning)]
    lines += ["", "### lr sensitivity (tuning split)", "",
              "Final tuning loss against lr, mean over the tuning seeds (band: min–max), from the protocol's own "
              "runs; one line per optimizer and key-hyperparameter value.", "",
              "![lr sensitivity](lr_sensitivity.png)", "", sensitivity_table(tuning)]
    return lines


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
    tuning = report.get("tuning")
    lr = (f"picked per optimizer from {{1/3, 1, 3}}× its default by the loss on the **tuning split** (disjoint from "
          f"validation, {_held_out(evaluation['tuning'])}) after {sweep['steps']}-step trials with seed "
          f"{sweep['seed']}; then used for every seed" if sweep else "each optimizer's documented default")
    if tuning:
        lr = (f"tuned per optimizer, with its key hyperparameter, by the fair tuning protocol below: the same "
              f"search for every one, {len(tuning['lr_factors'])} lrs × its key values, seeds "
              f"{', '.join(map(str, tuning['seeds']))}, chosen on the **tuning split**; the seeds above are "
              "disjoint final seeds")
    clip = config.get("clip", 0)
    jobs = report.get("jobs", 1)
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
        f"- gradient clipping: global gradient norm clipped to {clip:g} for every optimizer." if clip > 0 else
        "- gradient clipping: none.",
        f"- peak memory: {report['memory_kind']}; each run had its own process. 'est.' is `slimopt memory`'s "
        "analytic total for the same setting.",
        "- ratios in parentheses are against AdamW of the same seed; times are medians over steps"
        + (f"; the runs went {jobs} at a time (--jobs {jobs}, {report.get('threads_per_job')} torch threads each), "
           "so step times are noisier than one at a time and not comparable with a --jobs 1 bench." if jobs > 1
           else "; one run at a time."),
        *(["", spread_line(report)] if spread_line(report) else []),
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
    if tuning:
        lines += protocol_lines(report)
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
    if report.get("tuning"):
        write_sensitivity_plot(report, out)


def write_sensitivity_plot(report: dict, out: Path) -> None:
    """lr_sensitivity.png: a panel per optimizer (its transfer variant with it), final tuning loss against lr
    (log axis), mean over the tuning seeds with a min–max band, one line per (row, key value); the chosen setting
    starred, tuned AdamW's mean tuning loss dashed; a setting that diverged in some seed is left out."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tuning = report["tuning"]
    panels: dict[str, list[str]] = {}
    for name in tuning["rows"]:
        panels.setdefault(name.split("@")[0], []).append(name)
    columns = min(4, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(4.2 * columns, 3.4 * rows_of_panels),
                                squeeze=False)
    adamw = tuning["chosen_rows"].get("adamw", {}).get("mean")
    for axis, (optimizer, names) in zip(axes.flat, panels.items()):
        for name in names:
            for key, group in _by_key_value(tuning["rows"][name]).items():
                kept = [row for row in group if not row["diverged"]]
                if not kept:
                    continue
                lrs = [row["settings"]["lr"] for row in kept]
                line, = axis.plot(lrs, [row["mean"] for row in kept], marker=".",
                                  label=name if key == "–" else f"{name}, {key}")
                axis.fill_between(lrs, [row["min"] for row in kept], [row["max"] for row in kept],
                                  color=line.get_color(), alpha=0.2)
                for row in kept:
                    if row["settings"] == tuning["chosen"][name]:
                        axis.plot([row["settings"]["lr"]], [row["mean"]], marker="*", markersize=12,
                                  color=line.get_color())
        if adamw is not None and optimizer != "adamw":
            axis.axhline(adamw, color="grey", linestyle="--", linewidth=1, label="tuned AdamW")
        axis.set_xscale("log")
        axis.set(title=optimizer, xlabel="lr", ylabel="final tuning loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"lr sensitivity on the tuning split: mean of seeds {tuning['seeds']}, band min–max, ★ chosen — "
                    f"{report['config']['model']} on {report['config']['data']}, {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "lr_sensitivity.png", dpi=120)
    plt.close(figure)
