"""LLaMA models for training runs: the GaLore C4 benchmark family, a CPU-sized ``tiny``, or a local HF model
directory (pretrained weights, or only a config.json to train from scratch) or JSON config file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab_size: int  # for the builtin corpus's BPE; a named tokenizer brings its own
    kv_heads: int | None = None  # grouped-query attention's key/value heads; None: as many as heads
    tied: bool = False  # the output head shares the input embedding's weight
    attention_bias: bool = False  # biases on q/k/v/o (Qwen2's q/k/v have them; o has none, see SHAPES)


PRESETS = {
    # Sized so that every optimizer of the default bench trains for a few hundred steps within a minute on 2 cores.
    "tiny": Preset(hidden=128, intermediate=352, heads=4, layers=4, vocab_size=2048),
    # As in the GaLore paper's C4 pre-training runs (T5's 32k vocabulary there).
    "llama_60m": Preset(hidden=512, intermediate=1376, heads=8, layers=8, vocab_size=32000),
    "llama_130m": Preset(hidden=768, intermediate=2048, heads=12, layers=12, vocab_size=32000),
    "llama_350m": Preset(hidden=1024, intermediate=2736, heads=16, layers=24, vocab_size=32000),
    "llama_1b": Preset(hidden=2048, intermediate=5461, heads=32, layers=24, vocab_size=32000),
}

# The published shapes (the config.json on the Hugging Face hub) of common large models, offline and without
# weights or tokenizer: for ``slimopt memory`` and ``slimopt plan``, which read shapes only. ``slimopt train``
# refuses them (a random 8B model with its own 128k vocabulary is no run to start from a name): save the config
# as a config.json to train such an architecture from scratch. Only what memory depends on is set; rope scaling
# and the norms' epsilon stay LlamaConfig's defaults. Qwen2.5's attention has biases on q, k and v but not on o;
# a LlamaConfig with attention_bias=True puts one on o too: 3584 parameters per layer more (0.001 %), and the
# same tensors saved for backward.
SHAPES = {
    "llama2_7b": Preset(hidden=4096, intermediate=11008, heads=32, layers=32, vocab_size=32000),
    "llama3_8b": Preset(hidden=4096, intermediate=14336, heads=32, layers=32, vocab_size=128256, kv_heads=8),
    "llama3_2_1b": Preset(hidden=2048, intermediate=8192, heads=32, layers=16, vocab_size=128256, kv_heads=8,
                          tied=True),
    "llama3_2_3b": Preset(hidden=3072, intermediate=8192, heads=24, layers=28, vocab_size=128256, kv_heads=8,
                          tied=True),
    "qwen2_5_7b": Preset(hidden=3584, intermediate=18944, heads=28, layers=28, vocab_size=152064, kv_heads=4,
                         attention_bias=True),
}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # of the parameters, hence of their gradients and of the updates' rounding
    autocast: torch.dtype | None = None  # forward and loss run under torch.autocast with this dtype

    @property
    def compute(self) -> torch.dtype:
        """The dtype of the matmuls and of most activations."""
        return self.autocast or self.weights


# --dtype. "bf16" is what mixed-precision training means (HF Trainer's bf16=True, torch.amp): fp32 master
# weights, gradients and optimizer input, bf16 matmuls. "bf16-pure" keeps the weights themselves in bf16,
# so every update is rounded to bf16 (to nearest, or stochastically with --stochastic-rounding).
PRECISIONS = {
    "fp32": Precision(torch.float32),
    "bf16": Precision(torch.float32, autocast=torch.bfloat16),
    "bf16-pure": Precision(torch.bfloat16),
}


# The files that hold a local HF model's weights (single or sharded, safetensors or torch pickles).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def is_model_dir(name: str) -> bool:
    return (Path(name) / "config.json").is_file()


def is_config_file(name: str) -> bool:
    """A JSON file holding an HF model config (what config.json holds), e.g. ``mycfg.json``."""
    path = Path(name)
    return path.suffix == ".json" and path.is_file()


def has_weights(name: str) -> bool:
    """Whether ``name`` is a local model directory with pretrained weights (not only a config)."""
    folder = Path(name)
    return is_model_dir(name) and any(path.is_file() and not path.name.startswith("adapter_")
                                      for pattern in WEIGHT_FILES for path in folder.glob(pattern))


def check_model(name: str, shapes: bool = False) -> None:
    """Raise ValueError unless ``name`` is a model a run can build; ``shapes``: also one of :data:`SHAPES`
    (for the commands that read shapes only)."""
    if name in PRESETS or is_model_dir(name) or (shapes and name in SHAPES):
        return
    if name in SHAPES:
        raise ValueError(f"invalid model={name!r}: a published shape for `slimopt memory` and `slimopt plan` "
                         "(no weights, no tokenizer); to train that architecture from scratch, pass its config.json "
                         "(a local model directory or JSON config file)")
    if is_config_file(name):
        try:
            settings = json.loads(Path(name).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"invalid model={name!r}: the config file is unreadable ({error})") from error
        if not isinstance(settings, dict) or not isinstance(settings.get("model_type"), str):
            raise ValueError(f"invalid model={name!r}: an HF config file needs a \"model_type\" (e.g. \"llama\"), "
                             "as a config.json saved by transformers has")
        return
    raise ValueError(f"invalid model={name!r}: expected a preset {sorted(PRESETS)}, "
                     + (f"a published shape {sorted(SHAPES)}, " if shapes else "")
                     + "a local HF model directory with a config.json (pretrained weights, or the config alone to "
                     "train from scratch), or a JSON config file")


def vocab_size_for(name: str, requested: int | None) -> int:
    """The vocabulary to train a tokenizer for: as requested, else the preset's, else the local model's own."""
    if requested:
        return requested
    if name in PRESETS:
        return PRESETS[name].vocab_size
    if name in SHAPES:
        return SHAPES[name].vocab_size
    return llama_config(name, 0, 0).vocab_size


def llama_config(name: str, vocab_size: int, seq_len: int):
    """The HF config for a preset, the one saved in a local model directory or JSON config file, or a published
    shape's (:data:`SHAPES`, with its own vocabulary: ``vocab_size`` is ignored, as for a model directory)."""
    from transformers import AutoConfig, LlamaConfig

    check_model(name, shapes=True)
    if name not in PRESETS and name not in SHAPES:
        return AutoConfig.from_pretrained(name)
    preset = PRESETS.get(name) or SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab_size if name in PRESETS else preset.vocab_size, hidden_size=preset.hidden,
        intermediate_size=preset.intermediate, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads or preset.heads, num_hidden_layers=preset.layers,
        max_position_embeddings=max(seq_len, 256), tie_word_embeddings=preset.tied,
        attention_bias=preset.attention_bias,
    )


# ------------------------------------------------------------------ tokenizers

def own_tokenizer(name: str) -> Path | None:
    """The tokenizer saved in a local model directory (tokenizer.json, or an HF tokenizer config), if any."""
    from slimopt.data.tokenizer import has_tokenizer

    return Path(name) if is_model_dir(name) and has_tokenizer(name) else None


def tokenizer_for(name: str, tokenizer: str | None) -> str | None:
    """The tokenizer a run of model ``name`` uses: ``tokenizer`` if given, else the model directory's own, else
    None (a BPE trained on the data), which a model with pretrained weights refuses: its embeddings belong to
    the tokenizer it was trained with. A local ``tokenizer`` is checked against the model here (see
    :func:`check_tokenizer`), before any data is tokenized with it."""
    from slimopt.data.tokenizer import load_named_tokenizer

    if tokenizer is not None:
        if Path(tokenizer).expanduser().exists():
            check_tokenizer(name, load_named_tokenizer(tokenizer))
        return tokenizer
    own = own_tokenizer(name)
    if own is not None:
        return str(own)
    if has_weights(name):
        raise ValueError(f"model {name!r} holds pretrained weights but no tokenizer (tokenizer.json): pass the "
                         "tokenizer it was trained with, --tokenizer DIR; a BPE trained on the data would not match "
                         "its embeddings")
    return None


def check_tokenizer(name: str, tokenizer) -> None:
    """Raise ValueError, naming both, if ``tokenizer`` (a TextTokenizer) cannot be the vocabulary of model
    ``name``: more tokens than its embedding has rows, or, for pretrained weights, clearly another tokenizer
    than the one they were trained with (ids that mean other tokens than in the model directory's own
    tokenizer; without one, fewer than half as many tokens as the embedding has rows)."""
    from slimopt.data.tokenizer import load_named_tokenizer

    if name in PRESETS:
        return  # built for the data's vocabulary
    rows = llama_config(name, 0, 0).vocab_size
    if tokenizer.vocab_size > rows:
        raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, more than the {rows} "
                         f"embedding rows of model {name!r}"
                         + ("; omit --tokenizer to use the model's own" if own_tokenizer(name) else
                            f"; pass a tokenizer (or a --vocab-size) of at most {rows} tokens"))
    if not has_weights(name):
        return  # fresh weights learn whatever vocabulary they are given
    own = own_tokenizer(name)
    if own is None:
        if tokenizer.vocab_size < rows // 2:
            raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, but the pretrained "
                             f"embedding of model {name!r} has {rows} rows: clearly another tokenizer than the one "
                             "the model was trained with")
        return
    reference = load_named_tokenizer(own)
    if reference.key == tokenizer.key:
        return
    expected = reference.backend.get_vocab(with_added_tokens=True)
    given = tokenizer.backend.get_vocab(with_added_tokens=True)
    differ = sum(given.get(token) != token_id for token, token_id in expected.items())
    if differ > 0.01 * len(expected):
        raise ValueError(f"tokenizer {tokenizer.name!r} is not the one model {name!r} was trained with: "
                         f"{differ} of the {len(expected)} tokens of its own tokenizer ({own}) have other ids or "
                         "are missing; omit --tokenizer to use the model's own")


# ---------------------------------------------------------------------- models

def build_model(name: str, *, vocab_size: int, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> torch.nn.Module:
    """A freshly initialized (seeded) preset or config (a model directory without weights, or a JSON config
    file), or the pretrained weights of a local HF model directory.

    A local model or config keeps its own vocabulary; it must have a row for every token of the data's
    tokenizer.
    """
    from transformers import AutoModelForCausalLM

    config = llama_config(name, vocab_size, seq_len)
    if name not in PRESETS and config.vocab_size < vocab_size:
        raise ValueError(f"model {name!r} has vocab_size={config.vocab_size}, smaller than the data's "
                         f"tokenizer ({vocab_size}); use the model's own tokenizer or a smaller --vocab-size")
    if has_weights(name):
        model = AutoModelForCausalLM.from_pretrained(name)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype)


def meta_model(name: str, vocab_size: int, seq_len: int, dtype: torch.dtype) -> torch.nn.Module:
    """The model's architecture on the meta device: every shape, no memory, no weights loaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(llama_config(name, vocab_size, seq_len), dtype=dtype)
