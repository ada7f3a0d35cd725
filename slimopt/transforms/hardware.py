"""What a device runs fast, decided from what torch reports about it, for the routes' "auto" choice.

fp64. NVIDIA's data-center parts of compute capability 6.0 (P100), 7.0 (V100), 8.0 (A100, A30),
9.0 (H100, H200, GH200) and 10.0 (B200, GB200) run fp64 at half their fp32 rate or better. Every
other capability is a consumer, workstation, embedded or inference part at 1/32-1/64 of fp32: 6.1
(P40), 7.2/8.7 (Jetson), 7.5 (T4, RTX 20), 8.6 (A10, A40, RTX 30), 8.9 (L4, L40S, RTX 40), 12.x
(RTX 50, RTX PRO Blackwell). So is 10.3: Blackwell Ultra (B300, GB300) cut fp64 to 1.25 TFLOP/s
against 75 of fp32. The rule is therefore a list of exact capabilities, not a threshold; an unknown
newer part counts as slow, the safe side. A CPU runs fp64 at half its fp32 rate.

Low precision. The iterative route's early steps run in bf16 where it is fast: on CUDA from
capability 8.0 (bf16 tensor cores; the same numerics as Muon's and as tested here on a CPU), and on a
CPU with AVX-512 BF16 or AMX (oneDNN's bf16 GEMMs). Older GPUs (V100, T4) have fp16 tensor cores
only, and the operands are scaled to at most 1, so fp16 serves there. Elsewhere bf16 is emulated
and fp32 is faster.
"""

from __future__ import annotations

import functools

import torch

FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, from torch.cuda.get_device_properties."""
    properties = torch.cuda.get_device_properties(device)
    return properties.major, properties.minor


def fast_fp64(device: torch.device | str) -> bool:
    """Whether ``device`` runs fp64 at half its fp32 rate or better (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return capability(device) in FAST_FP64_CAPABILITIES
    return device.type == "cpu"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def low_precision(device: torch.device | str) -> torch.dtype:
    """The dtype the iterative route's early steps run in on ``device`` (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if capability(device) >= (8, 0) else torch.float16
    if device.type == "cpu" and any(flag in cpu_flags() for flag in CPU_BF16_FLAGS):
        return torch.bfloat16
    return torch.float32
