"""Checkpoints that survive a kill at any moment: write a temporary file, fsync, then rename over the old one.

A rename within one directory is atomic on POSIX, so ``path`` always holds either
the previous complete checkpoint or the new complete one, never a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def load(path: Path) -> dict:
    """Load a checkpoint of tensors and plain values only (``weights_only=True``); a bad file raises ValueError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "step" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a slimopt training checkpoint")
    return checkpoint
