"""AdamW: the fallback for everything that is not a hidden matrix (embeddings,
heads, norms, biases), a group algorithm of its own (``"adamw"``), and an
optimizer of its own (:class:`AdamW`) whose moments are fp32 for any weight dtype."""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as torch_adamw

from slimopt.optim.algorithm import Algorithm, read_lr
from slimopt.optim.optimizer import SlimOptimizer


class AdamWAlgorithm(Algorithm):
    name = "adamw"
    reads = ("lr", "betas", "eps", "weight_decay", "maximize")
    matrix = False

    def init_state(self, shape, group, *, dtype, device, seed):
        return {
            "exp_avg": torch.zeros(shape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device),
        }

    def step_params(self, params, grads, states, group, step: int, *, round_bf16=None) -> None:
        """Update ``params`` in place by torch's own AdamW, one call for all of them: the fused kernel where
        torch has one for the device, foreach otherwise. Low-precision weights keep fp32 moments, so their
        update runs on an fp32 copy and is rounded back once (by ``round_bf16``, an fp32 → bf16 function, if given)."""
        moment_dtype = states[0]["exp_avg"].dtype
        low_precision = params[0].dtype != moment_dtype
        work = [p.to(moment_dtype) for p in params] if low_precision else params
        grads = [g.to(moment_dtype) for g in grads] if grads[0].dtype != moment_dtype else grads
        device = params[0].device
        fused = device.type in torch.utils._foreach_utils._get_fused_kernels_supported_devices()
        # torch counts steps in float tensors (on the params' device when fused) and adds 1 before the update.
        steps = list(torch.full((len(params),), float(step), device=device if fused else "cpu").unbind())
        beta1, beta2 = group["betas"]
        torch_adamw(
            work, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
            foreach=not fused, fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=read_lr(group["lr"]),
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )
        if low_precision:
            rounded = [round_bf16(w) for w in work] if round_bf16 is not None else work
            torch._foreach_copy_(params, rounded)

    def reference_update(self, G, state, group, step):
        beta1, beta2 = group["betas"]
        t = step + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * G
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * G * G
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = exp_avg_sq / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"]), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class AdamW(SlimOptimizer):
    """torch.optim.AdamW's maths with slimopt's numerics: fp32 moments and an fp32 update for bf16/fp16
    weights (rounded once, or stochastically with ``stochastic_rounding=True``), and slimopt's checks.

    The baseline to compare slimopt's other optimizers with in pure low-precision training, where
    torch.optim.AdamW would keep its moments in the weights' dtype. Defaults are torch's.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW.
        **options: foreach, skip_nonfinite, max_stack_bytes, stochastic_rounding: see :class:`SlimOptimizer`.
    """

    algorithm = "adamw"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)
