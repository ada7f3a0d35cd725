"""Peak memory of a training run, measured the same way for every optimizer.

CUDA: the caching allocator's ``max_memory_allocated`` (tensor bytes).
CPU: the peak of the process's anonymous resident memory (the heap, where tensors live) above its
level when the meter was started, so the Python and torch runtime are not counted. Pages of mapped
files (the memory-mapped token files, the shared libraries) are left out: they are page cache the
kernel can drop at any time, not memory the run holds.

Linux keeps the peak of the whole resident set (VmHWM: anonymous + file + shared pages), not of its
anonymous part. So each :meth:`PeakMemory.peak` call takes VmHWM minus the file and shared pages
resident at that moment, then restarts VmHWM from the current resident set (/proc/self/clear_refs).
Called once per training step, a reading can only be low by the file pages first touched during
that step: one batch of tokens. Where VmHWM cannot be restarted, the intervals all begin when the
process started, which the bench avoids by running each optimizer in a fresh process. Without /proc
(not Linux), the peak is the whole resident set's, file pages included.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _status() -> dict[str, int] | None:
    """The memory fields of /proc/self/status (VmHWM, RssAnon, RssFile, ...) in bytes; None without /proc."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    fields = (line.split(":", 1) for line in lines if line.startswith(("Vm", "Rss")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields}


def _restart_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM ← VmRSS
    except OSError:
        pass


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = ("cuda max_memory_allocated" if self.device.type == "cuda"
                     else "cpu peak anonymous RSS over baseline")
        self.highest = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _restart_peak()
        status = _status()
        self.baseline = status["RssAnon"] if status else _max_rss()

    def restart(self) -> None:
        """From now on, measure afresh: what ran since the last reading (an evaluation between epochs) is left
        out; the peak of the readings so far is kept."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _restart_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            self.highest = max(self.highest, torch.cuda.max_memory_allocated(self.device))
            return self.highest
        status = _status()
        if status is None:
            return _max_rss() - self.baseline
        mapped = status["RssFile"] + status["RssShmem"]
        self.highest = max(self.highest, status["VmHWM"] - mapped - self.baseline)
        _restart_peak()
        return self.highest
