"""benchmarks/distributed_sim.py: the simulated FSDP2 step is sane, and its wire bytes are the real engine's."""

import sys
import time
from pathlib import Path

import pytest
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed_sim as sim


@pytest.mark.parametrize("world", [3, 8])
def test_simulation_invariants(world):
    optimizer, matrices = sim.meta_matrices(LlamaConfig(**sim.CHECK_CONFIG), "sumo", sim.CHECK_RANK,
                                            sim.CHECK_MAX_STACK)
    result = sim.simulate(optimizer, matrices, world, grad_bytes=(4, 2), keep_splits=True)
    placed = [name for bucket in result["bucket_names"] for name in bucket]
    assert sorted(placed) == sorted(m.name for m in matrices)  # every matrix in exactly one bucket
    assert len(set(placed)) == len(placed) == result["matrices"]
    assert result["buckets"] > 1 and result["collectives"] == 2 * result["buckets"]
    assert 1 <= result["speedup"] <= world + 1e-9 and result["dag_speedup"] <= world + 1e-9
    assert result["dag_flops"] <= result["critical_flops"] * (1 + 1e-12)
    assert result["balance"] >= 1
    assert result["old"]["m3_speedup"] <= world + 1e-9 and result["old"]["dag_speedup"] <= world + 1e-9
    for key in ("grad32", "grad16"):
        memory = result[key]
        assert memory["peak_bytes"] > 0
        assert sum(memory["sent_per_rank"]) == sum(memory["received_per_rank"])  # what goes out comes in
    assert result["grad16"]["wire_bytes_max"] < result["grad32"]["wire_bytes_max"]


def test_model_wire_bytes_equal_the_real_engine_at_3_ranks():
    started = time.monotonic()
    report = sim.check(3, timeout=50)
    assert time.monotonic() - started < 60
    for row in report["ranks"]:
        assert row["wire_measured"] == row["wire_model"], row
        assert row["calls_measured"] == row["calls_model"] and row["splits_equal"] and row["plan_equal"], row
        assert row["peak_measured"] >= row["peak_model"], row  # the model leaves out the algorithm's workspace
    assert report["exact"]
