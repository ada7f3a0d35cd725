"""Peak memory of a training run, measured the same way for every optimizer.

CUDA: the caching allocator's ``max_memory_allocated`` (tensor bytes).
CPU: the process's peak resident set (VmHWM) above the resident set when the
meter was started, so the Python and torch runtime are not counted. Linux lets
a process reset its own VmHWM through /proc/self/clear_refs; where it cannot,
the peak includes everything since the process started, which the bench avoids
by running each optimizer in a fresh process.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _status_bytes(field: str) -> int:
    """VmRSS or VmHWM in bytes; without /proc (not Linux), the peak since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "cpu peak RSS over baseline"
        self.baseline = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.baseline = _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM") - self.baseline
