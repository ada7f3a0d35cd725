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

from slimopt.train.loss import DEFAULT_CHUNK_SIZE
from slimopt.train.models import PRECISIONS, meta_model, vocab_size_for
from slimopt.train.optimizers import (
    OPTIMIZERS,
    Hyperparameters,
    check_embedding_state,
    check_optimizer,
    per_layer_refusal,
)

GiB = 2**30


@dataclass(frozen=True)
class Breakdown:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    step_transient: int = 0
    refused: str | None = None  # why `slimopt train` refuses these settings (e.g. rso with --per-layer)

    backward_transient: int = 0  # on top of the saved activations at backward's peak (see backward_bytes)
    gathered: int = 0  # FSDP2: the unsharded parameters and gradients held in forward and backward

    @property
    def total(self) -> int:
        """The peak: weights and state, plus the larger of two phases. Backward's start: the saved activations,
        what the loss's backward allocates on top of them, and the head's gradient (the other gradients do not
        exist yet, and each layer's come as its activations go). The optimizer step: every gradient and the step's
        temporaries (backward has freed the activations by then)."""
        backward = self.activations + self.backward_transient + self.gathered
        return self.parameters + self.optimizer_state + max(backward, self.gradients + self.step_transient)


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
    log-softmax of the logits. With grouped-query attention (fewer key/value
    heads), k and v are the key/value heads' width, not hidden-sized: HF's SDPA
    path passes them unrepeated (``enable_gqa``) when there is no attention mask,
    as in training. Under bf16 autocast (--dtype bf16), each
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
    layer, final = _per_token(model, dtype, rso_rank)
    loss = fp32 if chunked_loss else config.vocab_size * fp32
    layers = config.num_hidden_layers
    if activation_checkpointing:
        saved = tokens * (layers * config.hidden_size * precision.weights.itemsize + layer + final + loss)
    else:
        saved = tokens * (layers * layer + final + loss)
    if precision.autocast is not None:
        head = model.get_output_embeddings()
        linears = [] if rso_rank is not None else [m for m in model.modules() if isinstance(m, nn.Linear)
                                                   and m is not head]
        if activation_checkpointing:
            linears = linears[:len(linears) // layers]  # one layer's, recomputed
        if not chunked_loss:
            linears.append(head)
        saved += sum(m.weight.numel() for m in linears) * low
    return saved


def _per_token(model: nn.Module, dtype: str, rso_rank: int | None) -> tuple[int, int]:
    """Bytes saved per token by one decoder layer, and around the final norm (see :func:`activation_bytes`)."""
    precision = PRECISIONS[dtype]
    config = model.config
    low, fp32 = precision.compute.itemsize, 4
    h, i = config.hidden_size, config.intermediate_size
    # Grouped-query attention: k and v have the key/value heads' width (SDPA takes them unrepeated, enable_gqa).
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    autocast = precision.autocast is not None
    if autocast:
        layer = (7 * h + 2 * kv + 4 * i) * low + 4 * h * fp32
        final = h * low + 2 * h * fp32
    else:
        layer = (6 * h + 2 * kv + 4 * i) * low + 2 * h * fp32
        final = 2 * h * low + h * fp32
    if rso_rank is not None:
        layer += (4 * rso_rank - (5 if autocast else 2) * h - i) * low
    return layer, final


def backward_bytes(model: nn.Module, batch_size: int, seq_len: int, dtype: str = "fp32",
                   rso_rank: int | None = None, chunked_loss: bool = False,
                   activation_checkpointing: bool = False) -> int:
    """What backward holds on top of :func:`activation_bytes` at its peak, which is where it starts, in the loss:

    - HF's loss (``chunked_loss=False``): the gradients of the log-probabilities and of the logits, two fp32
      tokens × vocab tensors beside the saved log-softmax;
    - the chunked loss (:mod:`slimopt.train.loss`): the gradient of the hidden states, one chunk's fp32
      logits turned into their gradient in place (and its copy in the compute dtype under bf16), the head's
      fp32 gradient summed over the chunks beside one chunk's part of it, and the head's weight cast to the
      compute dtype, if it is not in it.

    With activation checkpointing the peak may come later, at the last layer's recompute: the checkpoints and
    that layer's saved tensors, with the head's gradient and the gradient of the hidden states.
    Measured against live tensors on CPU in ``benchmarks/memory_accuracy.py``."""
    precision = PRECISIONS[dtype]
    config = model.config
    tokens = batch_size * seq_len
    low, weights, fp32 = precision.compute.itemsize, precision.weights.itemsize, 4
    vocab, h = config.vocab_size, config.hidden_size
    head = vocab * h
    if chunked_loss:
        chunk = min(DEFAULT_CHUNK_SIZE, tokens)
        summed = head * fp32 if tokens > chunk else 0  # the head's fp32 gradient, from the chunks before
        if low == fp32:  # the chunk's gradient, and its part of the head's gradient (the first chunk's is the sum)
            at_chunk = chunk * vocab * fp32 + head * fp32 + summed
        else:  # the chunk's fp32 gradient beside its cast; then the cast, its part and that part in fp32
            at_chunk = max(chunk * vocab * (fp32 + low) + summed,
                           chunk * vocab * low + head * low + max(summed, head * fp32))
        loss = (tokens * h * weights + at_chunk
                + (head * low if low != weights else 0))  # the head's weight in the compute dtype
    else:
        loss = 2 * tokens * vocab * fp32
    if not activation_checkpointing:
        return loss
    layer, final = _per_token(model, dtype, rso_rank)
    loss_saved = fp32 if chunked_loss else vocab * fp32
    # activation_bytes counts the recomputed layer, the final norm's and the loss's tensors all at once; at the
    # loss's backward the layer is not recomputed yet, and at the layer's recompute the loss's are gone.
    at_loss = loss - tokens * layer
    at_layer = tokens * (h * weights - final - loss_saved) + head * weights
    return max(at_loss, at_layer, 0)


_STEP_BYTES: dict[tuple, int] = {}


def step_bytes(optimizer: str, net: nn.Module, hp: Hyperparameters) -> int:
    """``OPTIMIZERS[optimizer].step_bytes(net, hp)``, memoized by what it reads: the model's class and parameters
    (names, shapes, dtypes, whether trainable) and ``hp``. It builds the optimizer and runs its step on fake
    tensors, seconds at 8B (RSO's surgery draws every projection), and ``slimopt plan`` asks again for each
    micro-batch, precision trick and rank it tries."""
    key = (optimizer, hp, type(net).__name__,
           tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in net.named_parameters()))
    if key not in _STEP_BYTES:
        _STEP_BYTES[key] = OPTIMIZERS[optimizer].step_bytes(net, hp)
    return _STEP_BYTES[key]


def estimate(model: str, optimizer: str, *, rank: int | None = None, update_gap: int = 200, batch_size: int = 16,
             seq_len: int = 128, dtype: str = "fp32", vocab_size: int | None = None,
             per_layer: bool = False, chunked_loss: bool = False, activation_checkpointing: bool = False,
             embedding_state: str = "adamw", freeze_embeddings: bool = False) -> Breakdown:
    """``dtype``: a key of ``PRECISIONS``. Parameters, gradients and state are in the weights' dtype (fp32
    under autocast), the optimizer state as each optimizer keeps it.

    ``embedding_state``: the AdamW group's state, as ``slimopt train --embedding-state`` (adamw, 8bit,
    factored). ``freeze_embeddings``: as ``slimopt train --freeze-embeddings``, the input embeddings (and a head
    tied to them) get no gradient and no state."""
    check_optimizer(optimizer)
    check_embedding_state(embedding_state)
    if dtype not in PRECISIONS:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {sorted(PRECISIONS)}")
    net = meta_model(model, vocab_size_for(model, vocab_size), seq_len, PRECISIONS[dtype].weights)
    if freeze_embeddings:
        net.get_input_embeddings().weight.requires_grad_(False)
    rank = rank or max(1, net.config.hidden_size // 4)
    hp = Hyperparameters(lr=1.0, adamw_lr=1.0, weight_decay=0.0, rank=rank, update_gap=update_gap,
                         embedding_state=embedding_state)
    entry = OPTIMIZERS[optimizer]
    rso_rank = rank if optimizer == "rso" else None
    parameters, trainable = entry.parameter_bytes(net, hp)
    gradients = max(trainable) if per_layer else sum(trainable)
    return Breakdown(
        parameters=parameters,
        gradients=gradients,
        optimizer_state=entry.state_bytes(net, hp),
        activations=activation_bytes(net, batch_size, seq_len, dtype, rso_rank=rso_rank,
                                     chunked_loss=chunked_loss, activation_checkpointing=activation_checkpointing),
        step_transient=step_bytes(optimizer, net, hp),
        backward_transient=backward_bytes(net, batch_size, seq_len, dtype, rso_rank=rso_rank,
                                          chunked_loss=chunked_loss, activation_checkpointing=activation_checkpointing),
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
