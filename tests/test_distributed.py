"""slimopt across 2 gloo ranks on CPU: FSDP2 and DDP against one process, state split, checkpoints, guards."""

import tempfile

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

from slimopt.distributed import checkpoint as dcp_checkpoint

pytest.importorskip("transformers")


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
    worker = workers.fsdp_matches_single if layout == "fsdp" else workers.ddp_matches_single
    report = spawn(tmp_path, worker, ALL, split, tolerance)
    print(layout, "split" if split else "same", {k: f"{v:.2g}" for k, v in report.items()})


def test_each_rank_holds_only_its_state(tmp_path):
    spawn(tmp_path, workers.state_split, ["sumo", "swan", "galore", "adamw"])


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_checkpoint_resumes_bit_identically_in_fresh_processes(tmp_path, layout):
    names = ["sumo", "swan", "galore", "adamw"] + (["rso"] if layout == "fsdp" else [])
    spawn(tmp_path, workers.checkpoint_save, names, layout)
    spawn(tmp_path, workers.checkpoint_resume, names, layout)


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
