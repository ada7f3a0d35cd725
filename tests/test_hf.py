"""slimopt with Hugging Face: Trainer builds and checkpoints slimopt optimizers exactly, RSO saves as the plain
architecture, PEFT/TRL train what the LoRA policy says, and the traps of issue 11 raise."""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import slimopt.hf  # noqa: E402
import slimopt.rso  # noqa: E402
from slimopt.optim import FallbackWarning  # noqa: E402

VOCAB, SEQ_LEN, RANK = 64, 16, 4


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: torch's thread hand-offs would cost more than the work (on a loaded 2-core
    machine a 4-step Trainer run took 6 s with 2 threads, 0.05 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed=0, **config):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=3, **config))


class Tokens(torch.utils.data.Dataset):
    """Random token rows of one length: no padding, so every micro-batch has the same number of targets."""

    def __init__(self, count, seed=0):
        self.ids = torch.randint(0, VOCAB, (count, SEQ_LEN), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


# SUMO's exact route, for the tests that compare two runs to 1e-6: the bf16 route ("auto" on a CPU with fast
# bf16) is not reproducible to that across gradients that differ by an ulp (docs/numerics.md).
EXACT = f"rank={RANK},update_gap=2,orthogonalizer=eigh"


def training_args(out_dir, **overrides):
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    weight_decay=0.1, optim_args=f"rank={RANK},update_gap=2", lr_scheduler_type="constant",
                    save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**settings, **overrides})


def train(model, args, data=None, resume_from_checkpoint=None, **trainer_kwargs):
    trainer = Trainer(model=model, args=args, train_dataset=data or Tokens(32), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def factory(args, algorithm, model):
    """Trainer builds the optimizer. transformers ≥ 5.2 hands it its model; older ones need ``model``."""
    return {"optimizer_cls_and_kwargs": slimopt.hf.optimizer_cls_and_kwargs(args, algorithm, model=model)}


def prebuilt(model, args, algorithm):
    return {"optimizers": (slimopt.hf.build_optimizer(model, algorithm, **slimopt.hf.hparams_from_args(args)), None)}


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_same_parameters(model, other, atol=0.0):
    params, others = dict(model.named_parameters()), dict(other.named_parameters())
    assert params.keys() == others.keys()
    for name, param in params.items():
        largest = (param - others[name]).abs().max().item()
        assert largest <= atol, f"{name}: max |Δ| = {largest}"


# ------------------------------------------------------------------ groups


def test_groups_route_hidden_linears_to_the_algorithm_and_split_the_rest_as_trainer_does(tmp_path):
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = slimopt.hf.build_optimizer(model, "sumo", lr=1e-3, weight_decay=0.1, rank=RANK, update_gap=2)
    assert not [w for w in record if issubclass(w.category, FallbackWarning)]

    groups = {(g["algorithm"], g["weight_decay"]): set(g["param_names"]) for g in optimizer.param_groups}
    hidden = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert groups.keys() == {("sumo", 0.1), ("adamw", 0.1), ("adamw", 0.0)}
    assert groups["sumo", 0.1] == hidden
    assert groups["adamw", 0.1] == {"model.embed_tokens.weight", "lm_head.weight"}
    assert groups["adamw", 0.0] == {name for name, _ in model.named_parameters() if "norm" in name}
    assert all(g["rank"] == RANK and g["update_gap"] == 2 for g in optimizer.param_groups if g["algorithm"] == "sumo")

    decayed = set(Trainer(model=model, args=training_args(tmp_path)).get_decay_parameter_names(model))
    for (_, weight_decay), names in groups.items():
        assert all((name in decayed) == (weight_decay > 0) for name in names)


def test_trainer_built_optimizer_is_bit_identical_to_a_prebuilt_one(tmp_path):
    args = training_args(tmp_path)
    by_trainer, by_hand = tiny_llama(), tiny_llama()
    trainer = train(by_trainer, args, **factory(args, "sumo", by_trainer))
    train(by_hand, args, **prebuilt(by_hand, args, "sumo"))

    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, slimopt.SUMO) and optimizer.state[by_trainer.lm_head.weight]["step"] == 4
    assert_same_parameters(by_trainer, by_hand)


def test_adamw_part_equals_trainers_own_adamw(tmp_path):
    """With every parameter in AdamW groups, the optimizer is Trainer's default AdamW, decay split included."""
    args = training_args(tmp_path)
    ours, trainers = tiny_llama(), tiny_llama()
    train(ours, args, **factory(args, "adamw", ours))
    trainer = train(trainers, args)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    assert_same_parameters(ours, trainers, atol=1e-6)


def test_training_arguments_are_honoured(tmp_path):
    args = training_args(tmp_path, learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.99,
                         adam_epsilon=1e-6, optim_target_modules=["q_proj", "v_proj"],
                         optim_args="rank=3, update_gap=7, subspace=svd, foreach=false")
    model = tiny_llama()
    optimizer = Trainer(model=model, args=args, **factory(args, "galore", model)).create_optimizer()
    assert optimizer.foreach is False
    (matrices,) = [g for g in optimizer.param_groups if g["algorithm"] == "galore"]
    assert {name.split(".")[-2] for name in matrices["param_names"]} == {"q_proj", "v_proj"}
    shared = (matrices["lr"], matrices["weight_decay"], matrices["betas"], matrices["eps"])
    assert shared == (3e-3, 0.05, (0.8, 0.99), 1e-6)
    assert (matrices["rank"], matrices["update_gap"], matrices["subspace"]) == (3, 7, "svd")

    all_linear = slimopt.hf.build_optimizer(tiny_llama(), "swan", target_modules="all-linear")
    default = slimopt.hf.build_optimizer(tiny_llama(), "swan")
    assert [g["param_names"] for g in all_linear.param_groups] == [g["param_names"] for g in default.param_groups]
    regex = slimopt.hf.build_optimizer(tiny_llama(), "swan", target_modules=r".*\.mlp\.(up|down)_proj")
    assert {name.split(".")[-2] for name in regex.param_groups[0]["param_names"]} == {"up_proj", "down_proj"}
    rso = slimopt.hf.build_optimizer(tiny_llama(), "rso", rank=RANK, target_modules=["q_proj", "v_proj"])
    assert {name.split(".")[-1] for name in rso.adaptation.layers} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("optim_args, message", [
    ("rank", r"optim_args='rank': 'rank' is not key=value"),
    ("rank=4,rank=5", "'rank' is given twice"),
    ("lr=0.1", "set lr through TrainingArguments"),
    ("rank=4,colour=red", r"invalid hyperparameter\(s\) \['colour'\] for algorithm='sumo'"),
])
def test_bad_optim_args_raise_naming_them(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        slimopt.hf.optimizer_cls_and_kwargs(training_args(tmp_path, optim_args=optim_args), "sumo")


@pytest.mark.parametrize("call, message", [
    (lambda m: slimopt.hf.build_optimizer(m, "lion"), "invalid algorithm='lion'"),
    (lambda m: slimopt.hf.build_optimizer(m, "sumo", rank=0), "invalid rank=0"),
    (lambda m: slimopt.hf.build_optimizer(m, "sumo", lora="sumo"), "invalid lora='sumo'"),
    (lambda m: slimopt.hf.build_optimizer(m, "sumo", target_modules=["rotary"]),
     r"invalid target_modules=\['rotary'\]: matches no trainable linear layer"),
    (lambda m: slimopt.hf.build_optimizer(m.requires_grad_(False), "sumo"), "has no trainable parameters"),
])
def test_bad_arguments_raise_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_llama())


def test_rso_is_refused_where_trainer_would_build_it_after_loading_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"RSO swaps the model's linear layers.*optimizers=\(optimizer, None\)"):
        slimopt.hf.optimizer_cls_and_kwargs(training_args(tmp_path), "rso")


def test_before_transformers_5_2_trainers_groups_are_routed_by_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(slimopt.hf, "FACTORY_VERSION", slimopt.hf.Version("99"))
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        slimopt.hf.optimizer_cls_and_kwargs(args, "sumo")
    model = tiny_llama()
    cls, kwargs = slimopt.hf.optimizer_cls_and_kwargs(args, "sumo", model=model)
    trainer_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.1}]
    optimizer = cls(trainer_groups, **kwargs)
    reference = slimopt.hf.build_optimizer(model, "sumo", **slimopt.hf.hparams_from_args(args))
    assert [g["param_names"] for g in optimizer.param_groups] == [g["param_names"] for g in reference.param_groups]
    with pytest.raises(ValueError, match="is not the model Trainer trains"):
        cls([{"params": list(tiny_llama().parameters())}], **kwargs)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("algorithm, share_inputs", [
    ("sumo", None), ("swan", None), ("galore", None), ("rso", True), ("rso", False)])
def test_resume_through_trainer_is_exact(tmp_path, algorithm, share_inputs):
    def run(out_dir, resume_from_checkpoint=None):
        args = training_args(out_dir, max_steps=6, save_strategy="steps", save_steps=3)
        model = tiny_llama()
        if algorithm == "rso":  # swaps the layers, so it is built before Trainer loads the checkpoint
            optimizer = slimopt.hf.build_optimizer(model, "rso", share_inputs=share_inputs,
                                                   **slimopt.hf.hparams_from_args(args))
            options = {"optimizers": (optimizer, None)}
        else:
            options = factory(args, algorithm, model)
        return model, train(model, args, resume_from_checkpoint=resume_from_checkpoint, **options)

    uninterrupted, trainer = run(tmp_path / "a")
    resumed, _ = run(tmp_path / "b", resume_from_checkpoint=tmp_path / "a" / "checkpoint-3")
    assert trainer.state.global_step == 6
    assert_same_parameters(uninterrupted, resumed)  # max |Δ| == 0
    if algorithm == "rso":
        for (name, buffer), other in zip(uninterrupted.named_buffers(), resumed.buffers()):
            assert torch.equal(buffer, other), name  # seeds, subproblems and P: 3 resamples in each run
        assert all(int(p.subproblem) == 3 for p in trainer.optimizer.optimizer.adaptation.projections)


def test_save_merged_reloads_as_the_plain_architecture(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path / "run", max_steps=3)  # ends mid-subproblem: B ≠ 0
    train(model, args, optimizers=(slimopt.hf.build_optimizer(model, "rso", rank=RANK, update_gap=2), None))
    assert any(layer.B.abs().max() > 0 for layer in model.modules() if isinstance(layer, slimopt.rso.RSOLinear))

    slimopt.hf.save_merged(model, tmp_path / "merged")
    plain, info = LlamaForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not any(isinstance(m, slimopt.rso.RSOLinear) for m in plain.modules())
    ids = Tokens(2).ids
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert any(isinstance(m, slimopt.rso.RSOLinear) for m in model.modules())  # the model itself is unchanged
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "merged").glob("*.safetensors")}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes  # not safetensors' private 0600


def test_rso_callback_with_torch_adamw_matches_slimopt_rso(tmp_path):
    args = training_args(tmp_path, max_steps=5, weight_decay=0.0)  # RSO's own weight decay also shrinks W_k
    own = tiny_llama()
    adaptation = slimopt.rso.apply(own, rank=RANK)
    adamw = torch.optim.AdamW(adaptation.param_groups(), lr=args.learning_rate, weight_decay=0.0)
    callback = slimopt.hf.RSOCallback(adaptation, update_gap=2)
    train(own, args, optimizers=(adamw, None), callbacks=[callback])

    reference = tiny_llama()
    trainer = train(reference, args, optimizers=(slimopt.hf.build_optimizer(
        reference, "rso", rank=RANK, update_gap=2, lr=args.learning_rate), None))
    assert all(int(p.subproblem) == 2 for p in adaptation.projections)
    assert all(int(p.subproblem) == 2 for p in trainer.optimizer.optimizer.adaptation.projections)
    assert_same_parameters(own, reference, atol=1e-5)


def test_accelerate_prepare_keeps_host_counters_on_the_cpu_and_resumes_exactly():
    """accelerate's prepare(optimizer) loads move_to_device(state_dict()): the run continues as without it."""
    from accelerate import Accelerator

    models = [tiny_llama(), tiny_llama()]
    optimizers = [slimopt.hf.build_optimizer(m, "galore", rank=RANK, update_gap=2, lr=1e-2) for m in models]
    batches = Tokens(5).ids.split(1)

    def step(model, optimizer, ids):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for ids in batches[:2]:
        for model, optimizer in zip(models, optimizers):
            step(model, optimizer, ids)
    prepared = Accelerator(cpu=True).prepare(optimizers[1])
    for state in optimizers[1].state.values():
        counters = [state[k] for k in ("step", "seed") if k in state]
        assert all(c.device.type == "cpu" and c.dtype == torch.int64 for c in counters)
    for ids in batches[2:]:
        step(models[0], optimizers[0], ids)
        step(models[1], prepared, ids)
    assert_same_parameters(*models)


# ------------------------------------------------------------------ training


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    accumulated, full = tiny_llama(), tiny_llama()
    args = training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, optim_args=EXACT)
    accumulated_losses = losses(train(accumulated, args, **factory(args, "sumo", accumulated)))
    args = training_args(tmp_path, per_device_train_batch_size=8, optim_args=EXACT)
    full_losses = losses(train(full, args, **factory(args, "sumo", full)))
    assert len(full_losses) == 4
    assert accumulated_losses == pytest.approx(full_losses, abs=1e-6)
    # Adam divides by √v: the rounding difference of a near-zero gradient (a rarely seen embedding row)
    # becomes a visible difference in its update, hence the looser bound on the weights.
    assert_same_parameters(accumulated, full, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["sumo", "rso"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, algorithm):
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        args = training_args(tmp_path, gradient_checkpointing=checkpointing)
        options = factory(args, algorithm, model) if algorithm != "rso" else prebuilt(model, args, "rso")
        results.append((model, losses(train(model, args, **options))))
    (plain, plain_losses), (checkpointed, checkpointed_losses) = results
    assert len(plain_losses) == 4
    assert checkpointed_losses == pytest.approx(plain_losses, abs=1e-6)
    # Recomputing the forward changes the order in which autograd sums some gradients (RSO: q, k and v into
    # their shared x·P), so the weights agree to rounding, not bitwise.
    assert_same_parameters(plain, checkpointed, atol=1e-5)


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_full_batch(tmp_path):
    """torchrun, gloo: each rank trains on half of every batch; both end with the same weights, which are those
    of one process that sees the whole batch (4 rows, so every step is one epoch and sees the same rows)."""
    script = Path(__file__).with_name("hf_ddp_run.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name

    single = tiny_llama()
    args = training_args(tmp_path / "single", max_steps=3, optim_args=EXACT)
    trainer = train(single, args, data=Tokens(4), **factory(args, "sumo", single))
    assert ranks[0]["losses"] == pytest.approx(losses(trainer), rel=1e-5)
    for name, param in single.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], param.detach(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ DeepSpeed-style partitions


def test_flattened_partitions_raise_at_build_and_at_the_first_step():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    q_proj.ds_shape, q_proj.ds_numel = q_proj.shape, q_proj.numel()  # a ZeRO-3 parameter
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight.*flattened partition"):
        slimopt.hf.build_optimizer(model, "sumo")

    model = tiny_llama()
    optimizer = slimopt.hf.build_optimizer(model, "swan")
    before = copy.deepcopy(model.state_dict())
    for group in optimizer.param_groups:  # what ZeRO-1/2 does to the optimizer it wraps
        group["params"] = [torch.nn.Parameter(torch.cat([p.detach().flatten() for p in group["params"]]))]
    ids = Tokens(1).ids
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"flattened partition.*DeepSpeed ZeRO"):
        optimizer.step()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


# ------------------------------------------------------------------ PEFT and TRL


def lora_model(**config):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_llama(), lora_config(**config))


def lora_config(**config):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM", **config)


@pytest.mark.parametrize("lora", ["adamw", "algorithm"])
def test_peft_trains_exactly_the_lora_tensors_as_the_policy_routes_them(tmp_path, lora):
    model = lora_model()
    args = training_args(tmp_path, optim_args=f"rank={RANK},update_gap=2,lora={lora}")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = train(model, args, **factory(args, "sumo", model))
    fallback = [str(w.message) for w in record if issubclass(w.category, FallbackWarning)]

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if ".lora_A." in name or ".lora_B." in name}
    assert len(changed) == 8  # q and v, 2 layers, A and B
    algorithms = {g["algorithm"] for g in trainer.optimizer.optimizer.param_groups}
    if lora == "adamw":
        assert algorithms == {"adamw"}
        assert len(fallback) == 1 and "LoRA factors train with AdamW (lora='adamw')" in fallback[0]
    else:
        assert algorithms == {"sumo"} and not fallback


def test_rso_on_a_peft_model_is_refused():
    with pytest.raises(ValueError, match="RSO cannot train PeftModelForCausalLM, a PEFT model"):
        slimopt.hf.build_optimizer(lora_model(), "rso", rank=RANK)


def sft_setup(tmp_path):
    """TRL's SFTTrainer inputs: a word-level tokenizer built in memory and 16 short texts."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *words])},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", bos_token="<bos>")
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=generator).tolist())
             for _ in range(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         max_length=SEQ_LEN, optim_args=f"rank={RANK},update_gap=2", save_strategy="no",
                         report_to=[], use_cpu=True, disable_tqdm=True)
    return trl, dict(args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer,
                     peft_config=lora_config())


def test_sft_trainer_with_peft_config_builds_on_the_wrapped_model_and_changes_every_lora_tensor(tmp_path):
    trl, inputs = sft_setup(tmp_path)
    model = tiny_llama()
    trainer = trl.SFTTrainer(model=model, **factory(inputs["args"], "sumo", model), **inputs)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # the LoRA policy's notice, tested above
        trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if "lora_" in name} and len(changed) == 8


def test_optimizer_built_before_peft_wrapping_raises_instead_of_training_nothing(tmp_path):
    trl, inputs = sft_setup(tmp_path)
    model = tiny_llama()
    too_early = slimopt.hf.build_optimizer(model, "sumo", rank=RANK)
    trainer = trl.SFTTrainer(model=model, optimizers=(too_early, None), **inputs)
    with pytest.raises(RuntimeError, match=r"holds none of the 8 trainable parameters.*built before the model was"):
        trainer.train()


def test_first_step_check_leaves_later_step_hooks_working():
    """The check runs once, before the first step, and stays registered: hooks added after it keep firing."""
    model = tiny_llama()
    optimizer = slimopt.hf.build_optimizer(model, "sumo", lr=1e-3, rank=4, update_gap=2)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append(1))
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (2, 8))
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 2


@pytest.mark.parametrize("algorithm", ["adamw", "sumo", "swan", "galore", "rso", "apollo_mini"])
def test_adamw_lr_sets_the_fallback_groups_alike_under_every_algorithm(algorithm):
    """Embeddings, head and norms train at adamw_lr whatever trains the hidden matrices (which keep lr)."""
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = slimopt.hf.build_optimizer(model, algorithm, lr=1e-2, adamw_lr=3e-4, rank=RANK)
    names = {id(p): name for name, p in model.named_parameters()}
    lrs = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"] if id(p) in names}
    hidden = {name for name in lrs if name.endswith("proj.weight") or "lora_B" in name}
    assert lrs["model.embed_tokens.weight"] == lrs["lm_head.weight"] == lrs["model.norm.weight"] == 3e-4
    assert hidden or algorithm == "rso"  # RSO's adapted layers hold B's, named by the surgery
    assert all(lrs[name] == 1e-2 for name in hidden)
    assert 1e-2 in {group["lr"] for group in optimizer.param_groups}
    default = slimopt.hf.build_optimizer(tiny_llama(), algorithm, lr=1e-2, rank=RANK)
    assert {group["lr"] for group in default.param_groups} == {1e-2}


def test_adamw_lr_with_lora_keeps_the_factors_at_lr():
    model = lora_model()
    optimizer = slimopt.hf.build_optimizer(model, "adamw", lr=1e-3, adamw_lr=5e-5)
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == (1e-3 if "lora_" in names[id(p)] else 5e-5), names[id(p)]
    with pytest.raises(ValueError, match="adamw_lr=-1"):
        slimopt.hf.build_optimizer(model, "adamw", adamw_lr=-1)
