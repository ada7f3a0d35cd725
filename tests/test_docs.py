"""The code in README.md and docs/*.md works as written.

- Every ```python block runs, each in a fresh process, in an empty temporary directory, with
  ``OMP_NUM_THREADS=1`` and the repository on ``PYTHONPATH``. A block that cannot run offline on a CPU in
  seconds is marked on the line before its fence with ``<!-- skip-test: the reason -->`` and reported as
  skipped with that reason; ``<!-- test-with: torchrun ARGS -->`` runs it under torchrun instead.
- Bash blocks are not run, but every ``slimopt ...``, ``python -m slimopt ...`` and ``torchrun ... -m slimopt
  ...`` command in them is checked: its subcommand must exist and each ``--flag`` must appear in
  ``python -m slimopt <subcommand> --help``.
- Relative links resolve to files in the repository, and ``page.md#anchor`` links to headings that exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# Options and subcommands a page may document before they land: while `--help` lacks one, a command using it
# is reported as skipped, naming it, not failed. Empty: everything the docs name exists.
PENDING: set[str] = set()

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(skip-test|test-with)\s*:\s*(.*?)\s*-->")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    marker: tuple[str, str] | None  # ("skip-test", reason) or ("test-with", launcher)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1).lower(), match.group(2),
                           (marker.group(1), marker.group(2)) if marker else None))
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
PYTHON_BLOCKS = [block for block in BLOCKS if block.language in ("python", "py")]
SHELL_BLOCKS = [block for block in BLOCKS if block.language in ("bash", "sh", "shell", "console")]


def environment() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launcher(block: Block) -> list[str]:
    if block.marker is None:
        return [sys.executable]
    words = shlex.split(block.marker[1])
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    raise AssertionError(f"{block.where}: unknown test-with launcher {block.marker[1]!r} (only torchrun)")


def test_the_docs_have_code():
    assert PYTHON_BLOCKS and SHELL_BLOCKS
    for block in BLOCKS:
        assert block.language, f"{block.where}: a fence without a language; say ```python, ```bash or ```text"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.where for block in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path):
    if block.marker and block.marker[0] == "skip-test":
        pytest.skip(f"{block.where}: {block.marker[1]}")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    run = subprocess.run([*launcher(block), str(script)], cwd=tmp_path, env=environment(), capture_output=True,
                         text=True, timeout=BLOCK_TIMEOUT_S)
    assert run.returncode == 0, (f"the python block at {block.where} failed (exit {run.returncode}):\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}")


def commands_of(block: Block) -> list[tuple[int, list[str]]]:
    """(line, arguments after `slimopt`) of each slimopt command in a shell block."""
    commands = []
    logical, first = "", None
    for number, raw in enumerate(block.code.split("\n"), start=block.line + 1):
        if first is None:
            first = number
        if raw.endswith("\\"):
            logical += raw[:-1] + " "
            continue
        logical, line, first_line = "", logical + raw, first
        first = None
        words = shlex.split(line, comments=True)
        segment: list[str] = []
        for word in [*words, "&&"]:
            if word not in ("&&", "||", ";", "|"):
                segment.append(word)
                continue
            arguments = slimopt_arguments(segment)
            if arguments is not None:
                commands.append((first_line, arguments))
            segment = []
    return commands


def slimopt_arguments(words: list[str]) -> list[str] | None:
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "slimopt":
        return words[1:]
    if Path(words[0]).name.startswith(("python", "torchrun")) and "-m" in words:
        at = words.index("-m")
        if at + 1 < len(words) and words[at + 1] == "slimopt":
            return words[at + 2 :]
    return None


COMMANDS = [(block, line, arguments) for block in SHELL_BLOCKS
            if not (block.marker and block.marker[0] == "skip-test") for line, arguments in commands_of(block)]


@cache
def help_text(subcommand: str | None) -> str | None:
    """`python -m slimopt [subcommand] --help`, or None when the subcommand does not exist."""
    run = subprocess.run([sys.executable, "-m", "slimopt", *([subcommand] if subcommand else []), "--help"],
                         cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    return run.stdout if run.returncode == 0 else None


@pytest.mark.parametrize("block, line, arguments", COMMANDS,
                         ids=[f"{block.page.relative_to(ROOT)}:{line}" for block, line, _ in COMMANDS])
def test_shell_command_options_exist(block: Block, line: int, arguments: list[str]):
    where = f"{block.page.relative_to(ROOT)}:{line}"
    subcommand = arguments[0] if arguments and not arguments[0].startswith("-") else None
    text = help_text(subcommand)
    if text is None:
        if subcommand in PENDING:
            pytest.skip(f"{where}: `slimopt {subcommand}` does not exist yet (new in this release)")
        raise AssertionError(f"{where}: `slimopt {subcommand}` is not a subcommand (its --help fails)")
    flags = [word.split("=", 1)[0] for word in arguments if word.startswith("--")]
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    unknown = [flag for flag in missing if flag not in PENDING]
    assert not unknown, f"{where}: `slimopt {subcommand or ''}` has no option {', '.join(unknown)} in --help"
    if missing:
        pytest.skip(f"{where}: not in `slimopt {subcommand} --help` yet (new in this release): {', '.join(missing)}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(match.group(1)) for match in re.finditer(r"^#+\s+(.*?)\s*#*\s*$", text, re.M)}


def links_of(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_resolve(page: Path):
    broken = []
    for link in links_of(page):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines; keep it to what a newcomer needs "
                                       f"(≤ {README_MAX_LINES}) and move reference material to docs/")
