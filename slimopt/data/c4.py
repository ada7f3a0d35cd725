"""The "c4" source: allenai/c4 (config "en") streamed with Hugging Face `datasets`, tokenized with a named
tokenizer ("t5-base" by default, as in the GaLore benchmark) and packed into fixed-length sequences.

Nothing is pre-tokenized: batches are packed as the stream is read, by a background thread that stays a few
batches ahead. Training reads c4's train split; the validation and tuning splits are the two halves of c4's
validation split, by the SHA-256 of each text as for the other corpora. `datasets` is imported only here, so it
stays an optional dependency.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from slimopt.data.corpus import hash_fraction
from slimopt.data.errors import DataUnavailable
from slimopt.data.progress import report
from slimopt.data.tokenizer import TextTokenizer, load_named_tokenizer
from slimopt.data.tokens import EVAL_TOKENS, resolve_seq_len

C4_PATH, C4_CONFIG = "allenai/c4", "en"
DEFAULT_TOKENIZER = "t5-base"
SHUFFLE_BUFFER = 10_000  # documents; the seed also shuffles the order of the shard files
ENCODE_BATCH_DOCUMENTS = 256
PREFETCH_BATCHES = 8
NEEDS = "c4 needs network access to huggingface.co and `pip install datasets`"

# (split, shuffle seed or None for file order) -> the documents' texts
TextSource = Callable[[str, int | None], Iterable[str]]


def prepare_c4(tokenizer: str | None, seq_len: int | None, progress: bool) -> C4Data:
    datasets = _import_datasets()
    try:
        text_tokenizer = load_named_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    except DataUnavailable as error:
        raise DataUnavailable(f"{NEEDS}; {error}") from error
    open_texts = functools.partial(_stream_texts, datasets)
    open_texts("train", None)  # resolves the data files on the hub: fails here, not at the first batch
    report(progress, f"streaming {C4_PATH} ({C4_CONFIG}) with tokenizer {text_tokenizer.name}")
    return C4Data(text_tokenizer, open_texts, seq_len)


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise DataUnavailable(f"{NEEDS}: the `datasets` package is not installed (pip install datasets)") from error
    return datasets


def _stream_texts(datasets, split: str, seed: int | None) -> Iterable[str]:
    try:
        rows = datasets.load_dataset(C4_PATH, C4_CONFIG, split=split, streaming=True)
    except Exception as error:  # offline, hub errors, auth: each means the stream cannot be had here
        raise DataUnavailable(f"{NEEDS}; loading {C4_PATH} ({C4_CONFIG}, {split}) failed: {error}") from error
    if seed is not None:
        rows = rows.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    return (row["text"] for row in rows)


def pack_sequences(texts: Iterable[str], tokenizer: TextTokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Documents, each followed by the EOT id, concatenated and cut into consecutive seq_len-token sequences
    (int64); a document that does not fit continues in the next sequence, nothing is padded."""
    texts = iter(texts)
    pending = np.empty(0, dtype=np.int64)
    while chunk := list(itertools.islice(texts, ENCODE_BATCH_DOCUMENTS)):
        encoded = [np.array([*ids, tokenizer.eot_id], dtype=np.int64) for ids in tokenizer.encode_batch(chunk)]
        pending = np.concatenate([pending, *encoded])
        full = len(pending) // seq_len
        yield from pending[: full * seq_len].reshape(full, seq_len)
        pending = pending[full * seq_len :]


class C4Data:
    """What `prepare("c4")` returns: the interface of TokenizedCorpus over a stream.

    `open_texts(split, seed)` gives the documents; prepare_c4 passes the Hugging Face stream.
    """

    name = "c4"

    def __init__(self, tokenizer: TextTokenizer, open_texts: TextSource, seq_len: int | None = None):
        self.tokenizer = tokenizer
        self.open_texts = open_texts
        self.seq_len = seq_len
        self._held_out_batches: dict[tuple[str, int, int, int], list[torch.Tensor]] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batches(self, batch_size: int, seq_len: int | None = None, seed: int = 0) -> PackedStream:
        """Batches packed from the train split, shuffled by `seed` (shard order and a document buffer)."""
        return PackedStream(self.open_texts, self.tokenizer, batch_size, resolve_seq_len(seq_len, self.seq_len), seed)

    def val_batches(self, batch_size: int, seq_len: int | None = None,
                    tokens: int = EVAL_TOKENS) -> list[torch.Tensor]:
        """The first tokens // seq_len sequences packed from c4's validation documents whose text hash is below
        1/2 (the others are the tuning split), in file order: c4's shards are a random sample of the crawl, so
        their head needs no spreading, and reading all of the split would take ~360k documents. Read once per
        shape and kept, so every call returns the same batches."""
        return self._held_out("validation", batch_size, resolve_seq_len(seq_len, self.seq_len), tokens)

    def tune_batches(self, batch_size: int, seq_len: int | None = None,
                     tokens: int = EVAL_TOKENS) -> list[torch.Tensor]:
        """The same from the other half of c4's validation documents: what lr sweeps pick on."""
        return self._held_out("tuning", batch_size, resolve_seq_len(seq_len, self.seq_len), tokens)

    def _held_out(self, split: str, batch_size: int, seq_len: int, tokens: int) -> list[torch.Tensor]:
        shape = (split, batch_size, seq_len, tokens)
        if shape not in self._held_out_batches:
            texts = (text for text in self.open_texts("validation", None)
                     if (hash_fraction(text) < 1 / 2) == (split == "validation"))
            packed = pack_sequences(texts, self.tokenizer, seq_len)
            sequences = list(itertools.islice(packed, max(1, tokens // seq_len)))
            if not sequences:
                raise ValueError(f"c4's {split} documents hold fewer than seq_len={seq_len} tokens")
            self._held_out_batches[shape] = list(torch.from_numpy(np.stack(sequences)).split(batch_size))
        return self._held_out_batches[shape]

    def __repr__(self) -> str:
        return f"C4Data(tokenizer={self.tokenizer.name!r}, vocab_size={self.vocab_size})"


class PackedStream:
    """Training batches packed from a text stream; raises StopIteration if the stream ends.

    The state is the number of sequences consumed. Resuming re-reads the stream from its start and skips that
    many sequences: exact, but it re-downloads and re-tokenizes everything skipped, which takes about as long
    as tokenizing did the first time.
    """

    def __init__(self, open_texts: TextSource, tokenizer: TextTokenizer, batch_size: int, seq_len: int, seed: int):
        self.open_texts = open_texts
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.consumed = 0
        self._ready: _Prefetcher | None = None  # started on the first batch, so a restored stream reads once

    def next_batch(self) -> torch.Tensor:
        if self._ready is None:
            self._ready = _Prefetcher(self._batches(skip=self.consumed), PREFETCH_BATCHES)
        batch = next(self._ready)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"sequences": self.consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"stream state has {key}={int(state[key])}, this stream has {getattr(self, key)}")
        self.close()
        self.consumed = int(state["sequences"])

    def close(self) -> None:
        """Stops the background reader; the next batch starts a new one at the current position."""
        if self._ready is not None:
            self._ready.close()
            self._ready = None

    def _batches(self, skip: int) -> Iterator[torch.Tensor]:
        texts = self.open_texts("train", self.seed)
        sequences = itertools.islice(pack_sequences(texts, self.tokenizer, self.seq_len), skip, None)
        while len(rows := list(itertools.islice(sequences, self.batch_size))) == self.batch_size:
            yield torch.from_numpy(np.stack(rows))


_END = object()


class _Prefetcher:
    """Runs an iterator in a daemon thread, up to `depth` items ahead of next(); the iterator's exception, or
    its end, comes out of next() in order. Tokenizing and downloading release the GIL, so this overlaps them
    with training."""

    def __init__(self, items: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._last = None  # _END or the exception, once reached: every later next() repeats it
        threading.Thread(target=self._fill, args=(items,), daemon=True).start()

    def __next__(self):
        item = self._last if self._last is not None else self._queue.get()
        if item is _END or isinstance(item, Exception):
            self._last = item
            raise StopIteration if item is _END else item
        return item

    def close(self) -> None:
        self._closed.set()

    def _fill(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except Exception as error:
            self._put(error)

    def _put(self, item) -> bool:
        """Waits for room in the queue; False once closed (nobody will read any more)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
