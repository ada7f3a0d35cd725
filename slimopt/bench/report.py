"""The bench's outputs: a table (terminal and report.md) and PNG plots."""

from __future__ import annotations

from pathlib import Path

MiB = 2**20


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def comparison_table(report: dict) -> str:
    lines = [
        "| optimizer | lr | val loss | val ppl | steps to AdamW's loss | peak memory (MiB) | est. (MiB) "
        "| state (MiB) | step time | optimizer-step time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["comparison"].items():
        reached = row["steps_to_baseline_loss"]
        steps = "not reached" if reached is None else f"{reached} ({_ratio(row['steps_ratio'])})"
        lines.append(
            f"| {name} | {row['lr']:.3g} | {row['final_val_loss']:.3f} | {row['final_val_ppl']:.1f} | {steps} "
            f"| {row['peak_memory'] / MiB:.1f} ({_ratio(row['peak_memory_ratio'])}) "
            f"| {row['estimated_memory'] / MiB:.1f} "
            f"| {row['optimizer_state_bytes'] / MiB:.2f} ({_ratio(row['state_ratio'])}) "
            f"| {row['median_step_time'] * 1e3:.0f} ms ({_ratio(row['step_time_ratio'])}) "
            f"| {row['median_optimizer_time'] * 1e3:.1f} ms ({_ratio(row['optimizer_time_ratio'])}) |"
        )
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    config = report["config"]
    tokens = config["steps"] * config["batch_size"] * config["grad_accum"] * config["seq_len"]
    lines = [
        "# slimopt bench",
        "",
        f"- command: `{report['command']}`" if report["command"] else "- command: (called from Python)",
        f"- date: {report['date']}; device: {report['device']}; torch {report['torch']}, Python {report['python']}; "
        f"slimopt commit {report['slimopt'] or 'unknown'}",
        f"- model `{config['model']}` on data `{config['data']}`, {config['steps']} steps of "
        f"{config['batch_size'] * config['grad_accum']}×{config['seq_len']} tokens ({tokens / 1e6:.2f}M tokens), "
        f"seed {config['seed']}, {config['dtype']}, warmup + cosine to 10%",
        f"- peak memory: {report['memory_kind']}; each optimizer ran in its own process. "
        "'est.' is `slimopt memory`'s analytic total for the same setting.",
        "- ratios in parentheses are against AdamW measured in this run; times are medians over steps.",
        "",
        comparison_table(report),
        "",
        "![validation loss](val_loss.png)",
        "",
        "![memory](memory.png)",
    ]
    if report["lr_sweep"]:
        lines += ["", "## Learning-rate sweep", "", "| optimizer | lr → val loss |", "|---|---|"]
        for name, trials in report["lr_sweep"].items():
            lines.append(f"| {name} | " + ", ".join(f"{t['lr']:.3g} → {t['val_loss']:.3f}" for t in trials) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def write_plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = report["runs"]
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        evaluated = [m for m in run["metrics"] if "val_loss" in m]
        elapsed, clock = 0.0, {}
        for m in run["metrics"]:
            elapsed += m["step_time"]
            clock[m["step"]] = elapsed
        by_step.plot([m["step"] for m in evaluated], [m["val_loss"] for m in evaluated], marker=".", label=name)
        by_time.plot([clock[m["step"]] for m in evaluated], [m["val_loss"] for m in evaluated], marker=".",
                     label=name)
    by_step.set(xlabel="step", ylabel="validation loss", title="validation loss against steps")
    by_time.set(xlabel="training time (s, sum of step times)", ylabel="validation loss",
                title="validation loss against wall-clock")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{report['config']['model']} on {report['config']['data']} — {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "val_loss.png", dpi=120)
    plt.close(figure)

    names = list(report["comparison"])
    rows = report["comparison"].values()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    positions = range(len(names))
    for offset, (label, key) in enumerate([("peak memory (measured)", "peak_memory"),
                                           ("estimate (slimopt memory)", "estimated_memory"),
                                           ("optimizer state", "optimizer_state_bytes")]):
        axis.bar([p + (offset - 1) * width for p in positions], [row[key] / MiB for row in rows], width, label=label)
    axis.set_xticks(list(positions), names)
    axis.set(ylabel="MiB", title=f"memory ({report['memory_kind']})")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "memory.png", dpi=120)
    plt.close(figure)
