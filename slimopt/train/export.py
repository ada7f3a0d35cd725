"""A trained model as a Hugging Face directory: ``slimopt train --export-hf DIR`` and ``slimopt export RUN DIR``.

The directory holds what ``save_pretrained`` writes (config.json, generation_config.json, model.safetensors,
sharded when large) for the plain architecture, with RSO's layers merged (W_k + B Pᵀ, as
:func:`slimopt.hf.save_merged` does), and the tokenizer the run trained on: a model directory's own as
transformers saves it, or any other tokenizer (the run's own byte-level BPE, a tokenizer.json) as a
``PreTrainedTokenizerFast``. So

    model = AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

compute the trained model's logits for the run's token ids. A model trained from fresh weights (a preset or a
config) learnt the run's end-of-text id as the boundary between documents (slimopt packs documents with it):
the exported config names that id as its bos and eos tokens. A pretrained model's config is kept as it was.

Every file is written with the mode a plain ``open()`` gives (0644 under the usual umask), not the 0600 with
which safetensors (0.8) writes model.safetensors.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from slimopt.data.tokenizer import TextTokenizer

CHECKPOINTS = ("checkpoint.pt", "checkpoint")  # a single-process run's file, a --parallel run's DCP directory


def check_export_dir(path: str | Path) -> None:
    """ValueError if ``path`` cannot become the export directory (it is a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"invalid export directory {str(path)!r}: it is a file")


def run_checkpoint(run: str | Path) -> Path:
    """The checkpoint of the run in ``run`` (a ``slimopt train --out`` directory); ValueError if it has none."""
    run = Path(run)
    for name in CHECKPOINTS:
        if (run / name).exists():
            return run / name
    raise ValueError(f"{str(run)!r} holds no checkpoint (checkpoint.pt, or checkpoint/ of a --parallel run): "
                     "expected the --out directory of a slimopt train run")


def export_hf(model: nn.Module, tokenizer: TextTokenizer, out_dir: str | Path, *,
              tokenizer_source: str | Path | None = None, fresh_weights: bool = True) -> Path:
    """Write ``model`` (RSO layers merged) and ``tokenizer`` into ``out_dir`` as a Hugging Face directory.

    tokenizer_source: where ``tokenizer`` was loaded from (None: a BPE the run trained); an HF tokenizer
        directory there (with a tokenizer_config.json) is saved as transformers loads it, special tokens and chat
        template included.
    fresh_weights: the model was trained from fresh weights, so its config's bos and eos ids become the
        tokenizer's end-of-text id (in the saved files only: ``model`` itself is left as it was).
    """
    from slimopt.hf import save_merged

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    hf_tokenizer = _hf_tokenizer(tokenizer, tokenizer_source)
    with _document_ids(model, tokenizer.eot_id) if fresh_weights else contextlib.nullcontext():
        save_merged(model, out)
    hf_tokenizer.save_pretrained(out)
    _ordinary_permissions(out, since=started)
    return out


def export_trainer(trainer, out_dir: str | Path) -> Path | None:
    """Export a :class:`~slimopt.train.loop.Trainer`'s model as it is now (at the end of ``run``).

    Under --parallel every rank calls it: FSDP2 gathers the full weights to rank 0 first. Rank 0 writes and
    gets the directory, the other ranks None."""
    from slimopt.train.models import has_weights, tokenizer_for

    config = trainer.config
    if trainer.ranks is not None and trainer.ranks.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.model,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
        if not trainer.leader:
            return None
        model = rebuild_model(config, trainer.data.vocab_size, trainer.hyperparameters.rank)
        model.load_state_dict(full)
    elif not trainer.leader:
        return None
    else:
        model = trainer.model
    return export_hf(model, trainer.data.tokenizer, out_dir,
                     tokenizer_source=tokenizer_for(config.model, config.tokenizer),
                     fresh_weights=not has_weights(config.model))


def export_run(run: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Export the model in a run's checkpoint (``slimopt export RUN DIR``): the model rebuilt from the run's
    settings (RSO's layers too), its trained weights loaded, and the run's tokenizer (its BPE comes from the
    data cache, or is trained again, identically, from the same corpus)."""
    from slimopt.data.pipeline import load_tokenizer
    from slimopt.distributed import checkpoint as sharded_checkpoint
    from slimopt.train import checkpoint
    from slimopt.train.loop import TrainConfig
    from slimopt.train.models import PRECISIONS, has_weights, tokenizer_for, vocab_size_for

    path = run_checkpoint(run)
    if path.name == "checkpoint.pt":
        state = checkpoint.load(path)
        saved, weights = state.get("config", {}), state["model"]
    else:
        saved, weights = sharded_checkpoint.read_metadata(path).get("config", {}), None
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    source = tokenizer_for(config.model, config.tokenizer)
    tokenizer = load_tokenizer(config.data, vocab_size=vocab_size_for(config.model, config.vocab_size),
                               tokenizer=source, progress=progress)
    dtype = PRECISIONS[config.dtype].weights
    model = rebuild_model(config, tokenizer.vocab_size, dtype=dtype)
    if weights is None:
        weights = _sharded_model_state(path, model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"the weights in {path} do not fit the model its run describes ({config.model!r}, "
                         f"tokenizer of {tokenizer.vocab_size} tokens): {error}") from error
    return export_hf(model, tokenizer, out_dir, tokenizer_source=source, fresh_weights=not has_weights(config.model))


def rebuild_model(config, vocab_size: int, rank: int | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture a run of ``config`` trains, on the CPU, with the state dict keys of its checkpoint: RSO's
    layers swapped in as its optimizer does (``rank``: the run's resolved rank; None resolves it as the trainer
    does). Its weights are fresh: load the checkpoint's into it."""
    from transformers import AutoModelForCausalLM

    from slimopt.train.models import PRECISIONS, llama_config

    hf_config = llama_config(config.model, vocab_size, config.seq_len)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    model.to(dtype=dtype or PRECISIONS[config.dtype].weights)
    if config.optimizer == "rso":
        from slimopt.rso import apply

        apply(model, rank=rank or config.rank or max(1, model.config.hidden_size // 4), share_inputs=True)
    return model


def _sharded_model_state(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model part of a --parallel run's DCP checkpoint, read in this one process."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as error:  # DCP reports a missing key or a shape mismatch as a CheckpointException
            raise ValueError(f"cannot read the model in checkpoint {path}: {error}") from error
    return state["model"]


@contextlib.contextmanager
def _document_ids(model: nn.Module, eot_id: int):
    """The model's config (and generation config) naming ``eot_id`` as bos and eos, for the block's duration."""
    configs = [c for c in (model.config, getattr(model, "generation_config", None)) if c is not None]
    saved = [(c, c.bos_token_id, c.eos_token_id) for c in configs]
    for c in configs:
        c.bos_token_id = c.eos_token_id = eot_id
    try:
        yield
    finally:
        for c, bos, eos in saved:
            c.bos_token_id, c.eos_token_id = bos, eos


def _hf_tokenizer(tokenizer: TextTokenizer, source: str | Path | None):
    """A transformers tokenizer that encodes as ``tokenizer`` does: the HF tokenizer saved at ``source`` (a
    directory, or a hub name in the local HF cache), else ``tokenizer`` itself as a PreTrainedTokenizerFast with
    its end-of-text token as bos and eos (as GPT-2's)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source is not None:
        path = Path(source).expanduser()
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not path.exists():  # a hub name: its full HF form, if the HF cache holds one
            with contextlib.suppress(Exception):
                return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    eot = tokenizer.backend.id_to_token(tokenizer.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend.to_str()),
                                   bos_token=eot, eos_token=eot)


def _ordinary_permissions(folder: Path, since: float) -> None:
    """The files written into ``folder`` from ``since`` on get the mode a plain ``open()`` would."""
    from slimopt.data.cache import ordinary_permissions

    written = [p for p in folder.iterdir() if p.is_file() and p.stat().st_mtime >= since - 1]
    ordinary_permissions(folder, only=written)
