"""Where and on what code a measurement ran: every result file records it, so figures are never mixed up."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the model name there.
    model = platform.processor()
    if not model and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{model or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def git_revision() -> str | None:
    """The commit measured, flagged when slimopt/ has uncommitted edits: results belong to a code version."""
    package = Path(__file__).parent

    def git(*command):
        return subprocess.run(["git", *command], capture_output=True, text=True, check=True, cwd=package).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Only the library counts: edits elsewhere (results included) do not change what is measured.
        return commit + (" + uncommitted slimopt/ edits" if git("status", "--porcelain", "--", str(package)) else "")
    except (OSError, subprocess.CalledProcessError):
        return None
