"""Documents, the fixed train/validation/tuning split, and local .txt/.jsonl corpora."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from slimopt.data.errors import BadCorpus, DataUnavailable

# Where the hash of a document's text lands in [0, 1) decides its split, whichever corpus and order it comes in:
# [0, 1/16) validation (what runs report), [1/16, 3/32) tuning (what lr sweeps pick on), the rest train.
# Validation is that large so the builtin corpus holds well over the 256k tokens an evaluation reads.
VALIDATION_END = 1 / 16
TUNING_END = VALIDATION_END + 1 / 32
# Part of every corpus key, so changing how documents are cut or split invalidates caches built the old way.
SPLIT_RULE = "sha256-text-val[0,1/16)-tune[1/16,3/32);txt-paragraphs-10000"

LOCAL_SUFFIXES = (".txt", ".jsonl")
# A .txt file is cut at paragraph breaks into documents of at least this many characters, so that a single
# book still yields documents for both splits.
TXT_DOCUMENT_CHARS = 10_000


@dataclass(frozen=True)
class Document:
    id: str
    text: str


class Splits(NamedTuple):
    train: list[Document]
    validation: list[Document]
    tuning: list[Document]


SPLIT_FILES = ("train", "val", "tune")  # each split's file name in caches (train.jsonl, val.bin, ...), in order


@dataclass(frozen=True)
class Corpus:
    """A named set of documents already split; `key` changes whenever the documents or their split would."""

    name: str
    key: str
    load: Callable[[], Splits]  # may read a lot


def split_documents(documents: Iterable[Document]) -> Splits:
    """(train, validation, tuning), each in the input order, disjoint at the document level.

    The text decides, not the position or id: exact duplicates land on the same side (no leak through
    repeated documents), and adding or removing documents never moves the others. A corpus too small to
    get a validation (or tuning) document that way gives up its lowest-hash text(s) left to that split.
    """
    documents = list(documents)
    hashes = [hash_fraction(document.text) for document in documents]
    if not hashes:
        raise ValueError("the corpus has no documents with text")
    distinct = sorted(set(hashes))
    ends, start = [], 0.0
    for end in (VALIDATION_END, TUNING_END):
        lowest = bisect.bisect_left(distinct, start)
        if lowest + 1 >= len(distinct):
            break  # nothing left for tuning or train: reported below
        if distinct[lowest] >= end:
            end = distinct[lowest + 1]  # the range holds no text: take only the lowest one left
        ends.append(end)
        start = end
    if len(ends) < 2 or distinct[-1] < start:
        raise ValueError(f"the corpus has {len(distinct)} different document(s): too few to hold out validation "
                         f"and tuning documents and still train on others (add text: a .txt file gives one "
                         f"document per {TXT_DOCUMENT_CHARS:,} characters)")
    sides = [bisect.bisect_right(ends, value) for value in hashes]  # 0 validation, 1 tuning, 2 train
    validation, tuning, train = ([d for d, side in zip(documents, sides) if side == wanted] for wanted in range(3))
    return Splits(train, validation, tuning)


def documents_key(splits: Splits) -> str:
    digest = hashlib.sha256(SPLIT_RULE.encode())
    for split in splits:
        for document in split:
            digest.update(f"{document.id}\0{document.text}\0".encode())
        digest.update(b"\1")
    return digest.hexdigest()


def local_corpus(source: str | Path) -> Corpus:
    """A .txt or .jsonl file, or a folder searched recursively for them, as a split corpus.

    .jsonl: one document per line, from its "text" field. .txt: paragraphs ("\\n\\n"-separated, or lines when
    the file has no blank line) grouped into documents of at least TXT_DOCUMENT_CHARS characters.
    The key hashes the files' bytes, so an edited corpus gets fresh tokenizer and token caches.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DataUnavailable(f"data path {root} does not exist (give a .txt/.jsonl file or a folder of them)")
    if root.is_file() and root.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"data file {root} is neither .txt nor .jsonl")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    files = [path for path in files if path.is_file()]
    if not files:
        raise DataUnavailable(f"no .txt or .jsonl files under {root}")

    digest = hashlib.sha256(SPLIT_RULE.encode())
    for path in files:
        digest.update(f"{_relative_name(path, root)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())

    def load() -> Splits:
        return split_documents(document for path in files for document in read_documents(path, root))

    return Corpus(name=root.name, key=digest.hexdigest(), load=load)


def read_documents(path: Path, root: Path) -> list[Document]:
    name = _relative_name(path, root)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadCorpus(f"{name}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if path.suffix == ".jsonl":
        return _jsonl_documents(text, name)
    return _txt_documents(text, name)


def _jsonl_documents(text: str, name: str) -> list[Document]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadCorpus(f"{name}:{number}: not valid JSON ({error.msg} at column {error.colno}); each .jsonl "
                            "line must be an object with a string \"text\" field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadCorpus(f"{name}:{number}: each .jsonl line must be an object with a string \"text\" field")
        if record["text"].strip():
            documents.append(Document(f"{name}:{number}", record["text"]))
    return documents


def _txt_documents(text: str, name: str) -> list[Document]:
    separator = "\n\n" if "\n\n" in text else "\n"
    documents, pending, pending_chars = [], [], 0
    for paragraph in text.split(separator):
        pending.append(paragraph)
        pending_chars += len(paragraph)
        if pending_chars >= TXT_DOCUMENT_CHARS:
            documents.append(separator.join(pending))
            pending, pending_chars = [], 0
    documents.append(separator.join(pending))
    return [Document(f"{name}#{index}", chunk) for index, chunk in enumerate(documents) if chunk.strip()]


def _relative_name(path: Path, root: Path) -> str:
    return path.name if path == root else path.relative_to(root).as_posix()


def hash_fraction(text: str) -> float:
    """Where a text's SHA-256 falls in [0, 1): a fixed, platform-independent pseudo-random draw."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
