"""slimopt across 2 gloo ranks on CPU: FSDP2 and DDP against one process, state split, checkpoints, guards."""

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as workers

pytest.importorskip("transformers")


def spawn(tmp_path, worker, *args, world=2):
    mp.start_processes(workers.run, args=(world, str(tmp_path), worker, args), nprocs=world, start_method="spawn")
    report = tmp_path / "report.pt"
    return torch.load(report) if report.exists() else None


ALL = ["sumo", "sumo_svd", "swan", "galore", "adamw", "rso"]


def test_fsdp2_matches_one_process(tmp_path):
    report = spawn(tmp_path, workers.fsdp_matches_single, ALL, 1.0)
    print(report)


def test_ddp_matches_one_process(tmp_path):
    report = spawn(tmp_path, workers.ddp_matches_single, ALL, 1.0)
    print(report)


def test_each_rank_holds_only_its_state(tmp_path):
    spawn(tmp_path, workers.state_split, ["sumo", "swan", "galore", "adamw"])
