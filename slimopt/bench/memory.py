"""``slimopt memory``: where the bytes of a training step go, before running it.

Parameters, gradients and optimizer state are counted exactly from the model's
shapes (the model is built on the meta device, so nothing is allocated) and the
optimizer's analytic state size (``OptimizerEntry.state_bytes``). The step's
transient memory (its fp32 stacks and temporaries, ``OptimizerEntry.step_bytes``)
comes from running the step's own code (each algorithm's ``update``, the AdamW
fallback, ``apply_update``) on fake tensors (:mod:`slimopt.optim.transient`), so it
follows the code as it changes; the tests check it against a measurement. It does
not add to the activations: backward has freed them by the time the optimizer
steps, so the peak is the larger of the two phases. Activations are an estimate:
the tensors HF's LLaMA saves for backward with SDPA attention, calibrated against
``torch.autograd.graph.saved_tensors_hooks`` for every
``--dtype`` (see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimopt.train.models import PRECISIONS, meta_model, vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, check_optimizer, per_layer_refusal

GiB = 2**30


@dataclass(frozen=True)
class Breakdown:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    step_transient: int = 0
    refused: str | None = None  # why `slimopt train` refuses these settings (e.g. rso with --per-layer)

    @property
    def total(self) -> int:
        """The peak: weights, gradients and state, plus the larger of the activations (forward and backward)
        and the optimizer step's temporaries (the step runs after backward has freed the activations)."""
        return self.parameters + self.gradients + self.optimizer_state + max(self.activations, self.step_transient)


def activation_bytes(model: nn.Module, batch_size: int, seq_len: int, dtype: str = "fp32",
                     rso_rank: int | None = None, chunked_loss: bool = False,
                     activation_checkpointing: bool = False) -> int:
    """Bytes saved for backward by one forward of a HF LLaMA (SDPA attention), as the hooks measure them.

    ``model`` (on the meta device is enough) gives the shapes; ``dtype`` is a key of ``PRECISIONS``.

    fp32 and bf16-pure, per layer and token: 8 hidden-sized tensors (the
    projections' inputs, q, k, v, the attention output, the norms' outputs) and
    4 intermediate-sized ones (gate, SiLU(gate), up, their product) in the
    weights' dtype, plus 2 hidden-sized fp32 ones (the RMSNorms compute in fp32);
    then 2 + 1 hidden-sized ones around the final norm; and the fp32
    log-softmax of the logits. Under bf16 autocast (--dtype bf16), each
    projection casts its input to bf16 itself, so q, k and v save three bf16
    copies of one input and gate and up two: 9 bf16 hidden-sized tensors per
    layer, and 4 fp32 ones (each norm's input and normalized output); around the
    final norm 1 bf16 and 2 fp32. Autocast also saves a bf16 copy of every
    linear weight it casts. Small per-token scalars (norm statistics, attention
    log-sum-exp) are left out: under 1% at the presets' sizes.

    RSO saves four rank-wide x·P per layer (q/k/v share one, gate/up share one,
    o and down one each) and not the inputs of q/k/v, gate/up and down: two
    hidden-sized tensors and one intermediate-sized one fewer, five and one under
    autocast. The attention output that o_proj reads stays saved for the
    attention kernel's own backward. Its layers save W_k itself, in fp32, so
    under autocast only the head's weight is copied.

    ``chunked_loss`` (``slimopt train --chunked-loss``): one fp32 log-sum-exp per token instead of the
    log-softmax, and no bf16 copy of the head (the loss casts it chunk by chunk, saving nothing).
    ``activation_checkpointing``: forward keeps each layer's input alone (in the weights' dtype, as the
    residual stream runs), and backward recomputes one layer at a time, whose saved tensors (and autocast's
    weight copies) come on top: the peak is at the last layer's recompute.
    """
    precision = PRECISIONS[dtype]
    config = model.config
    tokens = batch_size * seq_len
    low, fp32 = precision.compute.itemsize, 4
    h, i = config.hidden_size, config.intermediate_size
    autocast = precision.autocast is not None
    if autocast:
        layer = (9 * h + 4 * i) * low + 4 * h * fp32
        final = h * low + 2 * h * fp32
    else:
        layer = (8 * h + 4 * i) * low + 2 * h * fp32
        final = 2 * h * low + h * fp32
    if rso_rank is not None:
        layer += (4 * rso_rank - (5 if autocast else 2) * h - i) * low
    loss = fp32 if chunked_loss else config.vocab_size * fp32
    layers = config.num_hidden_layers
    if activation_checkpointing:
        saved = tokens * (layers * h * precision.weights.itemsize + layer + final + loss)
    else:
        saved = tokens * (layers * layer + final + loss)
    if autocast:
        head = model.get_output_embeddings()
        linears = [] if rso_rank is not None else [m for m in model.modules() if isinstance(m, nn.Linear)
                                                   and m is not head]
        if activation_checkpointing:
            linears = linears[:len(linears) // layers]  # one layer's, recomputed
        if not chunked_loss:
            linears.append(head)
        saved += sum(m.weight.numel() for m in linears) * low
    return saved


def estimate(model: str, optimizer: str, *, rank: int | None = None, update_gap: int = 200, batch_size: int = 16,
             seq_len: int = 128, dtype: str = "fp32", vocab_size: int | None = None,
             per_layer: bool = False, chunked_loss: bool = False, activation_checkpointing: bool = False) -> Breakdown:
    """``dtype``: a key of ``PRECISIONS``. Parameters, gradients and state are in the weights' dtype (fp32
    under autocast), the optimizer state as each optimizer keeps it."""
    check_optimizer(optimizer)
    if dtype not in PRECISIONS:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {sorted(PRECISIONS)}")
    net = meta_model(model, vocab_size_for(model, vocab_size), seq_len, PRECISIONS[dtype].weights)
    rank = rank or max(1, net.config.hidden_size // 4)
    hp = Hyperparameters(lr=1.0, adamw_lr=1.0, weight_decay=0.0, rank=rank, update_gap=update_gap)
    entry = OPTIMIZERS[optimizer]
    parameters, trainable = entry.parameter_bytes(net, hp)
    gradients = max(trainable) if per_layer else sum(trainable)
    return Breakdown(
        parameters=parameters,
        gradients=gradients,
        optimizer_state=entry.state_bytes(net, hp),
        activations=activation_bytes(net, batch_size, seq_len, dtype, rso_rank=rank if optimizer == "rso" else None,
                                     chunked_loss=chunked_loss, activation_checkpointing=activation_checkpointing),
        step_transient=entry.step_bytes(net, hp),
        refused=per_layer_refusal(optimizer) if per_layer else None,
    )


def format_table(rows: dict[str, Breakdown]) -> str:
    """A Markdown table in GiB, one row per optimizer; a row ``slimopt train`` would refuse shows no numbers,
    and the reason follows the table."""
    lines = ["| optimizer | parameters | gradients | optimizer state | activations (est.) | step transient (est.) "
             "| peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, b in rows.items():
        if b.refused:
            lines.append(f"| {name} | " + " | ".join(["refused by train"] + ["–"] * 5) + " |")
            notes.append(f"{name}: refused by train: {b.refused}")
            continue
        cells = [b.parameters, b.gradients, b.optimizer_state, b.activations, b.step_transient, b.total]
        lines.append(f"| {name} | " + " | ".join(f"{c / GiB:.3f}" for c in cells) + " |")
    return "\n".join([*lines, *(["", *notes] if notes else [])])
