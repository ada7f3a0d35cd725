"""`slimopt plan`: configurations that fit a memory budget, best first, every number from `estimate`."""

import resource

import pytest
import torch
from test_memory import saved_activation_bytes
from transformers import AutoModelForCausalLM, LlamaConfig

from slimopt.bench.memory import GiB, activation_bytes, estimate
from slimopt.bench.plan import format_header, format_plan, parse_memory, plan
from slimopt.cli import main
from slimopt.train.models import PRECISIONS, SHAPES, meta_model

BUDGET = int(1.9 * GiB)  # llama_60m at seq 256: some configurations fit, AdamW's cheapest among them


def estimated(c):
    return estimate(c.model, c.optimizer, rank=c.rank, batch_size=c.micro_batch, seq_len=c.seq_len, dtype=c.dtype,
                    per_layer=c.per_layer, chunked_loss=c.chunked_loss,
                    activation_checkpointing=c.activation_checkpointing, embedding_state=c.embedding_state,
                    freeze_embeddings=c.freeze_embeddings)


@pytest.fixture(scope="module")
def small():
    return plan("llama_60m", BUDGET, 256, optimizers=("adamw", "swan", "sumo", "rso"))


def test_every_fitting_candidate_is_estimate_for_its_knobs_and_under_the_budget(small):
    fitting = [c for c in small if c.fits]
    assert fitting and len(fitting) < len(small)
    # The default global batch is a target: reached by accumulation, but --per-layer cannot accumulate, so its
    # global batch is its micro-batch, up to the target, and its costs say when it falls short.
    assert all(c.global_batch == 512 for c in small if not c.per_layer)
    short = [c for c in small if c.per_layer and c.global_batch < 512]
    assert short and all(c.global_batch <= 512 and c.grad_accum == 1 for c in small if c.per_layer)
    assert all(f"global batch {c.global_batch} of 512: --per-layer cannot accumulate" in c.costs for c in short)
    assert all(c.target_batch == 512 for c in small)
    for c in fitting[:40] + fitting[-5:] + [c for c in small if c.optimizer == "rso"][:5]:
        assert c.breakdown == estimated(c)
        assert c.peak == c.breakdown.total <= BUDGET or not c.fits
        assert c.headroom == BUDGET - c.peak
    assert all(not c.fits for c in small[len(fitting):])  # fitting first, then the rest by peak
    rest = [c.peak for c in small[len(fitting):]]
    assert rest == sorted(rest)


def test_ordering_is_global_batch_then_throughput_then_optimizer_quality(small):
    batches = [c.global_batch for c in small if c.fits]
    assert batches == sorted(batches, reverse=True) and batches[0] == 512  # the target first
    fitting = [c for c in small if c.fits and c.global_batch == 512]
    tiers = [round(c.throughput * 20) for c in fitting]
    assert tiers == sorted(tiers, reverse=True)
    top = [c for c in fitting if round(c.throughput * 20) == tiers[0]]
    order = ("adamw", "muon", "swan", "sumo", "galore", "rso")
    assert [order.index(c.optimizer) for c in top] == sorted(order.index(c.optimizer) for c in top)
    # Checkpointing costs a forward: never ahead of the same configuration without it.
    assert not fitting[0].activation_checkpointing
    assert all(c.per_layer is False or c.grad_accum == 1 for c in small)


def test_table_lists_the_best_of_each_optimizer_and_why_the_rest_do_not_fit(small):
    text = format_plan(small)
    assert text.startswith("| # | optimizer | dtype |")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert 1 <= len(rows) <= 4
    assert "First: slimopt train --model llama_60m --seq-len 256" in text
    least = {name: min(c.peak for c in small if c.optimizer == name) for name in ("adamw", "swan")}
    assert least["swan"] < least["adamw"]
    tight = plan("llama_60m", (least["swan"] + least["adamw"]) // 2, 256, optimizers=("adamw", "swan"))
    text = format_plan(tight)
    assert "Do not fit" in text and "- adamw: at least" in text and "alone" in text


def test_fsdp_divides_weights_gradients_and_state_but_not_activations():
    one = plan("llama_60m", 64 * GiB, 256, optimizers=("adamw", "sumo"), dtypes=("bf16",), global_batch=64)
    four = plan("llama_60m", 64 * GiB, 256, optimizers=("adamw", "sumo"), dtypes=("bf16",), global_batch=64,
                world_size=4, parallel="fsdp")
    assert all(c.world_size == 4 and not c.per_layer and c.embedding_state == "adamw" for c in four)
    pick = next(c for c in four if c.optimizer == "adamw" and c.micro_batch == 4 and not c.activation_checkpointing
                and c.chunked_loss)
    alone = next(c for c in one if c.optimizer == "adamw" and c.micro_batch == 4 and not c.per_layer
                 and not c.activation_checkpointing and c.chunked_loss and c.embedding_state == "adamw")
    assert pick.breakdown == alone.breakdown == estimated(alone)
    b, r = pick.breakdown, pick.per_rank
    assert (r.parameters, r.gradients, r.optimizer_state) == tuple(-(-x // 4) for x in
                                                                   (b.parameters, b.gradients, b.optimizer_state))
    assert r.activations == b.activations and pick.grad_accum == 4  # 4 ranks × 4 sequences × 4 micro-batches
    net = meta_model("llama_60m", 32000, 256, torch.float32)
    layer = sum(p.nbytes for p in net.model.layers[0].parameters())
    root = b.parameters - 8 * layer
    assert pick.gathered == 2 * root + 4 * layer
    sumo = next(c for c in four if c.optimizer == "sumo" and c.breakdown.activations == b.activations)
    assert sumo.breakdown.optimizer_state / 4 < sumo.per_rank.optimizer_state < sumo.breakdown.optimizer_state / 2
    with pytest.raises(ValueError, match="world_size=2"):
        plan("llama_60m", 64 * GiB, 256, world_size=2)
    with pytest.raises(ValueError, match="global_batch=6"):
        plan("llama_60m", 64 * GiB, 256, world_size=4, parallel="fsdp", global_batch=6)


def test_impossible_budget_gives_the_smallest_that_fits():
    with pytest.raises(ValueError, match=r"gpu_memory=0.10 GiB.*smallest peak .* --gpu-memory 1GiB"):
        plan("llama_60m", int(0.1 * GiB), 256, optimizers=("swan",))


@pytest.mark.parametrize("text, size", [("24GiB", 24 * GiB), ("24576MiB", 24 * GiB), ("80GB", 80 * 10**9),
                                        ("1.5tib", int(1.5 * 2**40))])
def test_memory_units(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["24", "24G", "24XB", "-24GiB", "0GiB", "GiB", "nanGiB"])
def test_bad_memory_units_are_refused(text):
    with pytest.raises(ValueError, match="gpu_memory="):
        parse_memory(text)


def test_cli_prints_the_table_and_one_line_errors(capsys):
    assert main(["plan", "--model", "llama_60m", "--gpu-memory", "1.9GiB", "--seq-len", "256",
                 "--optimizers", "adamw,swan"]) == 0
    out = capsys.readouterr().out
    assert "llama_60m, pretrain: 1.90 GiB per GPU" in out and "| 1 | " in out
    assert main(["plan", "--model", "llama_7b", "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimopt plan: error: invalid model='llama_7b'") and "llama3_8b" in err
    assert main(["plan", "--model", "tiny", "--gpu-memory", "24XB"]) == 2
    assert "invalid gpu_memory='24XB'" in capsys.readouterr().err


def test_published_shapes():
    counts = {"llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248, "llama3_2_1b": 1_235_814_400,
              "llama3_2_3b": 3_212_749_824, "qwen2_5_7b": 7_615_716_864}  # Qwen2.5: + an o_proj bias per layer
    for name, count in counts.items():
        assert sum(p.numel() for p in meta_model(name, 0, 2048, torch.bfloat16).parameters()) == count
    assert SHAPES["llama3_8b"].kv_heads == 8
    from slimopt.train.models import check_model
    with pytest.raises(ValueError, match="published shape"):  # what slimopt train checks
        check_model("llama3_8b")


@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_activation_estimate_follows_grouped_query_attention(kv_heads, dtype):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                         num_key_value_heads=kv_heads, num_hidden_layers=4, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(PRECISIONS[dtype].weights)
    x = torch.randint(0, 512, (2, 64))
    measured = saved_activation_bytes(model, x, dtype)
    assert abs(activation_bytes(model, 2, 64, dtype) - measured) / measured < 0.01


def test_llama3_8b_plans_on_the_meta_device():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # One precision and two optimizers, for time: the step transients of the 8-bit embedding state, on fake
    # tensors, take seconds per setting at 8B (slimopt/optim/lowmem.py's slice loop). RSO's surgery draws nothing.
    knobs = dict(task="finetune", optimizers=("swan", "rso"), dtypes=("bf16-pure",))
    # The default global batch (64) is a target: a --per-layer configuration fits below it, and says so.
    found = plan("llama3_8b", 24 * GiB, 2048, **knobs)
    assert found[0].fits and found[0].per_layer and found[0].global_batch < 64 == found[0].target_batch
    assert f"global batch {found[0].global_batch} of 64: --per-layer cannot accumulate" in found[0].costs
    assert any(c.optimizer == "rso" for c in found)
    text = format_header("llama3_8b", 24 * GiB, 2048, found, "finetune") + format_plan(found)
    assert "global batch up to 64 sequences" in text and "| 1 | swan | bf16-pure |" in text
    # Asked for, 64 is required: nothing fits, and the error gives the smallest budget and a smaller batch.
    with pytest.raises(ValueError, match=r"no configuration of llama3_8b fits \(seq_len 2048, global batch 64\)"
                                         r".*needs at least --gpu-memory \d+GiB; or --global-batch \d+: .*--per-layer"):
        plan("llama3_8b", 24 * GiB, 2048, global_batch=64, **knobs)
    assert all(c.global_batch == 4 for c in plan("llama3_8b", 24 * GiB, 2048, global_batch=4, **knobs))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024**2  # under 1 GiB more


def test_rso_projections_on_the_meta_device_draw_nothing(monkeypatch):
    from slimopt.rso import Projection, draw_projection

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", lambda *args, **kwargs: pytest.fail("drew a projection on the meta device"))
        projection = Projection(64, 8, "orthogonal", 5, device="meta", dtype=torch.float32)
        projection.next_subproblem()
        assert projection.P.is_meta and projection.P.shape == (64, 8)
        assert draw_projection(64, 8, "gaussian", 5, 1, device="meta", dtype=torch.bfloat16).dtype == torch.bfloat16
    # Materialized and loaded, it draws the subproblem it was at: nothing was recorded as drawn on the meta device.
    projection.to_empty(device="cpu")
    projection.load_state_dict({"seed": torch.tensor(5), "subproblem": torch.tensor(1)})
    assert torch.equal(projection.P, draw_projection(64, 8, "orthogonal", 5, 1, device="cpu", dtype=torch.float32))
