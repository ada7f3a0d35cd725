"""SlimOptimizer: the torch.optim.Optimizer that SUMO, SWAN, GaLore, AdamW and RSO share.

A step reads top to bottom:
1. check every group's hyperparameters and every gradient, before touching anything, so rejected input never
   leaves a half-applied step (:mod:`slimopt.optim.checks`);
2. route each parameter: matrices (and batches of matrices, such as MoE experts) to the group's algorithm,
   everything else to the AdamW fallback (:mod:`slimopt.optim.routing`);
3. bucket same-shape matrices, copy their gradients once into an fp32 stack (bounded in bytes), and run the
   algorithm once per stack on state that stays stacked between steps (``foreach=True``,
   :mod:`slimopt.optim.stacking`), or once per matrix through the algorithm's reference step (``foreach=False``);
4. apply ``W ← W·(1 − lr·wd) − lr·Δ``, in fp32 for low-precision weights; the AdamW fallback steps through
   torch's own fused (or foreach) AdamW, one call per bounded chunk.

The engine interface, which the one-process step and both distributed steps (:mod:`slimopt.distributed.engine`)
share: :meth:`~SlimOptimizer.param_name`, :meth:`~SlimOptimizer.route`, :meth:`~SlimOptimizer.chunks`,
:meth:`~SlimOptimizer.run_chunk`, :meth:`~SlimOptimizer.apply_update` and :meth:`~SlimOptimizer.step_local`.

State exists from construction, for every trainable parameter this process holds, as a first step would create
it. So torch's distributed-checkpoint helpers find it and never take their zero-gradient initialization step,
and a zero gradient is an ordinary gradient: moments decay and the step is counted, as in torch.optim.

Host syncs: a step reads the device once, the largest |g| of every gradient in one fused reduction per device,
to refuse a NaN/Inf step before anything changes; and a tensor lr once per group. Hyperparameters, step counters
and sketch seeds are host values.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from slimopt.distributed import engine
from slimopt.distributed.placement import check_placement, is_sharded, local, local_shard_like
from slimopt.distributed.plan import Plan, build_plan
from slimopt.optim import advice, routing
from slimopt.optim.algorithm import Algorithm, check_int, check_shared, read_lr
from slimopt.optim.checks import (
    check_saved_state,
    finite,
    largest_magnitudes,
    max_over_ranks,
    nonfinite_gradient_error,
)
from slimopt.optim.routing import LAYOUTS, FallbackWarning, Route, RoutingWarning, as_matrices, as_param, warn_user
from slimopt.optim.stacking import HOST_STATE, Stacks, chunk_by_bytes
from slimopt.transforms.numerics import compute_dtype, round_stochastically
from slimopt.transforms.subspace import sketch_seed

__all__ = ["HOST_STATE", "LAYOUTS", "FallbackWarning", "Route", "RoutingWarning", "SlimOptimizer", "chunk_by_bytes",
           "evaluate_closure", "round_stochastically", "warn_user"]

SHARED_HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps", "maximize")
# torch.optim flags that name implementations slimopt does not have.
TORCH_ONLY_FLAGS = ("fused", "capturable", "differentiable")


class SlimOptimizer(torch.optim.Optimizer):
    """Base class: routes each param group to its ``"algorithm"`` and batches the work.

    Keyword-only options (optimizer-wide, not per group):
        foreach: stack same-shape matrices and run one batched call per shape
            (default). False runs the per-matrix reference step instead.
        skip_nonfinite: on a NaN/Inf gradient skip the whole step and count it
            in ``skipped_steps`` instead of raising.
        max_stack_bytes: at most this many bytes of fp32 gradients per batched
            call (a larger single matrix goes alone), and per rank and exchange
            across ranks. The step's transient memory is a small multiple of it
            (see ``slimopt.bench.memory``).
        stochastic_rounding: round the fp32 update of bf16 weights to bf16
            stochastically (unbiased) instead of to nearest, so that updates
            below half a bf16 ulp still move the weights on average. Each draw
            comes from a generator seeded by (seed, step, parameter position),
            so replicas round alike.
        process_group: with DDP (replicated params, averaged gradients), the
            ranks to split the work over: each param is stepped by one owner
            rank, which alone keeps its state and sends the new value to the
            others. None (default): every rank steps everything, as one process.
            FSDP2 params (DTensors) need no argument: their mesh is the group.

    A group naming another algorithm than the class's own gets that algorithm's
    defaults for its specific hyperparameters; ``lr``, ``weight_decay``,
    ``betas``, ``eps`` and ``maximize`` come from the constructor for every group.
    A group's ``"layout"`` says how its weights are matrices (``LAYOUTS``):
    ``"out_in"`` (default; leading dims of a ≥ 3-D weight are a batch of
    matrices, as MoE experts), ``"in_out"`` (HF Conv1D) or ``"conv"``.

    In a distributed mode, ``state_dict()`` and ``load_state_dict()`` are collective (call them on every rank,
    as torch's ``get/set_optimizer_state_dict`` do): under FSDP2 the owner-held state of each matrix is
    presented as a DTensor sharded on dim 0 like every other FSDP2 state, so torch's sharded and full state
    dicts carry it; under DDP every rank gets every owner's state.
    """

    algorithm: str
    # Every algorithm a group of this optimizer may name; set in slimopt.optim (RSO adds its own).
    algorithms: dict[str, Algorithm] = {}

    def __init__(self, params, defaults: dict, *, foreach: bool = True, skip_nonfinite: bool = False,
                 max_stack_bytes: int = 2**28, stochastic_rounding: bool = False,
                 process_group: torch.distributed.ProcessGroup | None = None, **torch_flags):
        name = type(self).__name__
        for flag, value in torch_flags.items():
            if flag not in TORCH_ONLY_FLAGS:
                raise TypeError(f"{name} got an unexpected keyword argument {flag!r}")
            if value:
                raise ValueError(
                    f"{name} does not support {flag}={value!r} (a torch.optim implementation flag); it has "
                    "foreach=True (batched, one call per shape) or foreach=False (per-matrix reference), "
                    "skip_nonfinite, max_stack_bytes, stochastic_rounding and process_group"
                )
        check_int({"max_stack_bytes": max_stack_bytes}, "max_stack_bytes", low=1)
        self.foreach = foreach
        self.skip_nonfinite = skip_nonfinite
        self.max_stack_bytes = max_stack_bytes
        self.stochastic_rounding = bool(stochastic_rounding)
        self.skipped_steps = 0
        self._positions: dict[int, int] = {}  # id(param) → its index in the flattened param groups
        self._stacks = Stacks()
        self.process_group = process_group
        self._plan: Plan | None = None
        self._plan_for: tuple[int, ...] | None = None  # the params the plan was built for
        super().__init__(params, {"algorithm": self.algorithm, "layout": "out_in", "lr_scale": "published", **defaults})
        self.plan()
        advice.warn_at_construction(self)  # once per optimizer: a rank that saves nothing, embeddings projected

    # ---------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict) -> None:
        name = param_group.get("algorithm", self.defaults["algorithm"])
        own = name == self.defaults["algorithm"]
        for key, default in self._algorithm(name).defaults.items():
            param_group.setdefault(key, self.defaults[key] if own else default)
        for key in (*SHARED_HYPERPARAMETERS, "layout", "lr_scale"):
            param_group.setdefault(key, self.defaults[key])
        param_group["algorithm"] = name
        self.validate_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for index, param in enumerate(group["params"]):
            self._positions[id(param)] = len(self._positions)
            self.check_param(param, group, index)
        if self._plan_for is not None:  # after construction: the new params need a plan and state too
            self.plan()

    def _algorithm(self, name) -> Algorithm:
        if name not in self.algorithms:
            raise ValueError(f"invalid algorithm={name!r}: expected one of {sorted(self.algorithms)}")
        return self.algorithms[name]

    def validate_group(self, group: dict) -> None:
        algorithm = self._algorithm(group.get("algorithm"))
        missing = [k for k in (*SHARED_HYPERPARAMETERS, *algorithm.defaults) if k not in group]
        if missing:
            raise ValueError(f"param group for algorithm={algorithm.name!r} lacks hyperparameters {missing}")
        check_shared(group)
        if group.get("layout", "out_in") not in LAYOUTS:
            raise ValueError(f"invalid layout={group['layout']!r}: expected one of {list(LAYOUTS)}")
        algorithm.validate(group)
        if group.get("lr_scale", "published") == "adamw" and algorithm.adamw_factor((1, 1), group) is None:
            raise ValueError(f"invalid lr_scale='adamw' for algorithm={algorithm.name!r}: it has no rule that scales "
                             "its updates to AdamW's RMS; use lr_scale='published'")

    def check_param(self, param: torch.Tensor, group: dict, index: int) -> None:
        """Raise on a parameter this optimizer cannot train; warn when a matrix group's param falls back."""
        name = self.param_name(group, index)
        check_placement(param, name)
        if param.is_complex():
            raise TypeError(f"slimopt does not support complex parameters ({name})")
        if self.stochastic_rounding and param.dtype == torch.float16:
            raise ValueError(f"stochastic_rounding=True supports bf16 weights, not float16 ({name})")
        algorithm = self._algorithm(group["algorithm"])
        # DeepSpeed ZeRO hands an optimizer flat 1-D partitions (one per group, or ZeRO-3 params that carry
        # ds_shape): a matrix algorithm would quietly train them all as AdamW, so refuse them.
        if algorithm.matrix and (hasattr(param, "ds_shape") or hasattr(param, "ds_numel")
                                 or all(p.ndim == 1 for p in group["params"])):
            raise ValueError(
                f"slimopt: {name} (shape {tuple(param.shape)}) in a {algorithm.name!r} group looks like a flattened "
                "partition (DeepSpeed ZeRO style: a group of 1-D tensors only, or parameters with ds_shape), not a "
                f"weight matrix; {algorithm.name!r} needs each weight whole and would train it as AdamW. Train "
                "without DeepSpeed ZeRO, or put 1-D parameters in an 'adamw' group")
        if algorithm.matrix and self.route(param, group).algorithm is not algorithm:
            weight = "this ≥ 2-D weight" if param.ndim >= 2 else "it"
            warn_user(f"slimopt: {name} has shape {tuple(param.shape)}, whose last two dimensions are not a "
                       f"matrix with both sides ≥ 2; algorithm {algorithm.name!r} cannot update {weight}, so it "
                       "trains with the AdamW fallback", FallbackWarning)

    # ------------------------------------------------------ engine interface

    def param_name(self, group: dict, index: int) -> str:
        """The name errors, plans and checkpoints use: the group's ``param_names``, else its position."""
        names = group.get("param_names")
        if names is not None:
            return names[index]
        return f"parameter {self._positions.get(id(group['params'][index]), index)}"

    def route(self, param: torch.Tensor, group: dict) -> Route:
        """How ``param`` of ``group`` is updated: by which algorithm, as how many matrices of which shape."""
        return routing.route(param, group, self._algorithm(group["algorithm"]), self._algorithm("adamw"))

    def chunks(self, items) -> list[list]:
        """Consecutive runs of (group, param, grad, route) items whose fp32 gradients take at most
        ``max_stack_bytes``: what one batched call takes."""
        sizes = [item[3].count * math.prod(item[3].shape) * compute_dtype(item[1].dtype).itemsize for item in items]
        return [[items[i] for i in chunk] for chunk in chunk_by_bytes(sizes, self.max_stack_bytes)]

    def run_chunk(self, algorithm: Algorithm, shape, step: int, items) -> list[torch.Tensor]:
        """Δ of each (group, param, grad, route) item of one chunk, shaped as its gradient; updates the items'
        state and counts the step. Every item has the same group, route shape and ``step``. Batched matrices,
        or (``foreach=False``) the reference step of any algorithm, one matrix at a time."""
        if self.foreach:
            return self._stack_deltas(algorithm, shape, step, items)
        return self._reference_deltas(algorithm, step, items)

    def apply_update(self, params, deltas, lr: float, weight_decay: float, steps=None) -> None:
        """W ← W·(1 − lr·wd) − lr·Δ. Low-precision weights are updated in fp32 and rounded once (stochastically
        with ``stochastic_rounding``, from a generator seeded by the params' positions and ``steps``)."""
        decay = 1.0 - lr * weight_decay
        full = [(p, d) for p, d in zip(params, deltas) if p.dtype == d.dtype]
        if full:
            ps, ds = zip(*full)
            if decay != 1.0:
                torch._foreach_mul_(ps, decay)
            torch._foreach_add_(ps, ds, alpha=-lr)
        for index, (param, delta) in enumerate(zip(params, deltas)):
            if param.dtype != delta.dtype:
                updated = param.to(delta.dtype).mul_(decay).add_(delta, alpha=-lr)
                if self.stochastic_rounding:
                    updated = round_stochastically(updated, self._rounding_generator(param, steps, index))
                param.copy_(updated)

    def step_local(self, items) -> None:
        """Step (group, param, grad, route) items whose state this process holds, and whose gradients (and, for
        matrices, params) are whole here: elementwise items may be local FSDP2 rows."""
        buckets = defaultdict(list)
        for item in items:
            group, param, _, route = item
            # Matrices stack by shape; an elementwise algorithm (AdamW) takes all its params in one torch call.
            shape = route.shape if route.algorithm.matrix else None
            buckets[(id(group), route.algorithm.name, shape, param.dtype, param.device, self.step_of(param))
                    ].append(item)
        for (_, name, shape, _, _, step), bucket in buckets.items():
            algorithm = self._algorithm(name)
            group = bucket[0][0]
            lr = self._lrs[id(group)]
            for chunk in self.chunks(bucket):  # elementwise too: low-precision weights step through fp32 copies
                params = [local(p) for _, p, _, _ in chunk]
                if algorithm.matrix or not self.foreach:
                    # One expression: the chunk's Δs (its gradient stack) are freed before the next chunk's.
                    self.apply_update(params, self.run_chunk(algorithm, shape, step, chunk), lr,
                                      group["weight_decay"], steps=[step] * len(chunk))
                else:
                    originals = [p for _, p, _, _ in chunk]
                    algorithm.step_params(params, [local(g) for _, _, g, _ in chunk],
                                          [{k: local(v) for k, v in self.state[p].items()} for p in originals],
                                          {**group, "lr": lr}, step,
                                          round_bf16=self._rounder(originals, step) if self.stochastic_rounding
                                          else None)
                    self._count_step(originals)

    def step_of(self, param) -> int:
        """How many steps ``param``'s state has taken (0 for stateless algorithms, and where held elsewhere)."""
        state = self.state.get(param)
        return int(state["step"]) if state and "step" in state and not _placeholder(state) else 0

    def holds_state(self, param) -> bool:
        """Whether this process keeps ``param``'s state (in one process: always)."""
        return self._plan is None or self._plan.holds_state(param)

    def state_template(self, param: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The state ``param`` of ``group`` has once it trained, as meta tensors (shapes and dtypes; under FSDP2
        at the full, unsharded shape). Empty for a stateless algorithm."""
        return self._init_state(param, self.route(param, group), group, device="meta")

    def lr_of(self, group: dict) -> float:
        """The group's lr as read once at the start of this step (a tensor lr is read once per step)."""
        return self._lrs[id(group)]

    # ---------------------------------------------------------------- state

    def plan(self) -> Plan | None:
        """How the step is split over ranks (None: in one process), rebuilt when the params change.

        A change of params (accelerate's FSDP2 ``prepare`` swaps them for DTensors after the optimizer was
        built) re-indexes positions, re-checks the params and moves or recreates their state. Building the plan
        is collective (every rank checks that all built the same plan). Then the state this rank holds is
        created at once, so that it exists, with the same keys, before any step."""
        params = tuple(id(p) for group in self.param_groups for p in group["params"])
        if params != self._plan_for:
            previous = self._plan_for
            self._reindex(previous)
            self._plan = build_plan(self, self.process_group)
            self._plan_for = params
            self.create_state()
        return self._plan

    def _reindex(self, previous: tuple[int, ...] | None) -> None:
        entries = [(group, index, p) for group in self.param_groups for index, p in enumerate(group["params"])]
        if previous is not None:
            old_params = {id(p): p for p in self.state}
            kept = defaultdict(dict)
            if len(previous) == len(entries):  # the same params, some swapped for others (accelerate, ZeRO)
                for old_id, (group, index, param) in zip(previous, entries):
                    old = old_params.get(old_id)
                    state = self.state.get(old) if old is not None else None
                    if old_id != id(param):
                        self.check_param(param, group, index)
                    if not state or _placeholder(state):
                        continue
                    if old is param or (not is_sharded(param) and not is_sharded(old) and old.shape == param.shape):
                        kept[param] = state  # the same layout: the state carries over
                    elif any(int(v) for k, v in state.items() if k == "step"):
                        raise RuntimeError(
                            f"{self.param_name(group, index)} was replaced by a parameter of another layout "
                            f"({type(param).__name__} {tuple(param.shape)}) after it had trained: build the "
                            "optimizer after wrapping the model (fully_shard), or before its first step")
                    # else: fresh state of another layout, which create_state makes again
            else:
                current = {id(param) for _, _, param in entries}
                kept.update({p: state for p, state in self.state.items() if id(p) in current})
            self.state = kept
        self._positions = {id(param): position for position, (_, _, param) in enumerate(entries)}
        self._stacks.clear()

    def create_state(self) -> None:
        """Create the state a first step would create, for every trainable param whose state this rank holds
        (an empty entry for a stateless algorithm's), inert until a gradient arrives: checkpoint loaders need
        it to know what to read. In a distributed mode, a param held elsewhere gets a placeholder entry, the
        keys of its state as meta tensors (no memory): torch's checkpoint helpers step once with zero gradients
        on a rank whose ``state`` is empty, and rebuild what they load from the keys of ``state``."""
        plan = self.plan()
        for group in self.param_groups:
            for param in group["params"]:
                if not param.requires_grad or self.state.get(param):
                    continue
                route = self.route(param, group)
                if plan is not None and not plan.holds_state(param):
                    self.state[param] = self.state_template(param, group)
                else:  # a stateless algorithm's param gets an empty entry, as torch.optim's stateless ones do
                    self.state[param] = self._init_state(param, route, group)

    def _seeds(self, param: torch.Tensor, group: dict, count: int) -> list[int]:
        """Per-matrix subspace seeds, fixed by the parameter's position (and the matrix's index in a batch)."""
        base = sketch_seed(group.get("seed", 0), self._positions[id(param)])
        return [base] if count == 1 else [sketch_seed(base, index) for index in range(count)]

    def _init_state(self, param, route: Route, group, device=None) -> dict:
        """Fresh state; ``device="meta"`` gives only the shapes and dtypes, for checking checkpoints.

        A batch of matrices gets each state tensor stacked along a leading dimension of size ``count``. An
        elementwise algorithm's state of an FSDP2 param is sharded like the param (as torch's AdamW keeps it).
        """
        device = device or param.device
        shard = is_sharded(param) and not route.algorithm.matrix and str(device) != "meta"
        shape = local(param).shape if shard else route.shape
        states = [route.algorithm.init_state(shape, group, dtype=compute_dtype(param.dtype), device=device,
                                             seed=seed) for seed in self._seeds(param, group, route.count)]
        state = states[0] if route.count == 1 else {k: torch.stack([s[k] for s in states]) for k in states[0]}
        if shard:
            state = {k: local_shard_like(param, v) for k, v in state.items()}
        if route.algorithm.stateful:
            state["step"] = torch.tensor(0, dtype=torch.int64)
        host = "meta" if str(device) == "meta" else "cpu"
        return {k: v.to(host) if k in HOST_STATE else v for k, v in state.items()}

    # ------------------------------------------------------------------ step

    def _check_gradients(self, plan: Plan | None) -> list[tuple[dict, int, torch.Tensor]] | None:
        """Validate everything a step reads. Returns (group, index, grad) items, or None to skip the step.

        Across ranks every rank checks its rows, and one all-reduce gives every rank the same verdict."""
        work = []
        self._lrs = {}
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
                check_shared(group)  # raises, naming the tensor
            self._lrs[id(group)] = read_lr(lr)  # the one read of a tensor lr this step
            self.validate_group({**group, "lr": self._lrs[id(group)]})
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if grad.layout != torch.strided:
                    raise TypeError(f"slimopt does not support sparse gradients ({self.param_name(group, index)})")
                if grad.is_complex():
                    raise TypeError(f"slimopt does not support complex gradients ({self.param_name(group, index)})")
                work.append((group, index, grad))
        if not work:
            return []
        across_ranks = max_over_ranks(plan.group) if plan is not None and plan.mode == "fsdp" else None
        largest = largest_magnitudes([local(grad) for _, _, grad in work], across_ranks)
        bad = [item for item, value in zip(work, largest) if not finite(value)]
        if not bad:
            return work
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return None
        group, index, grad = bad[0]
        raise nonfinite_gradient_error(self.param_name(group, index), grad)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        plan = self.plan()
        work = self._check_gradients(plan)
        if work is None:
            return loss
        items = []
        for group, index, grad in work:
            param = group["params"][index]
            route = self.route(param, group)
            if route.algorithm.stateful and not self.state[param] and (plan is None or plan.holds_state(param)):
                self.state[param] = self._init_state(param, route, group)  # a param that became trainable
            items.append((group, param, grad, route))
        if plan is None:
            self.step_local(items)
        elif plan.mode == "ddp":
            engine.step_ddp(self, plan, items)
        else:
            engine.step_fsdp(self, plan, items)
        return loss

    def _stack_deltas(self, algorithm: Algorithm, shape, step: int, items) -> list[torch.Tensor]:
        """One batched call for a run of same-shape matrices: the gradients are copied once, into an fp32
        stack the algorithm may overwrite; the state is updated in place where it is stacked."""
        group = items[0][0]
        params = [param for _, param, _, _ in items]
        counts = [route.count for _, _, _, route in items]
        G = torch.empty((sum(counts), *shape), dtype=compute_dtype(params[0].dtype), device=items[0][2].device)
        torch._foreach_copy_(list(G.split(counts)), [as_matrices(local(grad), route) for _, _, grad, route in items])
        if group["maximize"]:
            G.neg_()
        stacked = self._stacks.get(params, [self.state[p] for p in params], counts)
        delta, new_state = algorithm.update(G, stacked, group, step)
        factor = update_factor(algorithm, shape, group)
        if factor != 1.0:
            delta.mul_(factor)
        for key, value in new_state.items():
            if value is not stacked[key]:
                stacked[key].copy_(value)
        self._count_step(params)
        return [as_param(d, grad.shape, route) for d, (_, _, grad, route) in zip(delta.split(counts), items)]

    def _reference_deltas(self, algorithm: Algorithm, step: int, items) -> list[torch.Tensor]:
        """The readable path (``foreach=False``): the algorithm's reference step, one matrix at a time."""
        group = items[0][0]
        deltas = []
        for _, param, grad, route in items:
            state = self.state[param]
            keys = [k for k in state if k != "step"]
            grad = local(grad)
            grad = -grad if group["maximize"] else grad
            matrices = as_matrices(grad, route)
            per_matrix = []
            for index in range(route.count):
                own = {k: local(state[k]) if route.count == 1 else state[k][index] for k in keys}
                matrix = matrices[index].to(compute_dtype(param.dtype))
                delta, new_state = algorithm.reference_update(matrix, own, {**group, "lr": self._lrs[id(group)]},
                                                              step)
                for k in keys:
                    own[k].copy_(new_state[k])
                per_matrix.append(delta * update_factor(algorithm, matrix.shape, group))
            deltas.append(as_param(torch.stack(per_matrix), grad.shape, route))
        self._count_step([param for _, param, _, _ in items])
        return deltas

    def _count_step(self, params) -> None:
        for param in params:
            state = self.state[param]
            if "step" in state:
                state["step"] += 1

    def _rounding_generator(self, param, steps, index) -> torch.Generator:
        position = self._positions.get(id(param), 0)
        step = steps[index] if steps is not None else 0
        generator = torch.Generator(device=param.device)
        generator.manual_seed(sketch_seed(sketch_seed(self.defaults.get("seed", 0) + 1, step), position))
        return generator

    def _rounder(self, params, step):
        """fp32 → bf16 stochastic rounding for the elementwise path, one seeded generator per param."""
        generators = iter([self._rounding_generator(p, [step], 0) for p in params])
        return lambda x: round_stochastically(x, next(generators))

    # ----------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """torch.optim's state dict, plus ``skipped_steps``. Collective in a distributed mode (see the class)."""
        plan = self.plan()  # first: params swapped since the last step (accelerate's prepare) re-key the state
        state_dict = super().state_dict()
        state_dict["state"] = dict(sorted(state_dict["state"].items()))  # by position, however state arose
        state_dict["skipped_steps"] = self.skipped_steps
        if plan is not None:
            state_dict["state"] = engine.share_state(self, plan, state_dict["state"])
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking the checkpoint fully; a corrupt one raises and changes nothing.

        Unlike torch.optim.Optimizer, state tensors keep their saved dtype (fp32 moments of a bf16 parameter stay
        fp32), so resuming is exact. Host-side counters (``step``, ``seed``) stay on the CPU wherever the
        checkpoint put them; a float ``step`` (torch.optim's) becomes an integer. An empty entry, or one for a
        param this rank does not hold, is not installed. Pre-hooks see the checkpoint before it is checked,
        post-hooks the optimizer with its state installed, as in torch. Collective in a distributed mode.
        """
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        plan = self.plan()
        saved_groups = self._check_state_dict(state_dict)
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_state = {param: state_dict["state"][saved_id] for saved_id, param in zip(saved_ids, params)
                       if saved_id in state_dict["state"]}
        if plan is not None:
            saved_state = engine.gather_state(self, plan, saved_state)
        # torch restores the groups; the state is installed here, without torch's cast to the param dtype.
        post_hooks = self._optimizer_load_state_dict_post_hooks
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        try:
            super().load_state_dict({**state_dict, "param_groups": saved_groups, "state": {}})
        finally:
            self._optimizer_load_state_dict_post_hooks = post_hooks
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
        for param, state in saved_state.items():
            if plan is None or plan.holds_state(param):
                self.state[param] = {k: _installed(k, v, param.device) for k, v in state.items()}
        if plan is not None:
            self.create_state()  # what the checkpoint did not hold: fresh, and an empty entry where held elsewhere
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._stacks.clear()
        for post_hook in list(post_hooks.values()):
            post_hook(self)

    def _check_state_dict(self, state_dict) -> list[dict]:
        """Raise ValueError on anything wrong; returns the saved groups, completed with today's defaults."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        plan = self.plan()
        completed = []
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"checkpoint param group {group_index} is not a param group")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"checkpoint param group {group_index} has {len(saved['params'])} params, "
                    f"this optimizer's has {len(group['params'])}"
                )
            # Checkpoints written before a hyperparameter existed get today's default for it.
            saved = {**{k: v for k, v in group.items() if k not in saved}, **saved}
            self.validate_group(saved)
            completed.append(saved)
            for index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(saved_id)
                if not saved_state and (plan is not None or saved_state is None):
                    continue  # empty: held by another rank, or stateless; a param without state keeps its own
                expected = self.state_template(param, {**saved, "params": group["params"]})
                check_saved_state(f"checkpoint state of {self.param_name(group, index)}", saved_state, expected)
        return completed


def update_factor(algorithm: Algorithm, shape, group: dict) -> float:
    """What multiplies Δ of an (oriented) matrix ``shape``: 1 as published, or with ``lr_scale="adamw"`` the
    algorithm's factor that gives its update AdamW's RMS (:meth:`Algorithm.adamw_factor`)."""
    if not algorithm.matrix or group.get("lr_scale", "published") == "published":
        return 1.0
    return algorithm.adamw_factor(tuple(shape[-2:]), group)


def _placeholder(state: dict) -> bool:
    """A state entry of a param held by another rank: meta tensors only."""
    return all(torch.is_tensor(v) and v.device.type == "meta" for v in state.values())


def _installed(key: str, value: torch.Tensor, device) -> torch.Tensor:
    """A saved state value as the optimizer keeps it: host counters on the CPU (an integer step), the rest a
    fresh copy on the param's device."""
    if key in HOST_STATE:
        value = value.detach().to("cpu", copy=True)
        return value.to(torch.int64) if key == "step" and value.is_floating_point() else value
    return value.detach().to(device, copy=True)


def evaluate_closure(closure):
    """torch.optim's closure protocol: recompute the loss (and gradients) with autograd on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
