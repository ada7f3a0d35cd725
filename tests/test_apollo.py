"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025): batched == reference, the published formulas written out
independently, the norm-growth limiter, exact state sizes, exact resume, errors, Hugging Face and FSDP2."""

import io
import itertools
import math
import os
import warnings

import pytest
import torch
from helpers import MixedShapes, matrix_group, run_fixed_gradients, run_steps, spawn, stepped_optimizers
from torch import nn

import slimopt
from slimopt import APOLLO, APOLLOMini
from slimopt.optim import ALGORITHMS
from slimopt.transforms.subspace import sketch_seed

VARIANTS = {
    "apollo": (APOLLO, dict(rank=3)),
    "apollo_mini": (APOLLOMini, {}),
}
GAP = 3
STEPS = 2 * GAP + 1  # two refreshes of the projection inside the run (steps 3 and 6), and the first at step 0


def fixed_gradients(shape, steps, seed=0, growth=None):
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]
    return [g * growth(t) for t, g in enumerate(grads)] if growth else grads


# --- batched == reference --------------------------------------------------------------------------------


class WithExperts(MixedShapes):
    """MixedShapes (tall, wide and square matrices, two of each non-square shape, a conv) plus a 3-D batch of
    matrices (E × out × in) and a 2-D matrix of one expert's shape, which stacks with it."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(3, 7, 5) / 3)
        self.single = nn.Parameter(torch.randn(7, 5) / 3)


@pytest.mark.parametrize("options", [{}, {"norm_growth_limit": None, "weight_decay": 0.1},
                                     {"lr_scale": "adamw"}], ids=["published", "no-limit-wd", "adamw-lr"])
@pytest.mark.parametrize("name", VARIANTS)
def test_batched_equals_reference_across_refreshes(name, options):
    cls, hparams = VARIANTS[name]
    runs = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = WithExperts()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warnings (biases, the norm), tested elsewhere
            optimizer = cls(matrix_group(model), lr=0.02, update_gap=GAP, foreach=foreach, **hparams, **options)
        run_fixed_gradients(model, optimizer, STEPS)
        runs.append((model, optimizer))
    (fast, fast_opt), (ref, ref_opt) = runs
    for (pname, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=lambda m, n=pname: f"{n}: {m}")
        assert fast_opt.state[p].keys() == ref_opt.state[q].keys()
        for key in fast_opt.state[p]:
            torch.testing.assert_close(fast_opt.state[p][key], ref_opt.state[q][key], atol=1e-5, rtol=1e-4)
    assert set(fast_opt.state[fast.experts]) == {"exp_avg", "exp_avg_sq", "scaled_norm", "seed", "step"}
    assert fast_opt.state[fast.experts]["seed"].shape == (3,)
    torch.manual_seed(0)
    assert not torch.allclose(WithExperts().experts, fast.experts)  # the run moved the weights


# --- the published formulas, written out here in fp64 -----------------------------------------------------


def spec_apollo(W0, grads, seed, *, lr, rank, gap, scale, scale_type, gamma, betas, eps, wd):
    """APOLLO as published (zhuhanqing/APOLLO): for rows ≥ cols (square included) the right side is projected,
    R = G Pᵀ with a random r × cols P, and each row is a channel; otherwise R = Pᵀ G with a rows × r P, each
    column a channel. P's entries N(0, 1/r), drawn at each refresh from the matrix's seed and that step (the
    same draw slimopt makes, so that the two runs can be compared)."""
    W = W0.clone()
    b1, b2 = betas
    right = W.shape[0] >= W.shape[1]
    short = min(W.shape)
    r = min(rank, short)
    m1 = m2 = 0.0
    previous = None
    for t, G in enumerate(grads):
        if t % gap == 0:
            generator = torch.Generator().manual_seed(sketch_seed(seed, t))
            P = torch.randn(short, r, generator=generator, dtype=torch.float64) / math.sqrt(r)
        R = G @ P if right else P.T @ G
        m1 = b1 * m1 + (1 - b1) * R
        m2 = b2 * m2 + (1 - b2) * R**2
        N = m1 / (m2.sqrt() + eps)
        if scale_type == "channel":
            dim = 1 if right else 0
            s = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            s = N.norm() / (R.norm() + 1e-8)
        S = G * s
        norm = S.norm()
        if gamma is not None and previous is not None and norm > gamma * previous:
            S = S * (gamma * previous / norm)
        previous = S.norm()
        delta = math.sqrt(scale) * S * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        W = W * (1 - lr * wd) - lr * delta
    return W


@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (12, 12)])
@pytest.mark.parametrize("name", VARIANTS)
def test_follows_the_published_formulas(name, shape):
    cls, variant = VARIANTS[name]
    hparams = dict(lr=0.05, update_gap=2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, **variant)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # Growing, then shrinking gradients: the limiter binds on some steps and not on others.
    grads = fixed_gradients(shape, 6, growth=lambda t: (1, 3, 9, 4, 1, 0.5)[t])
    param = nn.Parameter(W0.clone())
    optimizer = cls([param], **hparams)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    group = optimizer.param_groups[0]
    expected = spec_apollo(W0, grads, int(optimizer.state[param]["seed"]), lr=0.05, rank=group["rank"], gap=2,
                           scale=group["scale"], scale_type=group["scale_type"], gamma=1.01, betas=(0.8, 0.99),
                           eps=1e-6, wd=0.1)
    torch.testing.assert_close(param.data, expected, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(param.data, W0)
    r = 3 if name == "apollo" else 1
    assert optimizer.state[param]["exp_avg"].shape == (r, max(shape))  # the channels are the longer side
    if name == "apollo_mini":
        assert (group["rank"], group["scale_type"], group["scale"]) == (1, "tensor", 128.0)


def test_published_defaults():
    weight = nn.Parameter(torch.ones(130, 140))  # both sides above the default rank: no warning
    apollo, mini = APOLLO([weight]).defaults, APOLLOMini([weight]).defaults
    assert {k: apollo[k] for k in ("rank", "update_gap", "scale", "scale_type", "norm_growth_limit", "eps", "lr")} \
        == {"rank": 128, "update_gap": 200, "scale": 1.0, "scale_type": "channel", "norm_growth_limit": 1.01,
            "eps": 1e-6, "lr": 1e-2}
    assert (mini["rank"], mini["scale"], mini["scale_type"], mini["update_gap"]) == (1, 128.0, "tensor", 200)
    assert APOLLO.algorithm == APOLLOMini.algorithm == "apollo" and "apollo" in ALGORITHMS
    assert slimopt.APOLLOMini is APOLLOMini and issubclass(APOLLOMini, slimopt.SlimOptimizer)


# --- the norm-growth limiter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_norm_growth_limiter_caps_growth_at_1_01(name, foreach):
    """A constant gradient: the uncorrected Adam direction N = (1 − β1^t)/√(1 − β2^t)·sign grows by 34 %, 16 %,
    10 %, 7 % a step, and so does ‖S‖ without the limiter; with it, by exactly γ = 1.01 a step after the first.
    Δ is √scale·S with Adam's bias correction either way."""
    cls, hparams = VARIANTS[name]
    betas = (0.9, 0.999)
    ratios = {}
    for limit in (1.01, None):
        weight = nn.Parameter(torch.zeros(10, 16))
        optimizer = cls([weight], lr=1.0, norm_growth_limit=limit, foreach=foreach, **hparams)
        norms = []
        grad = fixed_gradients((10, 16), 1)[0]
        for t in range(5):
            before = weight.detach().clone()
            weight.grad = grad.float()
            optimizer.step()
            norms.append(float(optimizer.state[weight]["scaled_norm"]))
            correction = math.sqrt(1 - betas[1] ** (t + 1)) / (1 - betas[0] ** (t + 1))
            delta = float((before - weight.detach()).norm())
            scale = optimizer.param_groups[0]["scale"]
            assert delta == pytest.approx(math.sqrt(scale) * norms[-1] * correction, rel=1e-5)
        ratios[limit] = [b / a for a, b in itertools.pairwise(norms)]
    assert ratios[1.01] == pytest.approx([1.01] * 4, rel=1e-5)
    assert min(ratios[None]) > 1.05  # the limiter was what held it


def test_a_zero_gradient_gives_a_zero_update_and_finite_state():
    for cls, hparams in VARIANTS.values():
        weight = nn.Parameter(torch.randn(10, 6))
        before = weight.detach().clone()
        optimizer = cls([weight], lr=0.1, **hparams)
        for _ in range(2):
            weight.grad = torch.zeros(10, 6)
            optimizer.step()
        assert torch.equal(weight.data, before)
        assert all(torch.isfinite(v).all() for v in optimizer.state[weight].values())


# --- lr_scale="adamw" ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hparams, shape", [("apollo", dict(rank=8), (64, 256)), ("apollo_mini", {}, (16, 256))])
def test_lr_scale_adamw_multiplies_by_the_documented_factor(name, hparams, shape):
    """Δ under lr_scale="adamw" is the published Δ times √(m/r)/√scale (m the shorter side), which brings the
    first update near AdamW's RMS of 1 (Adam's first step is sign-like); the published Δ is far from it."""
    cls, _ = VARIANTS[name]
    deltas = {}
    for lr_scale in ("published", "adamw"):
        weight = nn.Parameter(torch.zeros(shape))
        optimizer = cls([weight], lr=1.0, lr_scale=lr_scale, **hparams)
        weight.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        optimizer.step()
        deltas[lr_scale] = -weight.detach()
    group = optimizer.param_groups[0]
    factor = ALGORITHMS["apollo"].adamw_factor(shape, group)
    assert factor == pytest.approx(math.sqrt(shape[0] / group["rank"]) / math.sqrt(group["scale"]))
    torch.testing.assert_close(deltas["adamw"], deltas["published"] * factor, rtol=1e-5, atol=0)
    rms = {k: float(v.pow(2).mean().sqrt()) for k, v in deltas.items()}
    assert 0.7 < rms["adamw"] < 1.5, rms
    assert not 0.7 < rms["published"] < 1.5, rms


# --- state sizes ---------------------------------------------------------------------------------------------


def test_state_is_the_two_projected_moments_a_norm_a_seed_and_a_step():
    torch.manual_seed(0)
    model = WithExperts()
    matrices = [model.a1.weight, model.b1.weight, model.square.weight, model.experts]
    for cls, hparams, rank in ((APOLLO, dict(rank=5), 5), (APOLLOMini, {}, 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 5 is clamped to the experts' side on purpose
            optimizer = cls([{"params": matrices}], lr=0.01, **hparams)
        # (count, long side, short side): 24×12 tall, 12×24 wide, 12×12, 3 experts 7×5; a float per matrix and
        # two int64 (seed, step; a batched param keeps one step for its matrices).
        for param, (count, long, short) in zip(matrices, [(1, 24, 12), (1, 24, 12), (1, 12, 12), (3, 7, 5)]):
            r = min(rank, short)
            expected = count * (2 * r * long + 1) * 4 + count * 8 + 8
            assert sum(v.nbytes for v in optimizer.state[param].values()) == expected, (cls.__name__, param.shape)


@pytest.mark.parametrize("dtype", ["fp32", "bf16-pure"])
@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_registry_state_bytes_equal_the_real_state_to_the_byte(name, dtype):
    pytest.importorskip("transformers")
    from slimopt.train.models import PRECISIONS, build_model, meta_model
    from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, state_bytes

    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.0, rank=24, update_gap=5)
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0, dtype=PRECISIONS[dtype].weights)
    optimizers = stepped_optimizers(name, model, hp, dtype)
    real = state_bytes(optimizers)
    assert OPTIMIZERS[name].state_bytes(meta_model("tiny", 300, 32, PRECISIONS[dtype].weights), hp) == real
    assert OPTIMIZERS[name].state_bytes(model, hp) == real
    (optimizer,) = optimizers
    expected = (APOLLO if name == "apollo" else APOLLOMini, 24 if name == "apollo" else 1, 1.0 if name == "apollo"
                else 128.0)
    assert type(optimizer) is expected[0]
    group = next(g for g in optimizer.param_groups if g["algorithm"] == "apollo")
    assert (group["rank"], group["scale"]) == expected[1:]
    assert group["scale_type"] == ("channel" if name == "apollo" else "tensor")


# --- checkpoints ---------------------------------------------------------------------------------------------


def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", VARIANTS)
def test_resume_continues_bit_identically(name, dtype):
    cls, hparams = VARIANTS[name]

    def build():
        torch.manual_seed(0)
        model = MixedShapes().to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model, cls(matrix_group(model), lr=0.02, update_gap=GAP, **hparams)

    model, optimizer = build()
    run_steps(model, optimizer, 4, seed=1)  # the refresh at step 3 is behind, the one at step 6 ahead
    checkpoint = save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    expected = run_steps(model, optimizer, 3, seed=2)

    resumed_model, resumed = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert run_steps(resumed_model, resumed, 3, seed=2) == expected
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key, value in optimizer.state[p].items():
            other = resumed.state[q][key]
            assert value.dtype == other.dtype and value.device == other.device and torch.equal(value, other)
    assert resumed.state[resumed_model.a1.weight]["seed"].device.type == "cpu"


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [APOLLO, APOLLOMini])
@pytest.mark.parametrize("options, message", [
    (dict(scale_type="row"), r"scale_type='row'.*\['channel', 'tensor'\]"),
    (dict(rank=0), r"rank=0: expected an integer ≥ 1"),
    (dict(rank=2.5), r"rank=2\.5"),
    (dict(update_gap=0), r"update_gap=0"),
    (dict(scale=-1.0), r"scale=-1\.0"),
    (dict(norm_growth_limit=0.5), r"norm_growth_limit=0\.5"),
    (dict(seed=-1), r"seed=-1"),
    (dict(lr_scale="adamw", scale=0.0), r"scale=0\.0"),
    (dict(lr_scale="rms"), r"lr_scale='rms'"),
    (dict(eps=-1e-6), r"eps=-1e-06"),
])
def test_bad_hyperparameters_raise_naming_them(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls([nn.Parameter(torch.zeros(4, 6))], **options)


def test_a_bad_group_value_raises_at_the_step_and_changes_nothing():
    weight = nn.Parameter(torch.randn(4, 6))
    before = weight.detach().clone()
    optimizer = APOLLO([weight], rank=2)
    optimizer.param_groups[0]["scale_type"] = "column"
    weight.grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match="scale_type='column'"):
        optimizer.step()
    assert torch.equal(weight, before) and int(optimizer.state[weight]["step"]) == 0


# --- Hugging Face ----------------------------------------------------------------------------------------------


def hf_llama():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64))


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_hf_build_optimizer_trains_a_tiny_llama(name):
    import slimopt.hf

    model = hf_llama()
    optimizer = slimopt.hf.build_optimizer(model, name, lr=1e-2, weight_decay=0.1, rank=4, update_gap=2)
    assert isinstance(optimizer, APOLLOMini if name == "apollo_mini" else APOLLO)
    groups = [g for g in optimizer.param_groups if g["algorithm"] == "apollo"]
    assert {n for g in groups for n in g["param_names"]} == {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expected = (4, "channel", 1.0) if name == "apollo" else (1, "tensor", 128.0)  # Mini stays rank 1
    assert all((g["rank"], g["scale_type"], g["scale"], g["update_gap"]) == (*expected, 2) for g in groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):  # across the refresh at steps 2 and 4
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert int(optimizer.state[model.model.layers[0].mlp.up_proj.weight]["step"]) == 5


def test_hf_trainer_builds_apollo_mini_from_training_arguments(tmp_path):
    from transformers import Trainer, TrainingArguments

    import slimopt.hf

    model = hf_llama()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             optim_args="rank=4,update_gap=2", lr_scheduler_type="constant", save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    ids = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=slimopt.hf.optimizer_cls_and_kwargs(args, "apollo_mini", model=model))
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, APOLLOMini)
    assert int(optimizer.state[model.model.layers[1].self_attn.q_proj.weight]["step"]) == 3


# --- FSDP2 on 2 (and 3) gloo ranks -----------------------------------------------------------------------------


def fsdp_setups():
    return {
        "apollo": lambda groups: APOLLO(groups, lr=1e-2, rank=4, update_gap=3),
        "apollo_mini": lambda groups: APOLLOMini(groups, lr=1e-2, update_gap=3),
    }


def fsdp_matches_one_process(rank, world, tmp, names, tolerance):
    """Each rank its rows of every batch of a tiny LLaMA, every decoder layer and the root fully_shard-ed; one
    process with the whole batch; 6 steps, refreshes at 0 and 3."""
    import distributed_workers as dw
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    setups = fsdp_setups()
    report = {}
    for name in names:
        reference = dw.tiny_llama()
        dw.train(reference, setups[name](slimopt.param_groups(reference, adamw={"lr": 3e-3})), dw.batches())
        model = dw.shard(dw.tiny_llama(), mesh)
        optimizer = setups[name](slimopt.param_groups(model, adamw={"lr": 3e-3}))
        dw.train(model, optimizer, [dw.rows_of(b, rank, world) for b in dw.batches()])
        report[name] = dw.max_difference(dw.full_state(model), dict(reference.state_dict()))
    if rank == 0:
        torch.save(report, os.path.join(tmp, "report.pt"))
    for name, difference in report.items():
        assert difference <= tolerance, f"{name}: FSDP2 differs from one process by {difference:.3g}"


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_fsdp2_on_two_ranks_matches_one_process(tmp_path, name):
    pytest.importorskip("transformers")
    report = spawn(tmp_path, fsdp_matches_one_process, [name], 1e-5)
    print(name, f"{report[name]:.2g}")


def test_fsdp2_empty_local_shards_match_one_process(tmp_path, monkeypatch):
    """tests/test_distributed_paths.py's uneven model at 3 ranks, where some ranks hold no rows of the head and
    the bias (the forked ranks see the two setups added to its table)."""
    pytest.importorskip("transformers")
    import distributed_paths_workers as workers

    for name, setup in fsdp_setups().items():
        monkeypatch.setitem(workers.SMALL, name, setup)
    report = spawn(tmp_path, workers.empty_shards, ["apollo", "apollo_mini"], 1e-5, world=3)
    print({k: f"{v:.2g}" for k, v in report.items()})


def test_fsdp2_torch_state_dict_helpers_resume_exactly(tmp_path, monkeypatch):
    """torch's get/set_optimizer_state_dict with DCP (sharded, flattened) and the full state dict on rank 0, after
    step 3 of a 2-rank FSDP2 run (tests/test_distributed_paths.py's workers, the two setups added to their table):
    saving changes nothing, the full dict holds every parameter's state, and steps 4-6 resume exactly."""
    pytest.importorskip("transformers")
    import distributed_paths_workers as workers

    names = ["apollo", "apollo_mini"]
    for name, setup in fsdp_setups().items():
        monkeypatch.setitem(workers.LLAMA, name, setup)
    spawn(tmp_path, workers.dcp_save, names)
    saved = torch.load(tmp_path / "saved.pt")
    assert saved["perturbed"] == dict.fromkeys(names, 0.0)
    assert saved["full_missing"] == {name: [] for name in names}
    for name in names:
        for mode in workers.DCP_MODES:
            spawn(tmp_path, workers.dcp_resume, name, mode)


def test_memory_command_prints_apollo_rows(capsys):
    pytest.importorskip("transformers")
    from slimopt.cli import main

    assert main(["memory", "--model", "tiny", "--optimizers", "adamw,apollo,apollo_mini", "--seq-len", "64",
                 "--batch-size", "2", "--dtype", "fp32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    state = {row.split("|")[1].strip(): float(row.split("|")[4]) for row in rows}
    assert list(state) == ["adamw", "apollo", "apollo_mini"]
    assert state["apollo_mini"] < state["apollo"] < state["adamw"]
