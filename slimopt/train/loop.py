"""``slimopt train``: one optimizer, one model, one token budget, with metrics and resumable checkpoints.

A run writes into its output directory:
    metrics.jsonl   one line per step (val loss and ppl at every ``eval_every`` steps and at the end)
    checkpoint.pt   model + optimizer + data position + RNG, replaced atomically every ``save_every`` steps
                    (``--parallel``: the directory checkpoint/, through torch.distributed.checkpoint)
    summary.json    final numbers, written when the run completes

``--resume`` restarts from checkpoint.pt; on CPU the resumed run continues
bit-identically, because every source of change (weights, optimizer state,
data position, RNG) is restored and nothing depends on wall-clock.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from slimopt.data import SOURCES, prepare
from slimopt.data.tokens import EVAL_TOKENS
from slimopt.distributed import checkpoint as sharded_checkpoint
from slimopt.distributed import state_bytes_here
from slimopt.environment import device_name
from slimopt.optim.algorithm import LR_SCALES
from slimopt.train import checkpoint
from slimopt.train.loss import chunked_loss_refusal, use_chunked_loss
from slimopt.train.models import (
    PRECISIONS,
    build_model,
    check_model,
    check_tokenizer,
    meta_model,
    tokenizer_for,
    vocab_size_for,
)
from slimopt.train.optimizers import (
    OPTIMIZERS,
    Hyperparameters,
    build_optimizers,
    check_embedding_state,
    check_optimizer,
    per_layer_refusal,
    split_per_parameter,
    state_bytes,
)
from slimopt.train.parallel import PARALLEL, any_rank, gather, join, leader_first, mean_over_ranks, wrap
from slimopt.train.peak import PeakMemory
from slimopt.train.report import (
    Console,
    Reporter,
    check_report_to,
    header_lines,
    open_reporter,
    resolved_defaults,
    write_config,
)

# validation: what runs report; tuning: what lr sweeps pick on, so that the reported split chose nothing.
EVAL_SPLITS = ("validation", "tuning")
# The exact-maths choices both SUMO (orthogonalizer) and SWAN (whitening) accept.
EXACT_CHOICES = ("auto", "polar", "polar_express", "eigh", "newton_schulz")


@dataclass
class TrainConfig:
    model: str = "tiny"
    data: str = "builtin"
    tokenizer: str | None = None  # None: a model directory's own, else a byte-level BPE trained on the data
    vocab_size: int | None = None  # None: the preset's
    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's documented default
    adamw_lr: float | None = None  # for embeddings, head and norms; None: AdamW's default lr
    weight_decay: float = 0.0
    beta2: float | None = None  # Adam's β₂ (AdamW and every Adam-moment method); None: each optimizer's default
    scale: float | None = None  # GaLore's, SUMO's and APOLLO's update scale; None: each one's published default
    lr_scale: str = "published"  # "adamw": every update rescaled to AdamW's RMS, so AdamW's lr carries over
    rank: int | None = None  # None: hidden size / 4
    update_gap: int = 200
    orthogonalizer: str = "auto"  # SUMO's orthogonalizer and SWAN's whitening: auto, polar, eigh, newton_schulz
    steps: int = 300
    warmup: int | None = None  # None: 10% of steps
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    clip: float = 0.0  # max global gradient norm; 0 = no clipping
    seed: int = 0
    dtype: str = "fp32"  # a key of PRECISIONS: fp32, bf16 (fp32 weights, bf16 autocast) or bf16-pure
    stochastic_rounding: bool = False  # bf16-pure only: round each update of the weights stochastically
    device: str = "auto"  # auto: cuda if available, else mps if available, else cpu (resolve_device)
    per_layer: bool = False
    chunked_loss: bool = True  # the loss from the hidden states, chunk by chunk: no tokens × vocab logits held
    activation_checkpointing: bool = False  # keep each decoder layer's input only; recompute the rest in backward
    freeze_embeddings: bool = False  # fine-tuning: the input embeddings (and a head tied to them) get no update
    embedding_state: str = "adamw"  # the fallback group's state (embeddings, head, norms): adamw, 8bit or factored
    parallel: str = "none"  # under torchrun: ddp or fsdp
    time_optimizer: bool = False  # CUDA: time optimizer.step() apart, at the cost of a sync after it (CPU: always)
    eval_every: int = 50
    eval_tokens: int = EVAL_TOKENS  # per evaluation, in windows spread over the whole split
    eval_split: str = "validation"  # which held-out split the val_loss metrics read
    save_every: int = 100
    log_every: int = 10  # steps between console lines (and a line at every evaluation)
    report_to: str = "none"  # none, tensorboard or wandb, as HF's TrainingArguments names them


# A resumed run must agree with its checkpoint on everything that shapes the model, the optimizer
# state or the batches; the rest (schedule length, logging, lr after a divergence) may change.
RESUME_MUST_MATCH = ("model", "data", "tokenizer", "vocab_size", "optimizer", "rank", "update_gap", "orthogonalizer",
                     "lr_scale", "batch_size", "seq_len", "grad_accum", "seed", "dtype", "stochastic_rounding",
                     "per_layer", "parallel", "freeze_embeddings", "embedding_state")


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a step boundary, after saving a checkpoint there."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path, leader: bool):
        self.signum, self.step, self.steps, self.checkpoint, self.leader = signum, step, steps, checkpoint, leader
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step} of {steps}; checkpoint "
                         f"saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# What a run directory holds; an existing one is only reused with --resume (continue) or --overwrite (start over).
RUN_FILES = ("checkpoint.pt", "checkpoint", "metrics.jsonl", "summary.json")
RUN_OUTPUTS = (*RUN_FILES, "checkpoint.pt.tmp", "config.toml", "tensorboard", "wandb_run_id")


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """ValueError if ``out`` already holds a run and neither --resume nor --overwrite says what to do with it."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                         "--overwrite starts it over")
    held = [name for name in RUN_FILES if (Path(out) / name).exists()]
    if held and not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue it, or "
                         "--overwrite to start over and replace it")


def check_source(data: str) -> None:
    if data not in SOURCES and not Path(data).exists():
        raise ValueError(f"invalid data={data!r}: expected one of {sorted(SOURCES)} or an existing .txt/.jsonl file "
                         "or folder")


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad setting, before anything is built."""
    check_model(config.model)
    check_source(config.data)
    check_optimizer(config.optimizer)
    positive = {"steps": config.steps, "batch_size": config.batch_size, "seq_len": config.seq_len,
                "grad_accum": config.grad_accum, "update_gap": config.update_gap, "eval_every": config.eval_every,
                "eval_tokens": config.eval_tokens, "save_every": config.save_every, "log_every": config.log_every}
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {name}={value!r}: expected an integer ≥ 1")
    for name in ("rank", "vocab_size"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"invalid {name}={value!r}: expected an integer ≥ 1")
    if config.warmup is not None and not 0 <= config.warmup <= config.steps:
        raise ValueError(f"invalid warmup={config.warmup!r}: expected an integer in [0, steps={config.steps}]")
    for name in ("lr", "adamw_lr", "weight_decay", "clip"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"invalid {name}={value!r}: expected a finite number ≥ 0")
    if config.beta2 is not None and not (math.isfinite(config.beta2) and 0 <= config.beta2 < 1):
        raise ValueError(f"invalid beta2={config.beta2!r}: expected a number in [0, 1)")
    if config.scale is not None and not (math.isfinite(config.scale) and config.scale > 0):
        raise ValueError(f"invalid scale={config.scale!r}: expected a finite number > 0")
    if config.lr_scale not in LR_SCALES:
        raise ValueError(f"invalid lr_scale={config.lr_scale!r}: expected one of {list(LR_SCALES)}")
    if config.orthogonalizer not in EXACT_CHOICES:
        raise ValueError(f"invalid orthogonalizer={config.orthogonalizer!r}: expected one of {list(EXACT_CHOICES)}")
    if config.eval_split not in EVAL_SPLITS:
        raise ValueError(f"invalid eval_split={config.eval_split!r}: expected one of {list(EVAL_SPLITS)}")
    if config.dtype not in PRECISIONS:
        raise ValueError(f"invalid dtype={config.dtype!r}: expected one of {sorted(PRECISIONS)}")
    if config.stochastic_rounding:
        if PRECISIONS[config.dtype].weights == torch.float32:
            raise ValueError(f"--stochastic-rounding needs --dtype bf16-pure: with dtype={config.dtype!r} the "
                             "weights are fp32, so no update is rounded to bf16")
        if not OPTIMIZERS[config.optimizer].stochastic_rounding:
            raise ValueError(f"--stochastic-rounding does not support optimizer={config.optimizer!r}: torch's "
                             "implementation rounds its bf16 updates to nearest")
    if config.device not in DEVICES and not config.device.startswith("cuda:"):
        raise ValueError(f"invalid device={config.device!r}: expected one of {list(DEVICES)} or 'cuda:N'")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"invalid device={config.device!r}: CUDA is not available on this machine")
    if config.device == "mps" and not _mps_available():
        raise ValueError(f"invalid device={config.device!r}: MPS is not available on this machine")
    if config.parallel not in PARALLEL:
        raise ValueError(f"invalid parallel={config.parallel!r}: expected one of {list(PARALLEL)}")
    check_embedding_state(config.embedding_state)
    if config.parallel != "none" and config.embedding_state != "adamw":
        raise ValueError(f"--embedding-state {config.embedding_state} does not support --parallel {config.parallel}: "
                         "its per-block scales and factored means do not shard like the parameter; use "
                         "--embedding-state adamw")
    check_report_to(config.report_to)
    if config.parallel != "none":
        if config.per_layer and config.parallel == "ddp":
            raise ValueError("--per-layer cannot combine with --parallel ddp: under DDP a gradient hook sees this "
                             "rank's local gradient before it is all-reduced, so each rank would update with its own")
        if config.per_layer:
            raise ValueError("--per-layer cannot combine with --parallel fsdp: FSDP2 reduce-scatters a layer's "
                             "gradients into their shards after its backward, where no per-parameter hook sees them; "
                             "FSDP2 already keeps only this rank's shard of every gradient")
        if config.parallel == "fsdp" and config.optimizer == "muon":
            raise ValueError("--parallel fsdp does not support optimizer='muon': torch's Muon takes no sharded "
                             "(DTensor) parameters")
    if config.per_layer:
        refusal = per_layer_refusal(config.optimizer)
        if refusal is not None:
            raise ValueError(refusal)
        if config.grad_accum > 1:
            raise ValueError("--per-layer cannot combine with grad_accum > 1: each parameter is updated as soon as "
                             "its gradient is ready, so gradients never accumulate over micro-batches")
        if config.clip > 0:
            raise ValueError("--per-layer cannot combine with clip > 0: clipping needs the global gradient norm, "
                             "i.e. every gradient at once, which per-layer updates never keep")


DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(device: str) -> str:
    """--device: "auto" is cuda if available, else mps if available, else cpu; any other value stays as it is."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (as in GaLore's pre-training runs)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, batches, device) -> float:
    """The mean loss over every predicted token of `batches`. HF's loss is the mean over one batch's
    batch × (seq_len - 1) predictions, so each batch counts by that number: the last one may be smaller."""
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        predictions = x.shape[0] * (x.shape[1] - 1)
        total += model(input_ids=x, labels=x).loss.float().item() * predictions
        count += predictions
    model.train()
    return total / count


class StopOnSignals:
    """SIGINT and SIGTERM ask the run to stop at the next step boundary (``signum`` says which came); a second
    SIGINT stops at once (KeyboardInterrupt). Installed only from the main thread, the one Python signals reach."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            if self.announce:  # os.write: a buffered print could re-enter the one this signal interrupted
                os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                         "(Ctrl-C again stops at once)\n".encode())
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


class PerLayerUpdates:
    """Steps each parameter inside backward, as soon as its gradient is accumulated, then frees that gradient.

    So the full set of gradients never exists at once: the peak holds one
    parameter's gradient (plus autograd's in-flight buffers) instead of all of them.

    A step must still be all or nothing, as in normal mode, but an update made
    inside backward cannot wait for the last gradient to be checked, and copies of
    the weights and state to roll back would cost more memory than per-layer
    saves. So :meth:`backward` runs backward twice over one graph: the first pass
    only takes each gradient's norm and frees the gradient at once; one host read
    of their total decides; only a finite total lets the second pass update.
    """

    def __init__(self, optimizers, device: torch.device, timed: bool = True):
        self.optimizers = split_per_parameter(optimizers)
        self.device = device
        self.timed = timed  # sync around each parameter's step to time it (on CUDA)
        self.seconds = 0.0
        self.norms: list[torch.Tensor] | None = None  # collecting gradient norms: the checking pass
        for opt in self.optimizers:
            opt.param_groups[0]["params"][0].register_post_accumulate_grad_hook(self._make_hook(opt))

    def _make_hook(self, optimizer):
        def hook(param):
            if self.norms is not None:
                self.norms.append(torch.linalg.vector_norm(param.grad, dtype=torch.float32))
            elif self.timed:
                _sync(self.device)  # times the update, not the backward kernels still queued before it
                start = time.perf_counter()
                optimizer.step()
                _sync(self.device)
                self.seconds += time.perf_counter() - start
            else:
                optimizer.step()
            param.grad = None
        return hook

    def backward(self, loss: torch.Tensor) -> float:
        """Backward with the updates, or nothing at all: returns the global gradient norm, as normal mode's
        clipping sees it; unless it is finite, no parameter and no optimizer state has changed."""
        self.seconds = 0.0
        self.norms = []
        try:
            loss.backward(retain_graph=True)
            norm = torch.linalg.vector_norm(torch.stack(self.norms)).item()
        finally:
            self.norms = None
        if math.isfinite(norm):
            loss.backward()
        return norm


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`, then steps it."""

    def __init__(self, config: TrainConfig, out: Path, *, progress: bool = True):
        validate(config)
        self.config = config
        self.out = Path(out)
        self.ranks, self.device = join(config.parallel, torch.device(resolve_device(config.device)))
        self.leader = self.ranks is None or self.ranks.leader  # logs, shows progress, writes metrics
        if self.ranks is not None and config.batch_size % self.ranks.world:
            raise ValueError(f"invalid batch_size={config.batch_size}: each of the {self.ranks.world} ranks takes "
                             "an equal share of every batch, so it must divide by the world size")
        # The bar only on a terminal: in a log file its \r frames are noise, and the log lines say it all.
        self.progress = progress and self.leader and sys.stderr.isatty()
        # A local model directory's own tokenizer unless --tokenizer names one; a mismatch is refused.
        tokenizer = tokenizer_for(config.model, config.tokenizer)
        self.data = leader_first(self.ranks, lambda: prepare(
            config.data, vocab_size=vocab_size_for(config.model, config.vocab_size), tokenizer=tokenizer,
            seq_len=config.seq_len, progress=self.progress))
        check_tokenizer(config.model, self.data.tokenizer)
        # The meter's baseline is taken once the modelling code is imported (a meta model costs no memory),
        # so it counts the run's tensors and buffers, not Python modules.
        self.precision = PRECISIONS[config.dtype]
        meta_model(config.model, self.data.vocab_size, config.seq_len, self.precision.weights)
        self.memory = PeakMemory(self.device)
        self.model = build_model(config.model, vocab_size=self.data.vocab_size, seq_len=config.seq_len,
                                 seed=config.seed, dtype=self.precision.weights, device=self.device)
        # Both before RSO's surgery and FSDP2's sharding: the loss reads the head at each call, and HF's
        # checkpointing wraps each decoder layer whatever its linear layers become.
        if config.freeze_embeddings:  # no gradient, so no optimizer state either; a tied head shares the weight
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.chunked_loss_refusal = chunked_loss_refusal(self.model) if config.chunked_loss else None
        if config.chunked_loss and self.chunked_loss_refusal is None:
            use_chunked_loss(self.model)
        if config.activation_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"--activation-checkpointing: {type(self.model).__name__} does not support "
                                 "gradient checkpointing")
            # Non-reentrant: it takes keyword arguments, and torch's recommended form. transformers ≥ 5.24 names
            # it activation_checkpointing_enable (and deprecates the old name).
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hidden = self.model.config.hidden_size
        entry = OPTIMIZERS[config.optimizer]
        self.hyperparameters = Hyperparameters(
            lr=entry.lr if config.lr is None else config.lr,
            adamw_lr=OPTIMIZERS["adamw"].lr if config.adamw_lr is None else config.adamw_lr,
            weight_decay=config.weight_decay, rank=config.rank or max(1, hidden // 4), update_gap=config.update_gap,
            stochastic_rounding=config.stochastic_rounding, orthogonalizer=config.orthogonalizer,
            embedding_state=config.embedding_state, beta2=config.beta2, scale=config.scale, lr_scale=config.lr_scale)
        self.wrapped, self.optimizers = self._build_parallel(config.optimizer)
        # Timing the optimizer apart needs a sync around it on CUDA: only on request there.
        self.time_optimizer = self.device.type != "cuda" or config.time_optimizer
        self.per_layer = (PerLayerUpdates(self.optimizers, self.device, self.time_optimizer) if config.per_layer
                          else None)
        self.stepping = self.per_layer.optimizers if self.per_layer else self.optimizers
        self.base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.stepping]
        self.warmup = config.steps // 10 if config.warmup is None else config.warmup
        self.batches = self.data.train_batches(config.batch_size, config.seq_len, config.seed)
        # Eval batches as large as training's: larger ones ran hardly faster on CPU, and their logits would lift the
        # run's peak memory above what training needs.
        held_out = self.data.val_batches if config.eval_split == "validation" else self.data.tune_batches
        self.val_batches = held_out(config.batch_size, config.seq_len, config.eval_tokens)
        self.step = 0

    def _build_parallel(self, name: str):
        """(the module to call, the optimizers): the model wrapped for --parallel, and the optimizers built on
        what they must hold (after FSDP2's sharding; RSO's surgery goes before it)."""
        model = self.model
        if self.ranks is None:
            return model, build_optimizers(name, model, self.hyperparameters)
        if name == "rso" and self.ranks.mode == "fsdp":
            from slimopt.rso import apply
            adaptation = apply(model, rank=self.hyperparameters.rank, share_inputs=True)
            return wrap(model, self.ranks, self.device), build_optimizers(name, adaptation, self.hyperparameters)
        wrapped = wrap(model, self.ranks, self.device)
        split = self.ranks.mode == "ddp" and name not in ("rso", "muon")  # slimopt's own; RSO's runs replicated
        group = torch.distributed.group.WORLD if split else None
        return wrapped, build_optimizers(name, model, self.hyperparameters, process_group=group)

    # ------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / ("checkpoint" if self.ranks else "checkpoint.pt")

    def save(self, data_state: dict | None = None) -> None:
        """Write the checkpoint; ``data_state`` overrides the stream's current position."""
        if self.ranks is not None:
            self._save_sharded(data_state)
            return
        state = {
            "step": self.step,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.stepping],
            "data": data_state or self.batches.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save_atomic(state, self.checkpoint_path)

    def _save_sharded(self, data_state: dict | None) -> None:
        """Every rank writes its shard (DCP), published atomically as a whole; run.json holds the rest."""
        run = {"step": self.step, "config": asdict(self.config), "world": self.ranks.world,
               "data": data_state or self.batches.state_dict()}
        sharded_checkpoint.save(self.checkpoint_path, self.model, self.stepping, self._rank_rng(), metadata=run)

    def _rank_rng(self) -> dict[str, torch.Tensor]:
        """This rank's RNG states, under keys no other rank writes."""
        rng = {f"rng.rank{self.ranks.rank}": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng[f"cuda_rng.rank{self.ranks.rank}"] = torch.cuda.get_rng_state(self.device)
        return rng

    def resume(self) -> None:
        """Restore the latest checkpoint, and drop metrics lines written after it."""
        if self.ranks is not None:
            state = sharded_checkpoint.read_metadata(self.checkpoint_path)
            if state["world"] != self.ranks.world:
                raise ValueError(f"cannot resume {self.checkpoint_path}: it was written by {state['world']} ranks, "
                                 f"this run has {self.ranks.world}; each rank's data rows and RNG are its own")
        else:
            state = checkpoint.load(self.checkpoint_path)
        saved = state.get("config", {})
        # A key an older checkpoint lacks held its default then.
        fixed = {k: saved.get(k, TrainConfig.__dataclass_fields__[k].default) for k in RESUME_MUST_MATCH}
        changed = [k for k in RESUME_MUST_MATCH if fixed[k] != getattr(self.config, k)]
        if changed:
            raise ValueError(f"cannot resume {self.checkpoint_path}: it was written with different "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(self.config, k)!r})" for k in changed))
        if self.ranks is not None:
            rng = sharded_checkpoint.load(self.checkpoint_path, self.model, self.stepping, self._rank_rng())
            torch.set_rng_state(rng[f"rng.rank{self.ranks.rank}"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[f"cuda_rng.rank{self.ranks.rank}"], self.device)
            self._refuse_nonfinite_weights(self._local_weights())
            self.batches.load_state_dict(state["data"])
            self.step = state["step"]
            self._drop_metrics_after_step()
            self._announce_resume(saved)
            return
        # --dtype bf16 once meant bf16 weights (now bf16-pure): an old checkpoint's name matches, its weights not.
        saved_dtypes = {v.dtype for v in state["model"].values() if v.is_floating_point()}
        if saved_dtypes != {self.precision.weights}:
            held = ", ".join(sorted(str(dtype) for dtype in saved_dtypes))
            raise ValueError(f"cannot resume {self.checkpoint_path}: it holds {held} weights, --dtype "
                             f"{self.config.dtype} trains {self.precision.weights} ones")
        if len(state["optimizers"]) != len(self.stepping):
            raise ValueError(f"checkpoint {self.checkpoint_path} holds {len(state['optimizers'])} optimizer states, "
                             f"this run has {len(self.stepping)}")
        self._refuse_nonfinite_weights(state["model"].items())
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.stepping, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        self._drop_metrics_after_step()
        self._announce_resume(saved)

    def start_over(self) -> None:
        """--overwrite: remove what an earlier run left in the output directory, so that nothing of it (a
        checkpoint that --resume would pick up, TensorBoard events) mixes with this run."""
        if not self.leader:
            return
        for name in RUN_OUTPUTS:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _local_weights(self):
        """(name, tensor) of this rank's part of every weight: FSDP2's shards, or the whole of DDP's replicas."""
        for name, value in self.model.state_dict().items():
            yield name, value.to_local() if isinstance(value, DTensor) else value

    def _refuse_nonfinite_weights(self, weights) -> None:
        """ValueError naming the first weight with a NaN or Inf: resuming would only train on from them (and the
        usual advice after a divergence, "lower the lr and --resume", would loop). Every rank raises together."""
        bad = None
        for name, value in weights:
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                count = int((~torch.isfinite(value)).sum())
                bad = f"{name} ({count} of {value.numel()} entries)"
                break
        bad = next((b for b in gather(bad, self.ranks) if b is not None), None)
        if bad is not None:
            raise ValueError(f"cannot resume {self.checkpoint_path}: the weight {bad} is NaN or Inf, so the run "
                             "diverged before this checkpoint was written; start over (--overwrite), e.g. with a lower "
                             "lr or --clip 1.0")

    def _announce_resume(self, saved: dict) -> None:
        """Say what the run resumed from, and every setting that differs from the checkpoint's (those that must
        match have been checked already)."""
        if not self.leader:
            return
        print(f"resumed from {self.checkpoint_path} at step {self.step} of {self.config.steps}", flush=True)

        defaults = {"lr": OPTIMIZERS[self.config.optimizer].lr, "adamw_lr": OPTIMIZERS["adamw"].lr}

        def show(name, value):
            if value is None:
                return f"{defaults[name]} (default)" if name in defaults else "(default)"
            return str(value)

        for field in fields(self.config):
            now = getattr(self.config, field.name)
            if field.name in saved and saved[field.name] != now:
                print(f"changed: {field.name} {show(field.name, saved[field.name])} -> {show(field.name, now)}",
                      flush=True)

    def _drop_metrics_after_step(self) -> None:
        metrics = self.out / "metrics.jsonl"
        if self.leader and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ steps

    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.config.steps, self.warmup)
        for opt, base in zip(self.stepping, self.base_lrs):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * factor
        return self.hyperparameters.lr * factor

    def _stop_nonfinite(self, what: str, value: float, data_state: dict) -> None:
        # The weights and optimizer state are still those before this step: keep them, with its data position.
        self.save(data_state)
        raise NonFiniteLoss(f"{what} is {value} at step {self.step + 1}; stopped, and the state before that step "
                            f"is kept in {self.checkpoint_path} (lower the lr, or clip, and --resume)")

    def _autocast(self):
        """--dtype bf16: forward and loss in bf16 matmuls; weights, gradients and updates stay fp32."""
        dtype = self.precision.autocast
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        # A copy is only asynchronous from pinned memory, and only CUDA has one to overlap.
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def train_step(self) -> dict:
        """One optimizer step. On CUDA the host reads the device once: the loss and the gradient norm together,
        to stop before a non-finite update (slimopt's optimizers read once more, for their own check);
        ``time_optimizer`` adds a sync after the step to time it apart."""
        config = self.config
        lr = self._set_lr()
        data_state = self.batches.state_dict()
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for _ in range(config.grad_accum):
            batch = self.batches.next_batch()
            x = self._to_device(self.ranks.rows(batch) if self.ranks else batch)
            with self._autocast():
                loss = self.wrapped(input_ids=x, labels=x).loss
            total += loss.detach().float() / config.grad_accum
            if self.per_layer:
                norm = self.per_layer.backward(loss)  # grad_accum is 1; reads the norm itself
            else:
                (loss / config.grad_accum).backward()

        if self.per_layer:
            value = total.item()
            if not math.isfinite(value):
                self._stop_nonfinite("the train loss", value, data_state)
            if not math.isfinite(norm):
                self._stop_nonfinite("the gradient norm", norm, data_state)
            optimizer_seconds = self.per_layer.seconds if self.per_layer.timed else None
        else:
            grads = [p.grad for opt in self.optimizers for g in opt.param_groups for p in g["params"]
                     if p.grad is not None]
            norm_tensor = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm_tensor, DTensor):  # FSDP2: each rank's rows hold part of the norm
                norm_tensor = norm_tensor.full_tensor()
            total = mean_over_ranks(total, self.ranks)  # the loss over the whole batch
            value, norm = torch.stack([total, norm_tensor.float().to(total.device)]).tolist()  # the one read
            if not math.isfinite(value):
                self._stop_nonfinite("the train loss", value, data_state)
            if not math.isfinite(norm):
                self._stop_nonfinite("the gradient norm", norm, data_state)
            if config.clip > 0:
                torch.nn.utils.clip_grads_with_norm_(grads, config.clip, norm_tensor)
            if self.time_optimizer:
                _sync(self.device)  # the backward kernels still queued are not the optimizer's
            opt_start = time.perf_counter()
            for opt in self.optimizers:
                opt.step()
            if self.time_optimizer:
                _sync(self.device)
            optimizer_seconds = time.perf_counter() - opt_start if self.time_optimizer else None
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "tokens": self.step * self.tokens_per_step, "train_loss": value, "lr": lr,
                "step_time": time.perf_counter() - start, "optimizer_time": optimizer_seconds,
                "peak_memory": self.memory.peak()}

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.config.seq_len

    def run(self) -> dict:
        """Train from the current step (0, or where :meth:`resume` left off) to ``config.steps``.

        Returns the summary, also written to summary.json.
        """
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.leader and self.step == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        start_step = self.step
        header = header_lines(self)
        if self.leader:
            write_config(self.out / "config.toml", config, resolved_defaults(self))
        reporter = open_reporter(self, header, start_step) if self.leader else Reporter()
        bar = tqdm(total=config.steps, initial=self.step, disable=not self.progress, desc=config.optimizer,
                   dynamic_ncols=True)
        console = Console(config.steps, config.log_every, self.memory.kind, bar)
        for line in header if self.leader else ():
            console.say(line)
        # Rank 0 alone writes metrics; the others' lines would repeat its own.
        with open(self.out / "metrics.jsonl" if self.leader else os.devnull, "a") as metrics, \
                StopOnSignals(announce=self.leader) as stop:
            try:
                while self.step < config.steps:
                    record = self.train_step()
                    if self.step % config.eval_every == 0 or self.step == config.steps:
                        with self._autocast():  # the model as it trains; every rank runs it (FSDP2: collective)
                            record["val_loss"] = evaluate(self._eval_model, self.val_batches, self.device)
                        record["val_ppl"] = math.exp(min(record["val_loss"], 700.0))
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    saved = self.step % config.save_every == 0 or self.step == config.steps
                    if saved:
                        self.save()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                    tok_s=f"{self.tokens_per_step / record['step_time']:.0f}",
                                    mem=f"{record['peak_memory'] / 2**20:.0f}MiB")
                    if self.leader:
                        console.record(record, self.tokens_per_step)
                        reporter.log(record)
                    # Every rank stops at the same step boundary, whichever of them the signal reached.
                    signum = any_rank(stop.signum or 0, self.ranks, self.device) if self.step < config.steps else 0
                    if signum:
                        if not saved:
                            self.save()
                        raise Interrupted(signum, self.step, config.steps, self.checkpoint_path, self.leader)
            finally:
                bar.close()
                reporter.close()
        per_rank_state = gather(sum(state_bytes_here(opt) for opt in self.stepping), self.ranks)
        return self._summarize(start_step, per_rank_state) if self.leader else {}

    @property
    def _eval_model(self) -> torch.nn.Module:
        """FSDP2's sharded model, or the plain one (DDP's wrapper adds nothing to a forward without backward)."""
        return self.wrapped if self.ranks is not None and self.ranks.mode == "fsdp" else self.model

    def _summarize(self, start_step: int, per_rank_state: list[int]) -> dict:
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        timed = records[start_step:][1:] or records  # the first step of a process warms up kernels and caches
        final = records[-1]
        summary = {
            "config": asdict(self.config),
            "hyperparameters": asdict(self.hyperparameters),
            "vocab_size": self.data.vocab_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": final["step"],
            "tokens": final["tokens"],
            "final_val_loss": final["val_loss"],
            "final_val_ppl": final["val_ppl"],
            "optimizer_state_bytes": state_bytes(self.stepping) if self.ranks is None else sum(per_rank_state),
            "optimizer_state_bytes_per_rank": per_rank_state,
            "parallel": self.config.parallel,
            "peak_memory": max(r["peak_memory"] for r in timed),
            "memory_kind": self.memory.kind,
            "median_step_time": statistics.median(r["step_time"] for r in timed),
            "median_optimizer_time": (statistics.median(r["optimizer_time"] for r in timed)
                                      if timed[0]["optimizer_time"] is not None else None),
            "device": device_name(self.device),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
