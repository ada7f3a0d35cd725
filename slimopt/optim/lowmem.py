"""Low-memory state for the AdamW fallback group (embeddings, the LM head, norms, biases): two group algorithms
beside ``"adamw"``, for models whose vocabulary makes the fallback's fp32 moments the largest state of all
(Llama-3-8B's 128k-token embedding and head: 7.8 GiB of AdamW state).

``"adamw8bit"``: AdamW with both moments stored 8-bit, blockwise.
    Every state tensor is flattened and cut into blocks of ``BLOCK`` = 256 elements (the last one may be
    shorter); each block keeps one fp32 scale, its largest magnitude (absmax), and one uint8 code per element:
    the index of the nearest value of a 256-entry map, times the scale. This is the scheme of bitsandbytes'
    8-bit optimizers and torchao's ``AdamW8bit`` (block-wise dynamic quantization, Dettmers et al. 2022, "8-bit
    Optimizers via Block-wise Quantization"; torchao also uses blocks of 256):

    - the first moment uses a signed *dynamic* map: a sign, a decade (10⁻⁶ … 10⁰ of the block's absmax) and
      linear levels within it, the larger decades getting the more levels (2^k levels in decade k = 0 … 6,
      at the midpoints of equal steps of [0.1, 1]·10^(k−6), both signs), plus 0 and 1;
    - the second moment uses the unsigned dynamic map (2^(k+1) levels in decade k, plus 1) whose smallest
      level is not 0 but 0.55·10⁻⁷: a second moment never dequantizes to zero inside a block that has
      trained, so an element whose gradient is far below its block's never gets the update m/ε (the
      "zero-point problem" of quantized second moments, Li et al. 2023, "Memory Efficient Optimizers with
      4-bit States"); such an element gets a slightly larger v, i.e. a smaller, safe update.

    Each step dequantizes the moments, runs AdamW's update in fp32 (the update uses the new moments before
    they are rounded), and requantizes them. The step runs over slices of ``SLICE_BLOCKS`` blocks, so its
    temporaries stay a few MiB whatever the tensor (a bf16 weight with stochastic rounding adds one fp32 copy
    of it, rounded once). State: 2 bytes per element + 8 bytes per 256 elements + an int64 step, tensors
    only, so ``torch.save``, ``torch.load(weights_only=True)`` and resuming are exact. Every tensor of the
    group is quantized, norms and biases included (bitsandbytes keeps tensors under 4096 elements in 32 bits;
    here they are few bytes either way).

``"adamw_factored"``: AdamW's first moment in full (fp32), the second moment factored as Adafactor does
    (Shazeer & Stern 2018) for parameters with ≥ 2 dimensions: running means of g² over each row (shape
    ``shape[:-1]``) and over each column (``shape[:-2] + shape[-1:]``), and v ≈ row ⊗ col / mean(row) (the
    rank-1 reconstruction, per leading index for ≥ 3-D tensors). 1-D (and empty) parameters keep the full
    second moment. Both moments are bias-corrected as AdamW's, and ε is AdamW's, added to √v̂; none of
    Adafactor's other changes (relative step sizes, update clipping, β2 schedule) are made. State: 4 bytes
    per element (fp32) + 4·(rows + cols) per matrix + an int64 step.

Use them through :func:`slimopt.param_groups`' ``adamw=`` dict (``adamw={"algorithm": "adamw8bit"}``) or
``slimopt train --embedding-state 8bit|factored``. :func:`state_bytes` gives the exact state of either, or of
``"adamw"``, for a parameter of a given shape and dtype. Neither runs under FSDP2 (its sharding of elementwise
state follows the parameter, which the per-block scales and the factored means do not).
"""

from __future__ import annotations

import math

import torch

from slimopt.optim.algorithm import Algorithm
from slimopt.transforms.numerics import compute_dtype

__all__ = ["BLOCK", "EMBEDDING_STATES", "SIGNED_MAP", "SLICE_BLOCKS", "UNSIGNED_MAP", "ZERO_CODE", "AdamW8bitAlgorithm",
           "FactoredAdamWAlgorithm", "dequantize", "quantize", "state_bytes"]

BLOCK = 256  # elements per quantization block, each with one fp32 absmax scale
SLICE_BLOCKS = 4096  # blocks per slice of the 8-bit step: 1M elements, so a few MiB of temporaries

# ``slimopt train --embedding-state``: the algorithm of the fallback group for each choice.
EMBEDDING_STATES = {"adamw": "adamw", "8bit": "adamw8bit", "factored": "adamw_factored"}


# ------------------------------------------------------------- quantization

def _dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of a dynamic map, sorted: for the decades k = 0 … 6, 2^k (signed, each with both signs)
    or 2^(k+1) (unsigned) levels at the midpoints of equal steps of [0.1, 1]·10^(k−6); and 1. The signed map
    adds 0; the unsigned one adds 0.55·10⁻⁷ instead (no zero: see the module docstring)."""
    values = [1.0, 0.0 if signed else 0.55e-7]
    for k in range(7):
        levels = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, levels + 1, dtype=torch.float64)
        middles = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += middles + ([-x for x in middles] if signed else [])
    table = torch.tensor(sorted(values), dtype=torch.float32)
    assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
    return table


SIGNED_MAP = _dynamic_map(signed=True)  # the first moment's
UNSIGNED_MAP = _dynamic_map(signed=False)  # the second moment's
ZERO_CODE = int(torch.nonzero(SIGNED_MAP == 0))  # the first moment's code of 0 (with scale 0 any code is 0)


def _blocks(count: int) -> int:
    return -(-count // BLOCK)


def quantize(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a 1-D tensor: per block of ``BLOCK`` elements, its absmax (fp32) and, per element,
    the uint8 index of the table value nearest to x / absmax (an all-zero block keeps scale 0)."""
    count = x.numel()
    padded = torch.nn.functional.pad(x, (0, _blocks(count) * BLOCK - count)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1).float()
    normalized = padded / scales.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
    table = table.to(device=x.device, dtype=x.dtype)
    boundaries = (table[1:] + table[:-1]) / 2  # x between two boundaries is nearest to the value between them
    codes = torch.bucketize(normalized, boundaries).to(torch.uint8)
    return codes.view(-1)[:count], scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The 1-D tensor that ``codes`` (uint8, 1-D) and their blocks' ``scales`` stand for, in ``dtype``."""
    values = table.to(device=codes.device, dtype=dtype)[codes.long()]
    return values * scales.to(dtype).repeat_interleave(BLOCK)[:codes.numel()]


# ------------------------------------------------------------------ AdamW maths

def _adamw_direction(g, exp_avg, exp_avg_sq, group, step: int):
    """AdamW's moments after gradient ``g`` and its direction Δ = m̂ / (√v̂ + ε), ``step`` counting from 0."""
    beta1, beta2 = group["betas"]
    t = step + 1
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    m_hat = exp_avg / (1 - beta1**t)
    v_hat = exp_avg_sq / (1 - beta2**t)
    return m_hat / (v_hat.sqrt() + group["eps"]), exp_avg, exp_avg_sq


def _apply(weights: torch.Tensor, delta: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W ← W·(1 − lr·wd) − lr·Δ, in place, with the same operations as ``SlimOptimizer.apply_update``."""
    decay = 1.0 - lr * weight_decay
    if decay != 1.0:
        weights.mul_(decay)
    weights.add_(delta, alpha=-lr)


class AdamW8bitAlgorithm(Algorithm):
    """AdamW with both moments blockwise-quantized to 8 bits (see the module docstring)."""

    name = "adamw8bit"
    reads = ("lr", "betas", "eps", "weight_decay", "maximize")
    shards_like_param = False  # blocks of the flattened tensor, one scale each
    matrix = False

    def init_state(self, shape, group, *, dtype, device, seed):
        blocks = _blocks(math.prod(shape))
        return {
            "exp_avg_codes": torch.full(shape, ZERO_CODE, dtype=torch.uint8, device=device),
            "exp_avg_scales": torch.zeros(blocks, dtype=torch.float32, device=device),
            "exp_avg_sq_codes": torch.zeros(shape, dtype=torch.uint8, device=device),
            "exp_avg_sq_scales": torch.zeros(blocks, dtype=torch.float32, device=device),
        }

    def reference_update(self, G, state, group, step):
        """Dequantize both moments, one AdamW step in G's dtype, requantize: (Δ, the new codes and scales)."""
        g = G.reshape(-1)
        exp_avg = dequantize(state["exp_avg_codes"].reshape(-1), state["exp_avg_scales"], SIGNED_MAP, g.dtype)
        exp_avg_sq = dequantize(state["exp_avg_sq_codes"].reshape(-1), state["exp_avg_sq_scales"], UNSIGNED_MAP,
                                g.dtype)
        delta, exp_avg, exp_avg_sq = _adamw_direction(g, exp_avg, exp_avg_sq, group, step)
        m_codes, m_scales = quantize(exp_avg, SIGNED_MAP)
        v_codes, v_scales = quantize(exp_avg_sq, UNSIGNED_MAP)
        return delta.view(G.shape), {"exp_avg_codes": m_codes.view(G.shape), "exp_avg_scales": m_scales,
                                     "exp_avg_sq_codes": v_codes.view(G.shape), "exp_avg_sq_scales": v_scales}

    def step_params(self, params, grads, states, group, step: int, *, round_bf16=None) -> None:
        """The reference step of each param, over slices of ``SLICE_BLOCKS`` whole blocks, in place."""
        for param, grad, state in zip(params, grads, states):
            work_dtype = compute_dtype(param.dtype)
            low_precision = param.dtype != work_dtype
            # One fp32 copy of the weights where they are rounded once (stochastically) or not contiguous.
            whole = (low_precision and round_bf16 is not None) or not param.is_contiguous()
            weights = param.flatten().to(work_dtype) if whole else param.view(-1)
            g_flat = grad.reshape(-1)
            codes = {key: state[key].view(-1) for key in ("exp_avg_codes", "exp_avg_sq_codes")}
            count = param.numel()
            for start in range(0, count, SLICE_BLOCKS * BLOCK):
                end = min(start + SLICE_BLOCKS * BLOCK, count)
                blocks = slice(start // BLOCK, _blocks(end))
                g = g_flat[start:end].to(work_dtype)
                if group["maximize"]:
                    g = -g
                exp_avg = dequantize(codes["exp_avg_codes"][start:end], state["exp_avg_scales"][blocks], SIGNED_MAP,
                                     work_dtype)
                exp_avg_sq = dequantize(codes["exp_avg_sq_codes"][start:end], state["exp_avg_sq_scales"][blocks],
                                        UNSIGNED_MAP, work_dtype)
                delta, exp_avg, exp_avg_sq = _adamw_direction(g, exp_avg, exp_avg_sq, group, step)
                for (key, table), moment in zip((("exp_avg", SIGNED_MAP), ("exp_avg_sq", UNSIGNED_MAP)),
                                                (exp_avg, exp_avg_sq)):
                    new_codes, new_scales = quantize(moment, table)
                    codes[f"{key}_codes"][start:end].copy_(new_codes)
                    state[f"{key}_scales"][blocks].copy_(new_scales)
                piece = weights[start:end]
                updated = piece.to(work_dtype)  # the slice itself for fp32 weights
                _apply(updated, delta, group["lr"], group["weight_decay"])
                if updated is not piece:
                    piece.copy_(updated)
            if whole:
                result = weights.view(param.shape)
                param.copy_(round_bf16(result) if low_precision and round_bf16 is not None else result)


class FactoredAdamWAlgorithm(Algorithm):
    """AdamW with an fp32 first moment and an Adafactor-factored second moment (see the module docstring)."""

    name = "adamw_factored"
    reads = ("lr", "betas", "eps", "weight_decay", "maximize")
    shards_like_param = False  # row and column means of the whole matrix
    matrix = False

    @staticmethod
    def factored(shape) -> bool:
        """Whether a parameter of ``shape`` keeps row and column means (≥ 2-D, not empty) or a full v."""
        return len(shape) >= 2 and math.prod(shape) > 0

    def init_state(self, shape, group, *, dtype, device, seed):
        shape = tuple(shape)
        state = {"exp_avg": torch.zeros(shape, dtype=dtype, device=device)}
        if self.factored(shape):
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype, device=device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    def reference_update(self, G, state, group, step):
        """m and (row, col) of g², v̂ = row ⊗ col / mean(row), both bias-corrected: (Δ, new state)."""
        beta1, beta2 = group["betas"]
        t = step + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * G
        if "exp_avg_sq" in state:  # 1-D: AdamW's own second moment
            new = {"exp_avg_sq": beta2 * state["exp_avg_sq"] + (1 - beta2) * G * G}
            v = new["exp_avg_sq"]
        else:
            row = beta2 * state["exp_avg_sq_row"] + (1 - beta2) * (G * G).mean(dim=-1)
            col = beta2 * state["exp_avg_sq_col"] + (1 - beta2) * (G * G).mean(dim=-2)
            row_mean = row.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)  # 0 only if row is
            v = row.unsqueeze(-1) * col.unsqueeze(-2) / row_mean.unsqueeze(-1)
            new = {"exp_avg_sq_row": row, "exp_avg_sq_col": col}
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"]), {"exp_avg": exp_avg, **new}

    def step_params(self, params, grads, states, group, step: int, *, round_bf16=None) -> None:
        """The reference step of each param in place, with two temporaries of its size (three for bf16)."""
        beta1, beta2 = group["betas"]
        t = step + 1
        for param, grad, state in zip(params, grads, states):
            work_dtype = compute_dtype(param.dtype)
            low_precision = param.dtype != work_dtype
            g = grad.to(work_dtype)
            if group["maximize"]:
                g = -g
            state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            g2 = g * g
            del g
            if "exp_avg_sq" in state:
                v = state["exp_avg_sq"].mul_(beta2).add_(g2, alpha=1 - beta2).clone()
            else:
                row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                row.mul_(beta2).add_(g2.mean(dim=-1), alpha=1 - beta2)
                col.mul_(beta2).add_(g2.mean(dim=-2), alpha=1 - beta2)
                row_mean = row.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(work_dtype).tiny)
                v = (row.unsqueeze(-1) * col.unsqueeze(-2)).div_(row_mean.unsqueeze(-1))
            del g2
            denominator = v.div_(1 - beta2**t).sqrt_().add_(group["eps"])
            delta = state["exp_avg"].div(1 - beta1**t).div_(denominator)
            del v, denominator
            weights = param.to(work_dtype) if low_precision else param
            _apply(weights, delta, group["lr"], group["weight_decay"])
            if low_precision:
                param.copy_(round_bf16(weights) if round_bf16 is not None else weights)


# ------------------------------------------------------------------ state sizes

def state_bytes(shape, algorithm: str, dtype: torch.dtype = torch.float32) -> int:
    """Exact bytes of the fallback state a parameter of ``shape`` and ``dtype`` gets from ``algorithm``
    (``"adamw"``, ``"adamw8bit"`` or ``"adamw_factored"``), its int64 step included. Moments are in the
    compute dtype (fp32 for fp32/bf16/fp16 weights, fp64 for fp64); 8-bit codes are one byte per element,
    its scales fp32 whatever the dtype."""
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"invalid shape={shape!r}: expected a tuple of integers ≥ 0")
    count = math.prod(shape)
    size = compute_dtype(dtype).itemsize
    step = 8
    if algorithm == "adamw":
        return 2 * count * size + step
    if algorithm == "adamw8bit":
        return 2 * count + 2 * 4 * _blocks(count) + step
    if algorithm == "adamw_factored":
        if FactoredAdamWAlgorithm.factored(shape):
            lead = math.prod(shape[:-2])
            return count * size + lead * (shape[-2] + shape[-1]) * size + step
        return 2 * count * size + step
    raise ValueError(f"invalid algorithm={algorithm!r}: expected one of ['adamw', 'adamw8bit', 'adamw_factored']")
