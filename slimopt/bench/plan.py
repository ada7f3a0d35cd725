"""``slimopt plan``: the training configurations of a model that fit a GPU's memory, best first.

Every number comes from :func:`slimopt.bench.memory.estimate` (the model on the meta device: nothing is
allocated), called once per setting of the knobs that change parameters, gradients and optimizer state
(optimizer, rank, precision, ``--per-layer``, embeddings); the knobs that change only the activations
(micro-batch, ``--activation-checkpointing``, ``--chunked-loss``) reuse that breakdown with the activations
and backward's transient of :func:`slimopt.bench.memory.activation_bytes` and
:func:`~slimopt.bench.memory.backward_bytes`, the very functions ``estimate`` calls, on a meta model cached
per (model, precision). So every candidate's ``breakdown`` equals ``estimate(...)`` for its knobs.

**What is searched.** Every optimizer of the registry (or those asked for); for the low-rank ones (GaLore,
SUMO, RSO) the ranks asked for, by default hidden/4 (what ``slimopt train`` uses without ``--rank``);
``--dtype`` bf16 (autocast: fp32 weights, gradients and state) and bf16-pure (bf16 weights; fp32 is left
out: it is slower on GPUs and never smaller); micro-batches of powers of two (and the whole per-rank batch)
that divide the global batch, the rest made up by gradient accumulation; ``--per-layer`` where the optimizer
supports it (it runs in one process only, and cannot accumulate: its micro-batch is its global batch, see
below); activation checkpointing on and off; the chunked loss on (train's default) and off; for fine-tuning,
frozen embeddings; and the embeddings' optimizer state in :data:`EMBEDDING_STATES`.

**The global batch.** Given (``global_batch``, ``--global-batch``), every configuration has exactly it: a
``--per-layer`` one takes it as one micro-batch, or does not fit. Not given, the task's :data:`GLOBAL_BATCH`
is a target, an upper bound: accumulation reaches it whatever the micro-batch, but a ``--per-layer``
configuration's global batch is its micro-batch, any power of two up to the target (and the target itself);
one below the target says so in its costs ("global batch 4 of 64: --per-layer cannot accumulate").

**Best first.** Among the configurations that fit: (0) the larger global batch: those reaching the target
(all but per-layer ones below it) first, then the per-layer ones, the largest global batch first, as fewer
sequences per step change the training itself, not only its speed (with ``--global-batch`` all are equal);
then (1) the highest estimated throughput, in 5 % steps (see :func:`throughput`); within a step, (2) the
better optimizer for the task (:data:`QUALITY`: the AdamW baseline first, when it fits at the same speed),
(3) bf16 autocast before bf16-pure, (4) the embeddings' full AdamW state before 8-bit before factored before
frozen, (5) the higher rank, (6) without ``--per-layer`` (it rules out clipping), (7) the more headroom. The
table shows each optimizer-rank's best configuration, with its global batch.

**FSDP2** (``world_size`` N, ``parallel="fsdp"``, per rank, as ``slimopt train --parallel fsdp`` shards):
parameters, gradients and the state of AdamW and RSO (elementwise, sharded like the parameters) divide by N;
GaLore's, SUMO's and SWAN's matrices are each updated by one owner rank, which holds that matrix's whole
state: owners are balanced by cost (LPT), and the bound used is total/N plus the largest single matrix's
state, a conservative one. RSO's projections P are replicated on every rank (counted with its B, also a
conservative bound). Activations are per rank at the micro-batch: FSDP does not shrink them. On top, during
forward and backward, FSDP2 holds unsharded: the root's parameters (embeddings, head, final norm: FSDP2 does
not reshard the root after forward) and their gradients until its reduce-scatter at the end of backward, and
two decoder layers' parameters and gradients (the one computing, the one prefetched or reduce-scattering).
The step's transient memory is taken as one process's.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from slimopt.bench.memory import Breakdown, GiB, activation_bytes, backward_bytes, estimate
from slimopt.optim.optimizer import RoutingWarning
from slimopt.train.models import PRECISIONS, SHAPES, meta_model, vocab_size_for
from slimopt.train.optimizers import OPTIMIZERS, Hyperparameters, check_optimizer

TASKS = ("pretrain", "finetune")
# Sequences per optimizer step when --global-batch is not given: GaLore's C4 pre-training runs use 512; 64 is a
# common effective batch for fine-tuning (e.g. 8 GPUs × 8, or accumulation).
GLOBAL_BATCH = {"pretrain": 512, "finetune": 64}
# Best first, for equal throughput: the AdamW baseline, then by published results and this repository's bench
# (docs/benchmark.md). Muon last for fine-tuning: a model pre-trained with AdamW fine-tunes worse with it.
QUALITY = {"pretrain": ("adamw", "muon", "swan", "sumo", "galore", "apollo", "apollo_mini", "rso"),
           "finetune": ("adamw", "sumo", "galore", "apollo", "apollo_mini", "swan", "rso", "muon")}
DTYPES = ("bf16", "bf16-pure")
LOW_RANK = ("galore", "sumo", "rso", "apollo")  # take --rank (APOLLO-Mini is rank 1)
# The optimizer state of the AdamW group's embeddings and head ("adamw": fp32 moments; "8bit", "factored": the
# low-memory states of estimate(embedding_state=)), best first, and whether fine-tuning may freeze the
# embeddings (estimate(freeze_embeddings=)). Each value other than the first is passed to estimate.
EMBEDDING_STATES = ("adamw", "8bit", "factored")  # not under FSDP2: train refuses the others there
FREEZE_EMBEDDINGS = (False, True)
PARALLEL = ("none", "fsdp")
MIN_UTILIZATION_TOKENS = 512  # see throughput()


@dataclass(frozen=True)
class Candidate:
    """One configuration: its knobs, the memory estimate, and what its tricks cost."""
    model: str
    seq_len: int
    optimizer: str
    rank: int | None  # None: the optimizer takes no rank
    dtype: str
    micro_batch: int  # sequences per micro-batch on each rank
    grad_accum: int
    per_layer: bool
    activation_checkpointing: bool
    chunked_loss: bool
    embedding_state: str
    freeze_embeddings: bool
    breakdown: Breakdown  # estimate(...) for these knobs: the whole model in one process
    per_rank: Breakdown  # what one rank holds: the breakdown itself in one process, else FSDP2's shards
    gathered: int  # FSDP2's unsharded root and layers during forward and backward (0 in one process)
    budget: int
    world_size: int = 1
    parallel: str = "none"
    throughput: float = 1.0  # estimated, relative to an ideal step without tricks (see throughput())
    costs: tuple[str, ...] = ()
    # The default global batch, a target that --per-layer (no accumulation) may fall short of; 0: the global batch
    # was given (--global-batch), and every candidate has exactly it.
    target_batch: int = 0

    @property
    def peak(self) -> int:
        return self.per_rank.total  # per_rank holds FSDP2's gathered bytes too

    @property
    def headroom(self) -> int:
        return self.budget - self.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def flags(self) -> str:
        """The ``slimopt train`` flags (``--batch-size`` is per micro-batch over all ranks, as train takes it)."""
        model = self.model if self.model not in SHAPES else "DIR"  # a shape is for planning only
        parts = [f"--model {model} --seq-len {self.seq_len} --optimizer {self.optimizer}"]
        if self.rank is not None:
            parts.append(f"--rank {self.rank}")
        parts += [f"--dtype {self.dtype}", f"--batch-size {self.micro_batch * self.world_size}"]
        if self.grad_accum > 1:
            parts.append(f"--grad-accum {self.grad_accum}")
        parts += [flag for flag, on in (("--per-layer", self.per_layer),
                                        ("--activation-checkpointing", self.activation_checkpointing),
                                        ("--no-chunked-loss", not self.chunked_loss),
                                        ("--freeze-embeddings", self.freeze_embeddings)) if on]
        if self.embedding_state != "adamw":
            parts.append(f"--embedding-state {self.embedding_state}")
        if self.parallel != "none":
            parts.append(f"--parallel {self.parallel}")
        return " ".join(parts)


# --------------------------------------------------------------------- units

UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
         "tb": 10**12}


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``24GiB``, ``24576MiB`` or ``80GB``: binary units (KiB, MiB, GiB, TiB) and SI
    ones (kB, MB, GB, TB: powers of 1000), any case. A bare number, or ``24G``, is refused as ambiguous."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    where = f"invalid gpu_memory={text!r}"
    if match is None:
        raise ValueError(f"{where}: expected a positive size with a unit, e.g. 24GiB, 24576MiB or 80GB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit or unit in ("k", "m", "g", "t"):
        raise ValueError(f"{where}: give a unit, GiB (2^30 bytes) or GB (10^9 bytes), e.g. 24GiB")
    if unit not in UNITS:
        raise ValueError(f"{where}: unknown unit {match.group(2)!r}; expected one of KiB, MiB, GiB, TiB "
                         "(powers of 1024) or kB, MB, GB, TB (powers of 1000)")
    size = int(number * UNITS[unit])
    if not math.isfinite(number) or size < 1:
        raise ValueError(f"{where}: expected a positive size")
    return size


def gib(size: int) -> str:
    return f"{size / GiB:.2f}"


# --------------------------------------------------------------- the search

@functools.lru_cache(maxsize=16)
def _net(model: str, vocab_size: int, seq_len: int, dtype: str) -> nn.Module:
    """The meta model estimate builds for this precision (shapes only; never modified)."""
    return meta_model(model, vocab_size, seq_len, PRECISIONS[dtype].weights)


@functools.lru_cache(maxsize=4096)
def _static(model: str, optimizer: str, rank: int | None, dtype: str, per_layer: bool, vocab_size: int,
            seq_len: int, embedding_state: str, freeze_embeddings: bool) -> Breakdown:
    """estimate() at one micro-batch sequence without activation tricks: parameters, gradients, state and
    the step's transient, which the micro-batch, checkpointing and the chunked loss leave as they are."""
    extra = {}
    if embedding_state != EMBEDDING_STATES[0]:
        extra["embedding_state"] = embedding_state
    if freeze_embeddings:
        extra["freeze_embeddings"] = True
    with warnings.catch_warnings():  # e.g. a rank ≥ GQA's k/v side: the estimate counts what train would hold
        warnings.simplefilter("ignore", RoutingWarning)
        return estimate(model, optimizer, rank=rank, batch_size=1, seq_len=seq_len, dtype=dtype,
                        vocab_size=vocab_size, per_layer=per_layer, **extra)


@functools.lru_cache(maxsize=256)
def _matrix_state(optimizer: str, shape: tuple[int, int], dtype: torch.dtype, rank: int) -> int:
    """The optimizer's own state_bytes for one hidden matrix of this shape (a one-layer meta module)."""
    with torch.device("meta"):
        module = nn.Module()
        module.proj = nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
    hp = Hyperparameters(lr=1.0, adamw_lr=1.0, weight_decay=0.0, rank=rank, update_gap=200)
    return OPTIMIZERS[optimizer].state_bytes(module, hp)


@functools.lru_cache(maxsize=16)
def _matrix_shapes(net: nn.Module) -> list[tuple[int, int]]:
    """The shapes of the hidden matrices (what param_groups routes to the optimizer under test)."""
    from slimopt import param_groups

    return tuple(tuple(p.shape) for group in param_groups(net) if group.get("algorithm") != "adamw"
                 for _, p in group["params"] if p.ndim == 2)


@functools.lru_cache(maxsize=16)
def _blocks(net: nn.Module) -> tuple[list[nn.Module], int]:
    """(the decoder layers FSDP2 shards one by one, as slimopt.train.parallel.wrap does; bytes of all params)."""
    names = set(getattr(net, "_no_split_modules", None) or ())
    blocks = [m for m in net.modules() if type(m).__name__ in names]
    return blocks, sum(p.nbytes for p in net.parameters())


@functools.lru_cache(maxsize=32)
def _gathered(net: nn.Module, freeze_embeddings: bool) -> int:
    """FSDP2's unsharded bytes in forward and backward: the root's params and gradients, two layers' of each."""
    blocks, _ = _blocks(net)
    frozen = net.get_input_embeddings().weight if freeze_embeddings else None
    inside = {id(p) for block in blocks for p in block.parameters()}
    root = [p for p in net.parameters() if id(p) not in inside]
    root_bytes = sum(p.nbytes for p in root) + sum(p.nbytes for p in root if p is not frozen)
    layer = max((sum(p.nbytes for p in block.parameters()) for block in blocks), default=0)
    return root_bytes + 2 * 2 * layer


def _shard(size: int, world: int) -> int:
    return -(-size // world)


def _per_rank(b: Breakdown, candidate_optimizer: str, net: nn.Module, rank: int | None, world: int,
              dense_parameters: int) -> Breakdown:
    """What one FSDP2 rank holds (see the module's docstring)."""
    parameters = _shard(b.parameters, world)
    if candidate_optimizer == "rso":  # B and P on top of the dense weights: counted whole on every rank
        parameters = _shard(dense_parameters, world) + (b.parameters - dense_parameters)
    if candidate_optimizer in ("adamw", "rso"):
        state = _shard(b.optimizer_state, world)
    else:
        weights = next(net.parameters()).dtype
        matrices = [_matrix_state(candidate_optimizer, shape, weights, rank or 1) for shape in _matrix_shapes(net)]
        fallback = b.optimizer_state - sum(matrices)
        state = _shard(fallback, world) + _shard(sum(matrices), world) + max(matrices, default=0)
    return replace(b, parameters=parameters, gradients=_shard(b.gradients, world), optimizer_state=state)


@functools.lru_cache(maxsize=16)
def _sizes(net: nn.Module) -> tuple[int, int, int]:
    """(parameters, those of the decoder layers, the head's): what throughput() reads, counted once per model."""
    blocks, _ = _blocks(net)
    return (sum(p.numel() for p in net.parameters()), sum(p.numel() for block in blocks for p in block.parameters()),
            net.get_output_embeddings().weight.numel())


@functools.lru_cache(maxsize=16)
def _dense(net: nn.Module) -> int:
    return sum(p.nbytes for p in net.parameters())


@functools.lru_cache(maxsize=8192)
def _activations(net: nn.Module, micro_batch: int, seq_len: int, dtype: str, rso_rank: int | None, chunked_loss: bool,
                 activation_checkpointing: bool) -> tuple[int, int]:
    """(activation_bytes, backward_bytes) at these knobs: what estimate() adds to the static breakdown."""
    knobs = dict(rso_rank=rso_rank, chunked_loss=chunked_loss, activation_checkpointing=activation_checkpointing)
    return (activation_bytes(net, micro_batch, seq_len, dtype, **knobs),
            backward_bytes(net, micro_batch, seq_len, dtype, **knobs))


def throughput(net: nn.Module, micro_batch: int, seq_len: int, activation_checkpointing: bool,
               chunked_loss: bool) -> tuple[float, tuple[str, ...]]:
    """(estimated tokens/s relative to an ideal step without tricks, a note per cost): a coarse model for
    ranking, not a measurement. A step costs ≈ 6 N FLOPs per token (N parameters); activation checkpointing
    adds a forward of the decoder layers (2 N_layers: ≈ +33 %), the chunked loss one more head matmul in
    backward (2 h V); a micro-batch of t tokens runs at t / (t + 512) of full utilization (small matmuls,
    per-micro-batch overheads). Optimizer steps, communication and attention's own FLOPs are left out."""
    total, layers, head = _sizes(net)
    work, notes = 1.0, []
    if activation_checkpointing:
        extra = 2 * layers / (6 * total)
        work += extra
        notes.append(f"checkpointing +{extra:.0%} compute")
    if chunked_loss:
        extra = 2 * head / (6 * total)
        work += extra
        notes.append(f"chunked loss +{extra:.0%}")
    tokens = micro_batch * seq_len
    utilization = tokens / (tokens + MIN_UTILIZATION_TOKENS)
    if utilization < 0.97:
        notes.append(f"{tokens}-token micro-batch ~{utilization:.0%} utilized")
    return utilization / work, tuple(notes)


def _micro_batches(per_rank_batch: int) -> list[int]:
    sizes = {1 << k for k in range(per_rank_batch.bit_length()) if per_rank_batch % (1 << k) == 0}
    return sorted(sizes | {per_rank_batch})


def check_plan_input(gpu_memory: int, seq_len: int, task: str, world_size: int, parallel: str,
                     global_batch: int | None) -> int:
    """Raise ValueError, naming the parameter, for bad input; returns the global batch (its default if None)."""
    if gpu_memory < 1:
        raise ValueError(f"invalid gpu_memory={gpu_memory!r}: expected a positive number of bytes")
    if task not in TASKS:
        raise ValueError(f"invalid task={task!r}: expected one of {list(TASKS)}")
    if parallel not in PARALLEL:
        raise ValueError(f"invalid parallel={parallel!r}: expected one of {list(PARALLEL)} (DDP replicates the "
                         "model: it fits what one GPU fits)")
    for name, value in (("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"invalid {name}={value!r}: expected an integer ≥ 1")
    if world_size > 1 and parallel == "none":
        raise ValueError(f"invalid world_size={world_size}: several ranks need parallel='fsdp' (--parallel fsdp)")
    batch = GLOBAL_BATCH[task] if global_batch is None else global_batch
    if batch < 1 or batch % world_size:
        raise ValueError(f"invalid global_batch={batch!r}: expected a positive multiple of the world size "
                         f"({world_size}): each rank takes an equal share")
    return batch


def plan(model: str, gpu_memory_bytes: int, seq_len: int, *, task: str = "pretrain", world_size: int = 1,
         parallel: str = "none", global_batch: int | None = None, optimizers: tuple[str, ...] | None = None,
         ranks: tuple[int, ...] | None = None, dtypes: tuple[str, ...] = DTYPES,
         vocab_size: int | None = None, smaller: bool = False) -> list[Candidate]:
    """Every configuration searched that ``slimopt train`` accepts, the ones that fit ``gpu_memory_bytes`` first,
    best first (see the module's docstring), then the rest by peak. ``global_batch``: sequences per optimizer
    step over all ranks, required of every configuration; None: :data:`GLOBAL_BATCH` of the task as a target,
    which ``--per-layer`` configurations may fall short of (see the module's docstring). ``ranks``: for GaLore,
    SUMO and RSO (default hidden/4). Raises ValueError for bad input, and when nothing fits, giving the smallest
    budget that would and, for a ``global_batch`` given, the largest global batch a ``--per-layer``
    configuration would fit at. ``smaller``: instead, that per-layer configuration alone (a list of one, or
    empty), searching global batches up to ``global_batch``."""
    batch = check_plan_input(gpu_memory_bytes, seq_len, task, world_size, parallel, global_batch)
    target = 0 if global_batch is not None else batch  # the default: an upper bound for --per-layer
    names = tuple(OPTIMIZERS) if optimizers is None else tuple(optimizers)
    for name in names:
        check_optimizer(name)
    for dtype in dtypes:
        if dtype not in PRECISIONS:
            raise ValueError(f"invalid dtype={dtype!r}: expected one of {sorted(PRECISIONS)}")
    vocab = vocab_size_for(model, vocab_size)  # checks the model: an unknown name lists the presets
    hidden = _net(model, vocab, seq_len, dtypes[0]).config.hidden_size
    rank_choices = tuple(ranks) if ranks else (max(1, hidden // 4),)
    if any(r < 1 for r in rank_choices):
        raise ValueError(f"invalid ranks={ranks!r}: expected integers ≥ 1")
    fsdp = parallel == "fsdp"
    freezes = FREEZE_EMBEDDINGS if task == "finetune" else (False,)
    per_rank_batch = batch // world_size
    quality = {name: i for i, name in enumerate(QUALITY[task])}
    found = []
    for name in names:
        if fsdp and name == "muon":
            continue  # torch's Muon takes no sharded (DTensor) parameters: train refuses it
        for rank in (rank_choices if name in LOW_RANK else (None,)):
            for dtype in dtypes:
                net = _net(model, vocab, seq_len, dtype)
                dense = _dense(net)
                for per_layer in (False, True) if OPTIMIZERS[name].per_layer and not fsdp else (False,):
                    if smaller and not per_layer:
                        continue
                    # --per-layer cannot accumulate: its micro-batch is its global batch, the one given, or any
                    # up to the default's target (and any up to the one given, for the hint of smaller=True).
                    micros = (_micro_batches(batch) if smaller or target else [batch]) \
                        if per_layer else _micro_batches(per_rank_batch)
                    for embedding_state in EMBEDDING_STATES[:1] if fsdp else EMBEDDING_STATES:
                        for freeze in freezes:
                            static = _static(model, name, rank, dtype, per_layer, vocab, seq_len, embedding_state,
                                             freeze)
                            gathered = _gathered(net, freeze) if fsdp else 0
                            found += [_candidate(model, net, static, name, rank, dtype, micro, batch, per_layer, ac,
                                                 chunked, embedding_state, freeze, gpu_memory_bytes, world_size,
                                                 parallel, gathered, dense, seq_len, target)
                                      for micro in micros for ac in (False, True) for chunked in (True, False)]

    def best(c: Candidate):
        precision = DTYPES.index(c.dtype) if c.dtype in DTYPES else len(DTYPES)
        # The global batch first: every candidate reaches the one given; the default's target, all but the
        # per-layer ones below it, whose larger global batch comes first.
        return (c.global_batch, round(c.throughput * 20), -quality.get(c.optimizer, len(quality)), -precision,
                -_embedding_order(c), c.rank or 0, not c.per_layer, c.headroom)

    if smaller:  # the largest global batch a per-layer configuration fits at, its best one there
        fits = [c for c in found if c.fits and c.per_layer]
        top = max((c.global_batch for c in fits), default=0)
        return sorted((c for c in fits if c.global_batch == top), key=best, reverse=True)[:1]
    fitting = sorted((c for c in found if c.fits), key=best, reverse=True)
    if not fitting:
        # The default's target searched per-layer global batches below it already: no smaller one fits.
        hint = plan(model, gpu_memory_bytes, seq_len, task=task, global_batch=batch, optimizers=names,
                    ranks=rank_choices, dtypes=dtypes, vocab_size=vocab_size, smaller=True) \
            if not fsdp and not target else []
        smallest = min(found, key=lambda c: c.peak)
        raise ValueError(f"invalid gpu_memory={gib(gpu_memory_bytes)} GiB: no configuration of {model} fits "
                         f"(seq_len {seq_len}, global batch {f'up to {batch}' if target else batch}"
                         f"{f', {world_size} ranks' if fsdp else ''}); "
                         f"the smallest peak of the {len(found)} searched is {gib(smallest.peak)} GiB "
                         f"({smallest.flags()}): it needs at least "
                         f"--gpu-memory {math.ceil(smallest.peak / GiB)}GiB"
                         + (f"; or --global-batch {hint[0].global_batch}: {hint[0].flags()} fits, with "
                            f"{gib(hint[0].headroom)} GiB to spare (--per-layer cannot accumulate micro-batches)"
                            if hint else ""))
    return fitting + sorted((c for c in found if not c.fits), key=lambda c: c.peak)


def _embedding_order(c: Candidate) -> int:
    return len(EMBEDDING_STATES) if c.freeze_embeddings else EMBEDDING_STATES.index(c.embedding_state)


def _candidate(model, net, static, name, rank, dtype, micro, batch, per_layer, ac, chunked, embedding_state, freeze,
               budget, world, parallel, gathered, dense, seq_len, target) -> Candidate:
    activations, backward = _activations(net, micro, seq_len, dtype, rank if name == "rso" else None, chunked, ac)
    breakdown = replace(static, activations=activations, backward_transient=backward)
    per_rank = replace(_per_rank(breakdown, name, net, rank, world, dense), gathered=gathered) \
        if parallel == "fsdp" else breakdown
    speed, notes = throughput(net, micro, seq_len, ac, chunked)
    if dtype == "bf16-pure":
        notes += ("bf16 weights: updates rounded (--stochastic-rounding helps)",)
    if per_layer:
        notes += ("per-layer: no clipping",)
        if micro * world < target:
            notes += (f"global batch {micro * world} of {target}: --per-layer cannot accumulate",)
    if freeze:
        notes += ("embeddings frozen",)
    elif embedding_state != EMBEDDING_STATES[0]:
        notes += (f"{embedding_state} embedding state",)
    return Candidate(model=model, seq_len=seq_len, optimizer=name, rank=rank, dtype=dtype, micro_batch=micro,
                     grad_accum=1 if per_layer else batch // world // micro,
                     per_layer=per_layer, activation_checkpointing=ac, chunked_loss=chunked,
                     embedding_state=embedding_state, freeze_embeddings=freeze, breakdown=breakdown,
                     per_rank=per_rank, gathered=gathered, budget=budget, world_size=world, parallel=parallel,
                     throughput=speed, costs=notes, target_batch=target)


# ---------------------------------------------------------------- the report

def _dominant(c: Candidate) -> str:
    b = c.per_rank
    parts = {"parameters": b.parameters, "gradients": b.gradients, "optimizer state": b.optimizer_state,
             "activations": b.activations, "backward transient": b.backward_transient,
             "step transient": b.step_transient, "FSDP2's unsharded root and layers": c.gathered}
    name, size = max(parts.items(), key=lambda item: item[1])
    return f"{name} alone {gib(size)} GiB"


def _label(c: Candidate) -> str:
    return c.optimizer + (f" r={c.rank}" if c.rank is not None else "")


def best_per_optimizer(candidates: list[Candidate]) -> list[Candidate]:
    """The first (best) fitting candidate of each optimizer and rank, in the order given."""
    seen, rows = set(), []
    for c in candidates:
        if c.fits and (c.optimizer, c.rank) not in seen:
            seen.add((c.optimizer, c.rank))
            rows.append(c)
    return rows


def format_plan(candidates: list[Candidate], *, top: int = 10) -> str:
    """A Markdown table of the best configuration of each optimizer (and rank) that fits, best first, then why
    the others do not fit: each one's smallest peak and what dominates it."""
    rows = best_per_optimizer(candidates)[:top]
    lines = ["| # | optimizer | dtype | global batch | micro-batch × accum | tricks | peak GiB | headroom GiB "
             "| est. throughput | costs |", "|---:|---|---|---:|---|---|---:|---:|---:|---|"]
    for i, c in enumerate(rows, 1):
        tricks = [t for t, on in (("per-layer", c.per_layer), ("checkpointing", c.activation_checkpointing),
                                  ("chunked loss", c.chunked_loss), ("frozen embeddings", c.freeze_embeddings),
                                  (f"{c.embedding_state} embeddings", c.embedding_state != EMBEDDING_STATES[0]))
                  if on]
        lines.append(f"| {i} | {_label(c)} | {c.dtype} | {c.global_batch} | {c.micro_batch} × {c.grad_accum} | "
                     f"{', '.join(tricks) or '–'} | {gib(c.peak)} | {gib(c.headroom)} | {c.throughput:.2f} | "
                     f"{'; '.join(c.costs) or '–'} |")
    fitting = {(c.optimizer, c.rank) for c in rows}
    cheapest: dict[tuple, Candidate] = {}
    for c in candidates:
        key = (c.optimizer, c.rank)
        if key not in fitting and (key not in cheapest or c.peak < cheapest[key].peak):
            cheapest[key] = c
    notes = []
    for c in sorted(cheapest.values(), key=lambda c: c.peak):
        if c.fits:
            continue  # fits, but below the table's top
        notes.append(f"- {_label(c)}: at least {gib(c.peak)} GiB ({c.flags()}); {_dominant(c)}")
    if rows:
        c = rows[0]
        lines += ["", f"First: slimopt train {c.flags()}"
                  + (f"  (DIR: a local copy of {c.model}, whose shape this is)" if c.model in SHAPES else "")]
    if notes:
        lines += ["", "Do not fit (each one's smallest peak, and its largest part):", *notes]
    return "\n".join(lines)


def format_header(model: str, budget: int, seq_len: int, candidates: list[Candidate], task: str) -> str:
    c = candidates[0]
    ranks = f", FSDP2 over {c.world_size} ranks (per rank)" if c.parallel == "fsdp" else ""
    batch = (f"global batch {c.global_batch} sequences" if not c.target_batch else
             f"global batch up to {c.target_batch} sequences (the default: --per-layer cannot accumulate, its "
             "micro-batch is its global batch; --global-batch N requires N)")
    return (f"{model}, {task}: {gib(budget)} GiB per GPU, sequences of {seq_len} tokens, {batch}{ranks}; "
            f"{sum(x.fits for x in candidates)} of {len(candidates)} configurations fit. Best first: "
            + ("the global batch, then " if c.target_batch else "")
            + "estimated throughput (in 5 % steps), then optimizer for the task, precision, embeddings, rank; "
            "est. throughput is relative to an ideal step without tricks.")
