"""Where prepared data lives, and how it gets there without ever leaving a half-written entry behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """$SLIMOPT_CACHE, else $XDG_CACHE_HOME/slimopt, else ~/.cache/slimopt; created if missing."""
    if os.environ.get("SLIMOPT_CACHE"):
        root = Path(os.environ["SLIMOPT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "slimopt"
    else:
        root = Path.home() / ".cache" / "slimopt"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def staged_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields an empty directory next to `final` to fill; when the block succeeds it becomes `final` in one
    rename, so a reader sees either nothing or the complete entry, never an interrupted one.

    If another process published `final` first, theirs is kept: cache entries are pure functions of their
    key. `replace=True` swaps out an existing `final` instead.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a cache entry is an ordinary directory
    try:
        yield staging
        ordinary_permissions(staging)
        if replace and final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, retired)  # a directory can only be renamed over an empty one
            os.replace(staging, final)
            shutil.rmtree(retired)
            return
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write` on a temporary path next to `path`, then renames the finished file onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        os.chmod(staging, 0o644)  # mkstemp makes it private; a cache entry is an ordinary file
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def ordinary_permissions(directory: Path, only: list[Path] | None = None) -> None:
    """Give every file under `directory` (or just those in `only`) the mode a plain ``open()`` would: 0644
    under the usual umask 022.

    safetensors (0.8) writes its files through a private temporary file, so ``save_pretrained`` leaves
    model.safetensors at 0600 while config.json beside it gets 0644; a model directory is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(directory).rglob("*") if only is None else only:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
