"""What a ``slimopt train`` run tells: its header, its console lines, its config file, and ``--report-to``.

- The header (printed once, before the first step): the model's size, the resolved optimizer settings, the
  tokens per step, the dtype, the device, the world size and torch's thread count, with a hint when a busy
  CPU and several torch threads are likely to slow every step down.
- A plain line every ``log_every`` steps (train loss, lr, tokens/s, peak memory) and one at each evaluation
  (val loss, ppl). They print whether or not the progress bar shows, which it only does on a terminal: piped
  into a log file, a run writes plain lines and no ``\\r`` frames.
- ``config.toml`` in the run directory: the run's settings as ``--config`` reads them back; the settings left
  to their defaults are written as comments with the value they resolved to.
- ``--report-to tensorboard`` (event files in ``<out>/tensorboard``, through torch.utils.tensorboard) or
  ``wandb`` (imported only then; ``WANDB_MODE=offline`` logs without an account or network).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

REPORT_TO = ("none", "tensorboard", "wandb")
# Which optimizers read which of the shared settings, so that the header names only the ones in force.
USES_RANK = ("galore", "sumo", "rso", "apollo")
USES_UPDATE_GAP = ("galore", "sumo", "rso", "apollo", "apollo_mini")
USES_ORTHOGONALIZER = ("sumo", "swan")
USES_ADAMW_GROUP = ("galore", "sumo", "swan", "muon", "rso", "apollo", "apollo_mini")


def check_report_to(name: str) -> None:
    """ValueError unless ``name`` is a known target whose package is installed (so a run fails before it starts)."""
    if name not in REPORT_TO:
        raise ValueError(f"invalid report_to={name!r}: expected one of {list(REPORT_TO)}")
    if name == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
        except ImportError as error:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                             f"({error})") from None
    if name == "wandb":
        import importlib.util

        if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
            raise ValueError("--report-to wandb needs the wandb package: pip install wandb (set WANDB_MODE=offline "
                             "to log without an account or network)")


# ------------------------------------------------------------------ header

def thread_hint(device: torch.device, threads: int | None = None, load: float | None = None,
                cores: int | None = None) -> str | None:
    """A hint when several torch threads share a CPU that is already busy: there, OpenMP threads wait on each
    other and on the other jobs, and a step can take many times longer than with one thread (16× measured on a
    shared 2-core machine). None when it does not apply, or when OMP_NUM_THREADS is set: the user chose."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = torch.get_num_threads() if threads is None else threads
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # not on this platform
            return None
    if threads <= 1 or load <= cores:
        return None
    return (f"hint: torch uses {threads} threads on a busy CPU (load average {load:.1f} on {cores} cores); threads "
            "that contend with other jobs can make every step many times slower: try OMP_NUM_THREADS=1")


def _number(value: float) -> str:
    return f"{value:.3g}"


def header_lines(trainer) -> list[str]:
    """The run header: what is trained, with which resolved settings, on what."""
    config, hp = trainer.config, trainer.hyperparameters
    world = trainer.ranks.world if trainer.ranks is not None else 1
    parameters = sum(p.numel() for p in trainer.model.parameters())
    where = f"{trainer.device}" + (f", {world} processes ({config.parallel})" if world > 1 or config.parallel != "none"
                                   else ", 1 process")
    lines = [f"slimopt train: {config.model}, {parameters / 1e6:.2f}M parameters, vocab {trainer.data.vocab_size:,}; "
             f"{where}; dtype {config.dtype}; torch threads {torch.get_num_threads()}"]

    name = config.optimizer
    settings = [f"lr {_number(hp.lr)}" + (" (its default)" if config.lr is None else "")]
    if name in USES_RANK:
        settings.append(f"rank {hp.rank}")
    if name in USES_UPDATE_GAP:
        settings.append(f"update_gap {hp.update_gap}")
    if name in USES_ORTHOGONALIZER:
        settings.append(f"orthogonalizer {hp.orthogonalizer}")
    settings.append(f"weight_decay {_number(hp.weight_decay)}")
    if name in USES_ADAMW_GROUP:
        settings.append(f"AdamW group (embeddings, head, norms) lr {_number(hp.adamw_lr)}")
    if config.clip > 0:
        settings.append(f"clip {_number(config.clip)}")
    if config.per_layer:
        settings.append("per-layer updates")
    if config.freeze_embeddings:
        settings.append("embeddings frozen")
    if hp.stochastic_rounding:
        settings.append("stochastic rounding")
    lines.append(f"optimizer: {name}, " + ", ".join(settings))

    batch = f"{config.batch_size} × {config.seq_len}" + (f" × {config.grad_accum} micro-batches"
                                                         if config.grad_accum > 1 else "")
    if world > 1:
        batch += f"; {config.batch_size // world} sequences per rank × {world} ranks"
    lines.append(f"schedule: {config.steps} steps, warmup {trainer.warmup} then cosine to 10%; "
                 f"{trainer.tokens_per_step:,} tokens per step ({batch}), {config.steps * trainer.tokens_per_step:,} "
                 "in all")
    lines.append(f"logging: a line every {config.log_every} steps; evaluation every {config.eval_every} steps on "
                 f"{config.eval_tokens:,} {config.eval_split} tokens; checkpoint every {config.save_every} steps to "
                 f"{trainer.checkpoint_path}" + (f"; report to {config.report_to}" if config.report_to != "none"
                                                 else ""))
    memory = []
    if config.chunked_loss:
        refusal = getattr(trainer, "chunked_loss_refusal", None)
        memory.append("chunked loss (no tokens × vocab logits held)" if refusal is None else
                      f"full logits, not the chunked loss ({refusal})")
    if config.activation_checkpointing:
        memory.append("activation checkpointing (each decoder layer recomputed in backward)")
    if config.embedding_state != "adamw":
        memory.append(f"{config.embedding_state} AdamW state for the embeddings, head, norms and biases")
    if memory:
        lines.append("memory: " + "; ".join(memory))
    hint = thread_hint(trainer.device)
    if hint:
        lines.append(hint)
    return lines


# ------------------------------------------------------------------ lines

class Console:
    """The run's plain lines; through tqdm.write while a bar is on screen, so that neither garbles the other."""

    def __init__(self, steps: int, log_every: int, memory_kind: str, bar=None):
        self.steps, self.log_every, self.bar = steps, log_every, bar
        self.memory = "max allocated" if memory_kind.startswith("cuda") else "peak RSS"
        self.tokens = 0
        self.seconds = 0.0

    def say(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line)
        sys.stdout.flush()

    def _step(self, step: int) -> str:
        return f"step {step:>{len(str(self.steps))}}/{self.steps}"

    def record(self, record: dict, tokens_per_step: int) -> None:
        """Print what is due after this step: the log line every ``log_every`` steps (and at the last), the
        evaluation line whenever it has a val loss."""
        self.tokens += tokens_per_step
        self.seconds += record["step_time"]
        step = record["step"]
        if step % self.log_every == 0 or step == self.steps:
            rate = self.tokens / self.seconds if self.seconds > 0 else math.inf
            self.say(f"{self._step(step)} | loss {record['train_loss']:.4f} | lr {record['lr']:.3e} | "
                     f"{rate:,.0f} tok/s | mem {record['peak_memory'] / 2**20:,.1f} MiB ({self.memory})")
            self.tokens, self.seconds = 0, 0.0
        if "val_loss" in record:
            self.say(f"{self._step(step)} | val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}")


# ------------------------------------------------------------------ config.toml

def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, int) or math.isfinite(value) else ("nan" if value != value else
                                                                                  ("inf" if value > 0 else "-inf"))
    return json.dumps(str(value))  # JSON's escapes are TOML's basic-string escapes


def resolved_defaults(trainer) -> dict:
    """What each setting left to its default (None) resolved to in this run."""
    hp = trainer.hyperparameters
    return {"lr": hp.lr, "adamw_lr": hp.adamw_lr, "rank": hp.rank, "warmup": trainer.warmup,
            "vocab_size": trainer.data.vocab_size}


def write_config(path: Path, config, resolved: dict) -> None:
    """The run's settings as TOML that ``--config`` reads back to the same run. TOML has no null: a setting left
    to its default is a comment, with the value it resolved to."""
    lines = ["# slimopt train: this run's settings (command-line flags over --config over the defaults).",
             "# Reuse them with: slimopt train --config config.toml --out NEW_DIR", ""]
    for field in fields(config):
        value = getattr(config, field.name)
        if value is None:
            note = resolved.get(field.name)
            lines.append(f"# {field.name} = (default)" + (f"  resolved to {note}" if note is not None else ""))
        else:
            lines.append(f"{field.name} = {_toml(value)}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_config(path: Path) -> dict:
    """The keys of a TOML config file; ValueError (one line) if it is missing or malformed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--config needs Python ≥ 3.11 (tomllib) or the tomli package") from None
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ValueError(f"cannot read --config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"--config {path} is not valid TOML: {error}") from None


# ------------------------------------------------------------------ --report-to

class Reporter:
    """--report-to none: nothing."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(record: dict) -> dict[str, float]:
    tokens_per_step = record["tokens"] / record["step"]
    scalars = {"train/loss": record["train_loss"], "train/lr": record["lr"],
               "train/tokens_per_second": tokens_per_step / record["step_time"] if record["step_time"] > 0 else 0.0,
               "train/peak_memory_mib": record["peak_memory"] / 2**20, "train/step_time": record["step_time"]}
    if record.get("optimizer_time") is not None:
        scalars["train/optimizer_time"] = record["optimizer_time"]
    if "val_loss" in record:
        scalars["eval/loss"] = record["val_loss"]
        scalars["eval/ppl"] = record["val_ppl"]
    return scalars


class TensorBoard(Reporter):
    """Event files in ``<out>/tensorboard``. A resumed run purges the events after its checkpoint's step, which an
    interrupted run may have logged, so its curves do not fold back on themselves."""

    def __init__(self, out: Path, config, header: list[str], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
        if not start_step:  # as a code block: TensorBoard renders text as markdown
            text = "\n".join([*header, "", json.dumps(asdict(config), indent=2)])
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, record: dict) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class Wandb(Reporter):
    """A wandb run named after the output directory; its id is kept in ``<out>/wandb_run_id`` so that
    ``--resume`` continues the same wandb run. Project: $WANDB_PROJECT, else "slimopt"."""

    def __init__(self, out: Path, config, resolved: dict, start_step: int):
        import wandb

        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slimopt"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config={**asdict(config), "resolved": resolved})

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporter(trainer, header: list[str], start_step: int) -> Reporter:
    name = trainer.config.report_to
    if name == "tensorboard":
        return TensorBoard(trainer.out, trainer.config, header, start_step)
    if name == "wandb":
        return Wandb(trainer.out, trainer.config, resolved_defaults(trainer), start_step)
    return Reporter()
