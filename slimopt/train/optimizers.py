"""The optimizers a training run can name: one registry entry each.

Every entry builds a list of torch optimizers for a model, so that a method
that needs two (torch's Muon for hidden matrices plus AdamW for the rest) fits
the same loop. Hidden matrices get the optimizer under test at ``lr``;
embeddings, the head, norms and biases get AdamW at ``adamw_lr``, through
:func:`slimopt.param_groups`, with fp32 moments or the low-memory state that
``embedding_state`` names (:mod:`slimopt.optim.lowmem`). Weight decay follows HF Trainer's rule in every
optimizer: none for biases and norm weights (:func:`no_decay`).

Every AdamW here, the baseline's included, keeps fp32 moments, as slimopt's
fallback does: torch.optim.AdamW on fp32 weights (its foreach step is the
faster on CPU), slimopt.AdamW on bf16 weights, where torch's would keep bf16
moments and skew the "optimizer state × AdamW" comparison.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from slimopt import SUMO, SWAN, AdamW, GaLore, SlimOptimizer, param_groups
from slimopt.optim.advice import adamw_state_bytes
from slimopt.optim.apollo import APOLLO, APOLLOMini
from slimopt.optim.lowmem import EMBEDDING_STATES
from slimopt.optim.lowmem import state_bytes as fallback_state_bytes
from slimopt.optim.optimizer import FallbackWarning, RoutingWarning
from slimopt.optim.transient import LiveStorages, optimizer_step_bytes
from slimopt.rso import RSO, SHARED_INPUTS, Adaptation, Projection, RSOLinear
from slimopt.transforms.numerics import compute_dtype
from slimopt.transforms.subspace import rebase_seed


@dataclass(frozen=True)
class Hyperparameters:
    lr: float
    adamw_lr: float
    weight_decay: float
    rank: int
    update_gap: int
    stochastic_rounding: bool = False  # of the updates of bf16 weights; slimopt optimizers only
    orthogonalizer: str = "auto"  # SUMO's orthogonalizer, SWAN's whitening
    # The state of the AdamW fallback group (embeddings, head, norms, biases): a key of EMBEDDING_STATES, "adamw"
    # (fp32 moments), "8bit" (blockwise-quantized moments) or "factored" (Adafactor-factored second moment).
    embedding_state: str = "adamw"
    beta2: float | None = None  # Adam's β₂ for every Adam moment of the run; None: 0.999
    scale: float | None = None  # GaLore's, SUMO's and APOLLO's update scale; None: the published default
    lr_scale: str = "published"  # or "adamw": matrix updates at AdamW's RMS (torch's Muon: adjust_lr_fn)

    def adam(self) -> dict:
        """The keyword arguments that set β₂, where one was given."""
        return {} if self.beta2 is None else {"betas": (0.9, self.beta2)}


def check_embedding_state(value: str) -> None:
    if value not in EMBEDDING_STATES:
        raise ValueError(f"invalid embedding_state={value!r}: expected one of {list(EMBEDDING_STATES)}")


def fallback_algorithm(hp: Hyperparameters) -> str:
    """The group algorithm of the fallback group: "adamw", "adamw8bit" or "adamw_factored"."""
    check_embedding_state(hp.embedding_state)
    return EMBEDDING_STATES[hp.embedding_state]


def dense_parameter_bytes(model: nn.Module, hp: Hyperparameters) -> tuple[int, list[int]]:
    """(bytes of all parameters, bytes of each trainable one, i.e. of its gradient)."""
    params = list(model.parameters())
    return sum(p.nbytes for p in params), [p.nbytes for p in params if p.requires_grad]


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[[nn.Module, Hyperparameters], list[torch.optim.Optimizer]]
    lr: float  # default: the fair protocol's choice on the tuning split (benchmarks/results/bench_tuned_tiny_cpu)
    # Exact bytes of the optimizer state it will hold for this model (shapes only: works on the meta device).
    state_bytes: Callable[[nn.Module, Hyperparameters], int]
    # Peak of the temporaries one optimizer step allocates on top of params, grads and state (shapes only:
    # works on the meta device), from a fake-tensor run of the step's own code; see "step transients" below.
    step_bytes: Callable[[nn.Module, Hyperparameters], int] = lambda model, hp: 0
    parameter_bytes: Callable[[nn.Module, Hyperparameters], tuple[int, list[int]]] = dense_parameter_bytes
    per_layer: bool = True  # can step one parameter at a time, inside backward
    stochastic_rounding: bool = True  # can round the updates of bf16 weights stochastically


def no_decay(name: str, param: torch.Tensor) -> bool:
    """HF Trainer's rule: biases and norm weights get no weight decay; embeddings and matrices do."""
    return param.ndim < 2 or "bias" in name or "norm" in name


def _decay_groups(groups: list[dict]) -> list[dict]:
    """Each group of named parameters, split in two: its :func:`no_decay` ones get weight_decay 0."""
    split = []
    for group in groups:
        decayed = [(n, p) for n, p in group["params"] if not no_decay(n, p)]
        exempt = [(n, p) for n, p in group["params"] if no_decay(n, p)]
        split += [{**group, "params": decayed}] if decayed else []
        split += [{**group, "params": exempt, "weight_decay": 0.0}] if exempt else []
    return split


def _low_precision(params) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


def _adamw_optimizer(named_params, lr, hp, matrices=()) -> torch.optim.Optimizer:
    """AdamW for the fallback parameters ``named_params``, with the state ``hp.embedding_state`` names, and for
    the hidden ``matrices`` (the AdamW baseline's) with plain AdamW state. torch's AdamW where all is plain AdamW
    on fp32 weights, else slimopt's (a group per algorithm)."""
    algorithm = fallback_algorithm(hp)
    if algorithm == "adamw" or not named_params:
        groups = _decay_groups([{"params": [*matrices, *named_params]}])
        if _low_precision(p for _, p in [*matrices, *named_params]):
            return AdamW(groups, lr=lr, weight_decay=hp.weight_decay, stochastic_rounding=hp.stochastic_rounding,
                         **hp.adam())
        return torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay, **hp.adam())
    groups = _decay_groups([{"params": list(matrices)}, {"params": named_params, "algorithm": algorithm}])
    return AdamW(groups, lr=lr, weight_decay=hp.weight_decay, stochastic_rounding=hp.stochastic_rounding,
                 **hp.adam())


def _adamw(model, hp, process_group=None):
    if fallback_algorithm(hp) == "adamw":
        return [_adamw_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], hp.lr, hp)]
    matrices, others = _named_split(model)  # the hidden matrices keep AdamW's state, the rest hp.embedding_state's
    return [_adamw_optimizer(others, hp.lr, hp, matrices=matrices)]


def _muon(model, hp, process_group=None):
    # torch's Muon takes 2-D parameters only: fused MoE experts (E × out × in) go to the AdamW optimizer.
    matrices, others = _named_split(model, batched=False)
    # lr_scale="adamw": torch's own Moonlight rule, 0.2·√max(m, n), for an update at AdamW's RMS.
    adjust = "match_rms_adamw" if hp.lr_scale == "adamw" else "original"
    return [torch.optim.Muon(_decay_groups([{"params": matrices}]), lr=hp.lr, weight_decay=hp.weight_decay,
                             adjust_lr_fn=adjust),
            _adamw_optimizer(others, hp.adamw_lr, hp)]


def _slim(cls, *matrix_keys, exact_option=None):
    def build(model, hp, process_group=None):
        hparams = {key: getattr(hp, key) for key in matrix_keys}
        if exact_option:
            hparams[exact_option] = hp.orthogonalizer
        if hp.scale is not None and "scale" in cls.algorithms[cls.algorithm].defaults:
            hparams["scale"] = hp.scale
        adamw = {"lr": hp.adamw_lr, "algorithm": fallback_algorithm(hp)}
        groups = _decay_groups(param_groups(model, adamw=adamw, **hparams))
        return [cls(groups, lr=hp.lr, weight_decay=hp.weight_decay, stochastic_rounding=hp.stochastic_rounding,
                    process_group=process_group, lr_scale=hp.lr_scale, **hp.adam())]
    return build


def _rso(model, hp, process_group=None):
    # lr_scale: RSO's update is an Adam step of B, already at AdamW's RMS, so both settings are the same rule.
    optimizer = RSO(model, lr=hp.lr, rank=hp.rank, update_gap=hp.update_gap, weight_decay=hp.weight_decay,
                    stochastic_rounding=hp.stochastic_rounding, **hp.adam())
    # RSO groups the model itself, after its surgery: its AdamW group is regrouped before any step.
    adamw = next(group for group in optimizer.param_groups if group["algorithm"] == "adamw")
    optimizer.param_groups.remove(adamw)
    named = list(zip(adamw.pop("param_names"), adamw.pop("params")))
    for _, param in named:  # fresh AdamW state, made at construction: the regrouped params get their algorithm's
        optimizer.state.pop(param, None)
    regrouped = {**adamw, "params": named, "lr": hp.adamw_lr, "algorithm": fallback_algorithm(hp)}
    for group in _decay_groups([regrouped]):
        optimizer.add_param_group(group)
    return [optimizer]


# ----------------------------------------------------------------- state sizes
# torch.optim keeps moments in the parameter's dtype and a float32 step; slimopt keeps
# fp32 state for fp32/bf16/fp16 weights (fp64 for fp64) and an int64 step. Stochastic
# rounding draws from torch's global RNG: it adds no state.

def _slim_bytes(param) -> int:
    return compute_dtype(param.dtype).itemsize


def _torch_adamw_state(params) -> int:
    return sum(2 * p.nbytes + 4 for p in params)


def _slim_adamw_state(params, hp: Hyperparameters | None = None) -> int:
    """slimopt's fallback state of ``params``: AdamW's, or the low-memory one ``hp.embedding_state`` names."""
    if hp is None or fallback_algorithm(hp) == "adamw":
        return sum(adamw_state_bytes(p) for p in params)
    return sum(fallback_state_bytes(p.shape, fallback_algorithm(hp), p.dtype) for p in params)


def _named_split(model, batched: bool = True) -> tuple[list, list]:
    """(matrix, other) named parameters as :func:`slimopt.param_groups` routes them. ``batched=False``: batches
    of matrices (fused MoE experts, E × out × in) count as others, for optimizers that take 2-D matrices only
    (torch's Muon; RSO adapts nn.Linear layers)."""
    matrices, others = [], []
    for group in param_groups(model):
        adamw = group.get("algorithm") == "adamw"
        for name, p in group["params"]:
            (others if adamw or (not batched and p.ndim > 2) else matrices).append((name, p))
    return matrices, others


def _split(model, batched: bool = True):
    matrices, others = _named_split(model, batched)
    return [p for _, p in matrices], [p for _, p in others]


def _oriented(param, rank) -> tuple[int, int, int]:
    """(m, n, r) of a matrix (the last two dimensions): m the long side, n the short one, the rank capped at n."""
    m, n = max(param.shape[-2:]), min(param.shape[-2:])
    return m, n, min(rank, n)


def _subspace_state(matrix_bytes):
    def state(model, hp):
        matrices, others = _split(model)
        return sum(_batched_state(matrix_bytes, p, hp.rank) for p in matrices) + _slim_adamw_state(others, hp)
    return state


def _batched_state(matrix_bytes, param, rank) -> int:
    """A param of E stacked matrices (its leading dimensions) keeps E of everything but the one int64 step."""
    count = math.prod(param.shape[:-2])
    return count * (matrix_bytes(*_oriented(param, rank), _slim_bytes(param)) - 8) + 8


def _sumo_matrix(m, n, r, size):
    return (m * r + r * n + 1) * size + 2 * 8  # Q, M, the previous ‖O‖; an int64 subspace seed and step


def _galore_matrix(m, n, r, size):
    # As published (side="short"): Q spans the short side (n × r), the two moments are m × r; seed and step.
    return (n * r + 2 * m * r) * size + 16


def _apollo_matrix(m, n, r, size):
    # The two moments r × m (the projection spans the short side, the channels are the long one) and ‖S_prev‖;
    # the random projection is drawn again from the int64 seed at each step, not stored; seed and step.
    return (2 * m * r + 1) * size + 16


def _apollo_mini_state(model, hp):
    """APOLLO-Mini's state: rank 1, whatever ``hp.rank``."""
    matrices, others = _split(model)
    return sum(_batched_state(_apollo_matrix, p, 1) for p in matrices) + _slim_adamw_state(others, hp)


def _any_adamw_state(params, hp: Hyperparameters, matrices=()) -> int:
    """The state of :func:`_adamw_optimizer`'s choice for these fallback parameters (and hidden matrices)."""
    params, matrices = list(params), list(matrices)
    if fallback_algorithm(hp) != "adamw" and params:
        return _slim_adamw_state(matrices) + _slim_adamw_state(params, hp)
    params += matrices
    return _slim_adamw_state(params) if _low_precision(params) else _torch_adamw_state(params)


def _swan_state(model, hp):
    return _slim_adamw_state(_split(model)[1], hp)  # stateless for matrices


def _adamw_state(model, hp):
    if fallback_algorithm(hp) == "adamw":
        return _any_adamw_state([p for p in model.parameters() if p.requires_grad], hp)
    matrices, others = _split(model)
    return _any_adamw_state(others, hp, matrices=matrices)


def _rso_state(model, hp):
    matrices, others = _split(model, batched=False)  # before apply(): its hidden matrices are the layers RSO adapts
    return sum(2 * p.shape[0] * hp.rank * _slim_bytes(p) + 8 for p in matrices) + _slim_adamw_state(others, hp)


def _rso_parameter_bytes(model, hp):
    """W_k (frozen) + each layer's B (n_out × r) + one P (n_in × r) per distinct input; gradients for B only."""
    matrices, others = _split(model, batched=False)
    names = {id(p): name.removesuffix(".weight") for name, p in model.named_parameters()}
    inputs = set()
    for p in matrices:
        parent, _, leaf = names[id(p)].rpartition(".")
        siblings = next((group for group in SHARED_INPUTS if leaf in group), leaf)
        inputs.add((parent, siblings, p.shape[1]))
    size = matrices[0].element_size()
    B = [p.shape[0] * hp.rank * size for p in matrices]
    P = sum(n_in * hp.rank * size for _, _, n_in in inputs)
    return sum(p.nbytes for p in model.parameters()) + sum(B) + P, [p.nbytes for p in others] + B


def _muon_state(model, hp):
    matrices, others = _split(model, batched=False)
    return sum(p.nbytes for p in matrices) + _any_adamw_state(others, hp)  # one momentum buffer per matrix


# ----------------------------------------------------------- step transients
# What a step allocates and frees again, on top of params, grads and state. slimopt's optimizers: the optimizer is
# built on the (meta) model and its step's own code runs on fake tensors (slimopt.optim.transient): each run of
# same-shape matrices, bucketed and chunked by the optimizer's own route and chunks (max_stack_bytes), is copied
# into an fp32 stack that the algorithm's update runs on (a first, a refresh and a plain step: the largest), then
# apply_update; the AdamW fallback steps chunk by chunk. The peak is the largest chunk's, as chunks run one after
# another. torch's AdamW and Muon are not slimopt code: a few copies of their largest tensor, as they loop per
# tensor on the CPU. tests/test_memory.py measures it.


def _transients(build):
    """``step_bytes`` for a registry entry: its optimizers built on a meta copy of the model (pass a meta model: a
    real one is copied first), their steps measured."""
    def step(model, hp):
        meta = copy.deepcopy(model).to("meta")  # building creates state, and RSO's surgery changes the model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # warned about when the real optimizer is built
            optimizers = build(meta, hp)
        return max(_optimizer_step_bytes(optimizer) for optimizer in optimizers)
    return step


def _optimizer_step_bytes(optimizer) -> int:
    if isinstance(optimizer, RSO):
        return max(optimizer_step_bytes(optimizer), _rso_resample_bytes(optimizer))
    if isinstance(optimizer, SlimOptimizer):
        return optimizer_step_bytes(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if isinstance(optimizer, torch.optim.Muon):
        return 3 * max(p.numel() * 4 for p in params)  # orthogonalizes one matrix at a time in bf16
    return 3 * max(p.nbytes for p in params)  # torch's AdamW: its per-tensor loop (CPU), temporaries of one tensor


def _rso_resample_bytes(optimizer: RSO) -> int:
    """RSO's end of a subproblem, after its Adam step: every layer reading a projection merges W_k + B Pᵀ, then P is
    redrawn. ``Adaptation.resample`` runs on fake copies of each projection and its layers, one after another."""
    adaptation = optimizer.adaptation
    return max((_resample_bytes(p.in_features, p.rank, p.distribution, p.P.dtype,
                                tuple((layer.out_features, layer.weight.dtype, layer.bias is not None)
                                      for layer in adaptation.layers_reading(p)))
                for p in adaptation.projections), default=0)


@functools.lru_cache(maxsize=1024)
def _resample_bytes(in_features, rank, distribution, dtype, layers) -> int:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad(), mode:
        projection = Projection(in_features, rank, distribution, 0, device="cpu", dtype=dtype)
        linears = [RSOLinear(nn.Linear(in_features, out, bias=bias, dtype=weight_dtype), projection)
                   for out, weight_dtype, bias in layers]
    adaptation = Adaptation(model=nn.Module(), layers={str(i): layer for i, layer in enumerate(linears)},
                            projections=[projection])
    inputs = [t for module in (projection, *linears) for t in (*module.parameters(), *module.buffers())]
    with torch.no_grad(), mode, LiveStorages(inputs) as live:
        adaptation.resample([projection])
    return live.peak


def _entry(build, **fields) -> OptimizerEntry:
    return OptimizerEntry(build, step_bytes=_transients(build), **fields)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": _entry(_adamw, lr=3e-3, state_bytes=_adamw_state),
    "galore": _entry(_slim(GaLore, "rank", "update_gap"), lr=1e-2, state_bytes=_subspace_state(_galore_matrix)),
    # APOLLO-Mini is rank 1, tensor-wise, scale 128 (its class defaults): hp.rank does not reach it (an explicit
    # hp.scale does, through _slim, as for every method). Both tuned down from APOLLO's published 1e-2.
    "apollo": _entry(_slim(APOLLO, "rank", "update_gap"), lr=3.16e-3, state_bytes=_subspace_state(_apollo_matrix)),
    "apollo_mini": _entry(_slim(APOLLOMini, "update_gap"), lr=1e-3, state_bytes=_apollo_mini_state),
    "sumo": _entry(_slim(SUMO, "rank", "update_gap", exact_option="orthogonalizer"), lr=1.1e-3,
                   state_bytes=_subspace_state(_sumo_matrix)),
    "swan": _entry(_slim(SWAN, exact_option="whitening"), lr=3.16e-3, state_bytes=_swan_state),
    "muon": _entry(_muon, lr=1.77e-2, state_bytes=_muon_state, stochastic_rounding=False),  # torch's Muon
    "rso": _entry(_rso, lr=1e-3, state_bytes=_rso_state, parameter_bytes=_rso_parameter_bytes, per_layer=False),
}


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"invalid optimizer={name!r}: expected one of {sorted(OPTIMIZERS)}")


def per_layer_refusal(name: str) -> str | None:
    """Why ``slimopt train --per-layer`` refuses optimizer ``name``, or None where it runs per layer: what
    ``slimopt memory --per-layer`` prints in that optimizer's row instead of an estimate."""
    check_optimizer(name)
    if OPTIMIZERS[name].per_layer:
        return None
    return (f"--per-layer does not support optimizer={name!r}: it updates at the end of a step (merge and "
            "resample), not one parameter at a time")


def build_optimizers(name: str, model, hp: Hyperparameters, process_group=None) -> list[torch.optim.Optimizer]:
    """The optimizers ``name`` trains ``model`` with. ``model`` may be RSO's ``Adaptation`` (built before FSDP2
    sharding). ``process_group`` (DDP) splits slimopt's optimizers over the ranks; torch's AdamW and Muon, and
    RSO, run replicated."""
    check_optimizer(name)
    return OPTIMIZERS[name].build(model, hp, process_group)


def split_per_parameter(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """One optimizer per parameter, same class, name and group hyperparameters: for updates inside backward.

    Works for any optimizer whose constructor takes named param groups (all of torch.optim and slimopt).

    A slimopt optimizer seeds each matrix's subspace from its group's ``seed`` and the parameter's position in
    the optimizer (``sketch_seed(seed, position)``); alone in its optimizer, every parameter would be at
    position 0 and all would share one seed. So each single's group gets ``rebase_seed(seed, position)``, which
    gives its matrix, at position 0, the subspace seed it has in the combined optimizer.
    """
    singles = []
    for optimizer in optimizers:
        # Optimizer-wide, not a group hyperparameter: the only such option the harness sets.
        slim = isinstance(optimizer, SlimOptimizer)
        options = {"stochastic_rounding": optimizer.stochastic_rounding} if slim else {}
        position = 0  # of the parameter in the optimizer's flattened param list, as SlimOptimizer counts it
        for group in optimizer.param_groups:
            hparams = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            for named in zip(group["param_names"], group["params"]):
                seed = {"seed": rebase_seed(hparams["seed"], position)} if slim and "seed" in hparams else {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RoutingWarning)  # the combined optimizer warned once
                    singles.append(type(optimizer)([{**hparams, **seed, "params": [named]}], **options))
                position += 1
    return singles


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers hold as state (moments, projectors, step counters)."""
    return sum(value.nbytes for opt in optimizers for state in opt.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))
