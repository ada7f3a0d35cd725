"""Tokenizers: a byte-level BPE trained on a corpus, or a named one (Hugging Face Hub or local tokenizer.json)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slimopt.data.errors import DataUnavailable

END_OF_TEXT = "<|endoftext|>"
# How other tokenizers spell the token that ends a document, most common first.
END_OF_TEXT_SPELLINGS = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and the end-of-text token


class TextTokenizer:
    """A `tokenizers.Tokenizer` (`.backend`) with the id that separates documents (`.eot_id`).

    encode/decode never add special tokens of their own, so packing controls exactly where EOT goes,
    and decode keeps special tokens, so decode(encode(text)) == text for the byte-level BPE.
    """

    def __init__(self, backend: Tokenizer, name: str):
        self.backend = backend
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = _end_of_text_id(backend, name)
        self.key = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]  # names token caches

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Texts encoded in parallel on all cores (the Rust side releases the GIL)."""
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, *, count: int | None = None, progress: bool = False) -> Tokenizer:
    """A GPT-2-style byte-level BPE with END_OF_TEXT as id 0. Every byte is in the base alphabet, so any text
    encodes without unknown tokens and decodes back exactly. A corpus with fewer distinct merges than asked
    for yields a smaller vocabulary."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE, which needs {MIN_BPE_VOCAB}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=count)
    return backend


def load_named_tokenizer(spec: str | Path) -> TextTokenizer:
    """A tokenizer.json file, a folder holding one (a Hugging Face model or tokenizer directory; one with only
    a tokenizer_config.json, e.g. a SentencePiece model, is converted by transformers), or a Hugging Face Hub
    repository name such as "t5-base"."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file():
            return TextTokenizer(_converted_backend(path), name=str(spec))
        path = path / "tokenizer.json"
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), name=str(spec))
    if path.suffix == ".json":  # a path (a folder without tokenizer.json ends up here too), not a hub name
        raise DataUnavailable(f"tokenizer file {path} does not exist")
    try:
        backend = Tokenizer.from_pretrained(str(spec))
    except Exception as error:  # the hub client raises many types (offline, 404, auth); all mean the same here
        raise DataUnavailable(
            f"could not load tokenizer {str(spec)!r} from the Hugging Face Hub: a named tokenizer needs network "
            f"access to huggingface.co once (then it is cached); or pass a local tokenizer.json path. ({error})"
        ) from error
    return TextTokenizer(backend, name=str(spec))


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a folder holds a tokenizer that :func:`load_named_tokenizer` reads offline."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _converted_backend(folder: Path) -> Tokenizer:
    """The `tokenizers` backend of a local HF tokenizer directory without a tokenizer.json (transformers
    converts a slow tokenizer, e.g. SentencePiece, to a fast one)."""
    try:
        from transformers import AutoTokenizer

        backend = getattr(AutoTokenizer.from_pretrained(folder, local_files_only=True), "backend_tokenizer", None)
    except Exception as error:  # transformers raises many types for a folder it cannot read
        raise DataUnavailable(f"could not load the tokenizer in {folder} ({type(error).__name__}: {error})") from error
    if not isinstance(backend, Tokenizer):
        raise DataUnavailable(f"the tokenizer in {folder} has no fast (tokenizers) form; save it with a "
                              "tokenizer.json")
    return backend


def _end_of_text_id(backend: Tokenizer, name: str) -> int:
    for spelling in END_OF_TEXT_SPELLINGS:
        token_id = backend.token_to_id(spelling)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer {name!r} has no end-of-text token (looked for {', '.join(END_OF_TEXT_SPELLINGS)})")
