"""AdamW: the fallback for everything that is not a hidden matrix (embeddings,
heads, norms, biases), and a group algorithm of its own (``"adamw"``)."""

from __future__ import annotations

import torch

from slimopt.optim.algorithm import Algorithm, register
from slimopt.transforms import adam_update_


@register
class AdamWAlgorithm(Algorithm):
    name = "adamw"
    matrix = False

    def init_state(self, shape, group, *, dtype, device, seed):
        return {
            "exp_avg": torch.zeros(shape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device),
        }

    def update(self, G, state, group, step):
        beta1, beta2 = group["betas"]
        direction = adam_update_(G, state["exp_avg"], state["exp_avg_sq"],
                                 beta1=beta1, beta2=beta2, eps=group["eps"], step=step + 1)
        return direction, state

    def reference_update(self, G, state, group, step):
        beta1, beta2 = group["betas"]
        t = step + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * G
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * G * G
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = exp_avg_sq / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"]), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
