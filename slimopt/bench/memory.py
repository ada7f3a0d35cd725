"""``slimopt memory``: where the bytes of a training step go, before running it.

Parameters, gradients and optimizer state are counted exactly from the model's
shapes (the model is built on the meta device, so nothing is allocated) and the
optimizer's analytic state size (``OptimizerEntry.state_bytes``). Activations are
an estimate: the tensors HF's LLaMA saves for backward with SDPA attention,
calibrated against ``torch.autograd.graph.saved_tensors_hooks`` (see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimopt.train.loop import DTYPES
from slimopt.train.models import meta_model, vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, check_optimizer

GiB = 2**30


@dataclass(frozen=True)
class Breakdown:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype, rso_rank: int | None = None) -> int:
    """Bytes saved for backward by one forward of a HF LLaMA (SDPA attention), as the hooks measure them.

    Per layer and token: 10 hidden-sized tensors (norm inputs and outputs, the
    projections' inputs, q, k, v and the attention output) and 4
    intermediate-sized ones (gate, SiLU(gate), up, their product); then 3
    hidden-sized ones around the final norm, and the fp32 log-softmax of the
    logits. Small per-token scalars (norm statistics, attention log-sum-exp) are
    left out: under 1% at the presets' sizes.

    RSO saves four rank-wide x·P per layer (q/k/v share one, gate/up share one,
    o and down one each) and, as measured, two hidden-sized tensors and one
    intermediate-sized one fewer: the inputs of q/k/v, gate/up and down. The
    attention output that o_proj reads stays saved for the attention kernel's
    own backward.
    """
    tokens = batch_size * seq_len
    size = torch.finfo(dtype).bits // 8
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 10 * h + 4 * i
    if rso_rank is not None:
        per_layer += 4 * rso_rank - 2 * h - i
    layers = config.num_hidden_layers * tokens * per_layer * size
    return layers + 3 * tokens * h * size + tokens * config.vocab_size * 4


def estimate(model: str, optimizer: str, *, rank: int | None = None, update_gap: int = 200, batch_size: int = 16,
             seq_len: int = 128, dtype: str = "fp32", vocab_size: int | None = None,
             per_layer: bool = False) -> Breakdown:
    check_optimizer(optimizer)
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    net = meta_model(model, vocab_size_for(model, vocab_size), seq_len, torch_dtype)
    rank = rank or max(1, net.config.hidden_size // 4)
    hp = Hyperparameters(lr=1.0, adamw_lr=1.0, weight_decay=0.0, rank=rank, update_gap=update_gap)
    entry = OPTIMIZERS[optimizer]
    parameters, trainable = entry.parameter_bytes(net, hp)
    gradients = max(trainable) if per_layer else sum(trainable)
    return Breakdown(
        parameters=parameters,
        gradients=gradients,
        optimizer_state=entry.state_bytes(net, hp),
        activations=activation_bytes(net.config, batch_size, seq_len, torch_dtype,
                                     rso_rank=rank if optimizer == "rso" else None),
    )


def format_table(rows: dict[str, Breakdown]) -> str:
    """A Markdown table in GiB, one row per optimizer."""
    lines = ["| optimizer | parameters | gradients | optimizer state | activations (est.) | total |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, b in rows.items():
        cells = [b.parameters, b.gradients, b.optimizer_state, b.activations, b.total]
        lines.append(f"| {name} | " + " | ".join(f"{c / GiB:.3f}" for c in cells) + " |")
    return "\n".join(lines)
