"""benchmarks/gpu_suite.py --smoke: the GPU suite's code paths on the CPU at tiny shapes, in about a minute and a
half; every part must finish and leave its figures in the report (tests/test_cuda.py is skipped without CUDA)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["cuda_tests", "step_time", "compile", "train_speed", "fsdp", "pretrain"]
# The suite keeps itself within its smoke budget (105 s) and stops its parts' processes at their limits; this
# is only the backstop.
TIMEOUT_S = 120


def run_smoke(out: Path) -> tuple[int, str]:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    process = subprocess.Popen([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(out)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the suite stops the running part's processes, keeps its report
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"the smoke suite ran over {TIMEOUT_S} s:\n{output[-3000:]}")
    return process.returncode, output


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    returncode, output = run_smoke(out)
    found = sorted(out.glob("gpu_suite_*.json"))
    assert len(found) == 1, f"the smoke suite wrote no report (exit {returncode}):\n{output[-3000:]}"
    report_json = found[0]
    report = json.loads(report_json.read_text())
    return returncode, output, report, report_json.with_suffix(".md").read_text()


def test_every_part_finishes(smoke):
    returncode, output, report, _ = smoke
    parts = report["parts"]
    assert list(parts) == PARTS
    problems = {name: f"{part['status']}: {part['note']}\n{part['tail'][-1500:]}" for name, part in parts.items()
                if part["status"] not in ("ok", "skipped")}
    assert not problems, "\n\n".join(f"{name} {text}" for name, text in problems.items())
    assert returncode == 0, output[-3000:]
    cuda = parts["cuda_tests"]
    if torch.cuda.is_available():
        assert cuda["status"] == "ok" and cuda["results"]["passed"] > 0 and not cuda["results"]["failed"]
    else:
        assert cuda["status"] == "skipped" and cuda["note"] == "no CUDA"
        assert cuda["results"]["skipped"] > 0 and cuda["results"]["passed"] == 0


def test_the_report_names_the_device(smoke):
    _, _, report, markdown = smoke
    assert report["device"] and report["mode"] == "smoke"
    assert markdown.startswith(f"# GPU suite: {report['device']}\n")
    assert torch.__version__ in report["torch"]


def test_the_report_holds_each_parts_figures(smoke):
    _, _, report, markdown = smoke
    parts = {name: part["results"] for name, part in report["parts"].items()}

    steps = parts["step_time"]["results"]
    assert steps[0]["optimizer"] == "adamw" and len(steps) >= 2
    for row in steps:
        assert row["normal"]["median_ms"] > 0 and row["amortized_ms"] > 0 and row["amortized_vs_adamw"] > 0
        assert row["state_bytes"] >= 0 and row["normal"]["gemm_flops"] >= 0
    assert any(row["refresh"] and row["refresh"]["median_ms"] > 0 for row in steps)
    assert {row["optimizer"] for row in steps} == set(parts["step_time"]["optimizers"])

    timed = parts["compile"]["results"]
    assert timed and all(row["eager_ms"] > 0 and "polar_express" in row["case"] for row in timed)

    runs = parts["train_speed"]["runs"]
    assert list(runs) == ["adamw", "sumo", "swan", "galore"]
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["median_step_time_s"] > 0 and math.isfinite(run["final_val_loss"])
        assert run["peak_memory_bytes"] > 0 and run["optimizer_state_bytes"] > 0

    sharded = parts["fsdp"]["optimizers"]
    assert sharded and "adamw" in sharded
    for row in sharded.values():
        assert row["plain_step_s"] > 0 and row["fsdp_step_s"] > 0 and row["fsdp_state_bytes"] > 0

    bench = parts["pretrain"]["comparison"]
    assert "adamw" in bench and len(bench) >= 2
    assert all(math.isfinite(row["final_val_loss"]) and row["median_step_time"] > 0 for row in bench.values())
    assert "| adamw |" in parts["pretrain"]["table"]
    for name in ("step_time", "compile", "train_speed", "fsdp", "pretrain"):
        assert f"## {name}: " in markdown
