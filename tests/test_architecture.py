"""The layering the README describes: the distributed engine, RSO, the trainer and the HF integration drive a
SlimOptimizer only through its public engine interface, never through its private methods."""

import ast
import inspect
from pathlib import Path

import torch

import slimopt
from slimopt.optim.optimizer import SlimOptimizer

ROOT = Path(slimopt.__file__).parent


def private_members() -> set[str]:
    """Names starting with one underscore that SlimOptimizer defines (not torch.optim.Optimizer's own)."""
    instance = slimopt.SUMO([torch.nn.Parameter(torch.randn(4, 4))], rank=2)
    names = {name for name, _ in inspect.getmembers(SlimOptimizer)} | set(vars(instance))
    torch_own = set(dir(torch.optim.Optimizer)) | set(vars(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])))
    return {name for name in names - torch_own if name.startswith("_") and not name.startswith("__")}


def test_nothing_outside_slimopt_optim_calls_a_private_method_of_slim_optimizer():
    private = private_members()
    assert {"_stack_deltas", "_init_state", "_algorithm", "_positions", "_plan"} <= private  # the scan sees them
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.is_relative_to(ROOT / "optim"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_the_engine_interface_is_public_and_used_by_both_distributed_paths():
    interface = ("route", "chunks", "run_chunk", "apply_update", "step_local", "param_name", "state_template")
    assert all(callable(getattr(SlimOptimizer, name)) for name in interface)
    engine = (ROOT / "distributed" / "engine.py").read_text()
    for name in ("step_local", "run_chunk", "apply_update", "chunks"):
        assert f"optimizer.{name}(" in engine, name
