"""prepare(): from a source name or path to tokenized, cached, batchable data."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from slimopt.data.builtin import builtin_corpus
from slimopt.data.c4 import DEFAULT_TOKENIZER, C4Data, prepare_c4
from slimopt.data.cache import cache_dir, staged_dir, write_file_atomically
from slimopt.data.corpus import LOCAL_SUFFIXES, SPLIT_FILES, Corpus, Splits, local_corpus
from slimopt.data.progress import report
from slimopt.data.tokenizer import TextTokenizer, load_named_tokenizer, train_bpe
from slimopt.data.tokens import TokenizedCorpus, token_dtype, write_token_file

SOURCES = ("builtin", "c4")

LoadSplits = Callable[[], Splits]


def prepare(source: str | os.PathLike, *, vocab_size: int = 4096, tokenizer: str | os.PathLike | None = None,
            seq_len: int | None = None, progress: bool = True) -> TokenizedCorpus | C4Data:
    """Data ready for training: `.train_batches(batch_size, seq_len, seed)`, `.val_batches(...)` (what runs
    report), `.tune_batches(...)` (what lr sweeps pick on), `.tokenizer`, `.vocab_size`, `.name`.

    source: "builtin" (fetched on first use), "c4" (streamed; needs `datasets` and the network), or a path to a
        .txt/.jsonl file or a folder of them.
    tokenizer: None trains a byte-level BPE of `vocab_size` on the train split (not for c4, which defaults to
        "t5-base"); otherwise a Hugging Face Hub name or a local tokenizer.json path, and vocab_size is unused.
    seq_len: optional default for the batch methods; given here, a train or validation split too short for it
        fails now.

    The BPE is cached per corpus and vocab_size, the token files per corpus and tokenizer, so a second call
    only opens memory maps. Raises DataUnavailable when a source cannot be had here (the message says how to
    get it) and ValueError for a source that is neither a known name nor a path.
    """
    if source == "c4":
        return prepare_c4(None if tokenizer is None else str(tokenizer), seq_len, progress)
    corpus = builtin_corpus(progress) if source == "builtin" else local_corpus(_local_path(source))
    documents = functools.cache(corpus.load)  # read at most once, and only when a cache entry is missing
    text_tokenizer = _tokenizer(corpus, documents, vocab_size, tokenizer, progress)
    token_files = _cached_token_files(corpus, documents, text_tokenizer, progress)
    if seq_len is not None:  # tuning is checked when an lr sweep reads it: a small one need not stop training
        for split, tokens in zip(Splits._fields[:2], token_files):
            if len(tokens) < seq_len:
                raise ValueError(f"the {split} split of {corpus.name!r} has {len(tokens)} tokens, "
                                 f"fewer than seq_len={seq_len}")
    return TokenizedCorpus(corpus.name, text_tokenizer, *token_files, seq_len)


def load_tokenizer(source: str | os.PathLike, *, vocab_size: int = 4096, tokenizer: str | os.PathLike | None = None,
                   progress: bool = True) -> TextTokenizer:
    """The tokenizer :func:`prepare` uses for the same arguments, without tokenizing the corpus: the cached BPE
    (trained, and cached, if missing: the same corpus and vocab_size train the same BPE), a named tokenizer, or
    c4's default. What ``slimopt export`` ships with a run's model."""
    if source == "c4":
        return load_named_tokenizer(DEFAULT_TOKENIZER if tokenizer is None else tokenizer)
    if tokenizer is not None:
        return load_named_tokenizer(tokenizer)
    corpus = builtin_corpus(progress) if source == "builtin" else local_corpus(_local_path(source))
    return _tokenizer(corpus, functools.cache(corpus.load), vocab_size, None, progress)


def _tokenizer(corpus: Corpus, documents: LoadSplits, vocab_size: int, tokenizer: str | os.PathLike | None,
               progress: bool) -> TextTokenizer:
    if tokenizer is None:
        return _cached_bpe(corpus, documents, vocab_size, progress)
    return load_named_tokenizer(tokenizer)


def _local_path(source: str | os.PathLike) -> Path:
    """Tells a path from a mistyped source name: a path-like object, a .txt/.jsonl name, a name with a
    directory part, or anything that exists."""
    path = Path(source)
    if isinstance(source, os.PathLike) or path.suffix in LOCAL_SUFFIXES or len(path.parts) > 1 or path.exists():
        return path
    raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}, "
                     "or give a path to a .txt/.jsonl file or a folder of them")


def _cached_bpe(corpus: Corpus, documents: LoadSplits, vocab_size: int, progress: bool) -> TextTokenizer:
    path = cache_dir() / "tokenizers" / f"{_slug(corpus.name)}-{corpus.key[:16]}-bpe{vocab_size}.json"
    if not path.is_file():
        texts = [document.text for document in documents().train]
        report(progress, f"training a byte-level BPE (vocab {vocab_size}) on the {corpus.name} train split, "
                         f"{sum(map(len, texts)) / 1e6:.1f} M characters")
        started = time.perf_counter()
        backend = train_bpe(texts, vocab_size, count=len(texts), progress=progress and sys.stderr.isatty())
        write_file_atomically(path, lambda staging: backend.save(str(staging)))
        report(progress, f"trained in {time.perf_counter() - started:.1f} s: {path}")
    return TextTokenizer(Tokenizer.from_file(str(path)), name=f"{corpus.name}-bpe{vocab_size}")


def _cached_token_files(corpus: Corpus, documents: LoadSplits, tokenizer: TextTokenizer,
                        progress: bool) -> list[np.memmap]:
    folder = cache_dir() / "tokens" / f"{_slug(corpus.name)}-{corpus.key[:16]}-{tokenizer.key}"
    if not folder.is_dir():
        with staged_dir(folder) as staging:
            meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                    "dtype": token_dtype(tokenizer.vocab_size).name}
            for split, split_docs in zip(SPLIT_FILES, documents()):
                started = time.perf_counter()
                texts = [document.text for document in split_docs]
                meta[f"{split}_tokens"] = write_token_file(staging / f"{split}.bin", texts, tokenizer)
                report(progress, f"tokenized {corpus.name} {split}: {meta[f'{split}_tokens']:,} tokens "
                                 f"in {time.perf_counter() - started:.1f} s")
            (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    meta = json.loads((folder / "meta.json").read_text())
    return [np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r") for split in SPLIT_FILES]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)
