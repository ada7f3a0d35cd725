"""LLaMA models for training runs: the GaLore C4 benchmark family, a CPU-sized ``tiny``, or a local HF dir."""

from __future__ import annotations

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


PRESETS = {
    # Sized so that every optimizer of the default bench trains for a few hundred steps within a minute on 2 cores.
    "tiny": Preset(hidden=128, intermediate=352, heads=4, layers=4, vocab_size=2048),
    # As in the GaLore paper's C4 pre-training runs (T5's 32k vocabulary there).
    "llama_60m": Preset(hidden=512, intermediate=1376, heads=8, layers=8, vocab_size=32000),
    "llama_130m": Preset(hidden=768, intermediate=2048, heads=12, layers=12, vocab_size=32000),
    "llama_350m": Preset(hidden=1024, intermediate=2736, heads=16, layers=24, vocab_size=32000),
    "llama_1b": Preset(hidden=2048, intermediate=5461, heads=32, layers=24, vocab_size=32000),
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


def is_model_dir(name: str) -> bool:
    return (Path(name) / "config.json").is_file()


def check_model(name: str) -> None:
    if name not in PRESETS and not is_model_dir(name):
        raise ValueError(f"invalid model={name!r}: expected a preset {sorted(PRESETS)} or a local HF model "
                         "directory with a config.json")


def vocab_size_for(name: str, requested: int | None) -> int:
    """The vocabulary to train a tokenizer for: as requested, else the preset's, else the local model's own."""
    if requested:
        return requested
    if name in PRESETS:
        return PRESETS[name].vocab_size
    return llama_config(name, 0, 0).vocab_size


def llama_config(name: str, vocab_size: int, seq_len: int):
    """The HF config for a preset, or the one saved in a local model directory."""
    from transformers import AutoConfig, LlamaConfig

    check_model(name)
    if name not in PRESETS:
        return AutoConfig.from_pretrained(name)
    preset = PRESETS[name]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_attention_heads=preset.heads, num_key_value_heads=preset.heads, num_hidden_layers=preset.layers,
        max_position_embeddings=max(seq_len, 256), tie_word_embeddings=False,
    )


def build_model(name: str, *, vocab_size: int, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> torch.nn.Module:
    """A freshly initialized preset (seeded), or the pretrained weights of a local HF model directory.

    A local model keeps its own vocabulary; its size must match the data's tokenizer.
    """
    from transformers import AutoModelForCausalLM

    config = llama_config(name, vocab_size, seq_len)
    if name in PRESETS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(name)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model {name!r} has vocab_size={model.config.vocab_size}, smaller than the data's "
                             f"tokenizer ({vocab_size}); use the model's own tokenizer (--tokenizer {name})")
    return model.to(device=device, dtype=dtype)


def meta_model(name: str, vocab_size: int, seq_len: int, dtype: torch.dtype) -> torch.nn.Module:
    """The model's architecture on the meta device: every shape, no memory, no weights loaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(llama_config(name, vocab_size, seq_len), dtype=dtype)
