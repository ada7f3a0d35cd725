"""SlimOptimizer: the torch.optim.Optimizer that SUMO, SWAN, GaLore, AdamW and RSO share.

A step reads top to bottom:
1. check every group's hyperparameters and every gradient, before touching
   anything, so rejected input never leaves a half-applied step;
2. route each parameter: matrices (and batches of matrices, such as MoE
   experts) to the group's algorithm, everything else to the AdamW fallback;
3. bucket same-shape matrices, copy their gradients once into an fp32 stack
   (bounded in bytes), and run the algorithm once per stack on state that
   stays stacked between steps (``foreach=True``), or once per matrix through
   the algorithm's reference step (``foreach=False``);
4. apply ``W ← W·(1 − lr·wd) − lr·Δ``, in fp32 for low-precision weights;
   the AdamW fallback is one call of torch's own fused (or foreach) AdamW.

Host syncs: a step reads the device once, the largest |g| of every gradient in
one fused reduction per device, to refuse a NaN/Inf step before anything
changes and to recognize all-zero gradients. Nothing else in the batched path
reads a device value on the host (hyperparameters, step counters and sketch
seeds are host values).

Across ranks (FSDP2 DTensor params, or DDP with ``process_group``), step 3 runs
on each matrix's owner rank: see :mod:`slimopt.distributed`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from slimopt.distributed.engine import step_ddp, step_fsdp
from slimopt.distributed.placement import check_placement, is_sharded, local, local_shard_like
from slimopt.distributed.plan import Plan, build_plan
from slimopt.optim.algorithm import Algorithm, check_int, check_shared, read_lr
from slimopt.transforms.numerics import compute_dtype
from slimopt.transforms.subspace import sketch_seed

SHARED_HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps", "maximize")
# Integer state that stays on the CPU, as torch keeps "step".
HOST_STATE = ("step", "seed")
# How a param group's weights are matrices. "out_in": the last two dims are (out, in), as nn.Linear stores them,
# and any leading dims are a batch of matrices (MoE experts E × out × in); "in_out": the same, transposed, as HF's
# Conv1D (GPT-2) stores them; "conv": dim 0 is out and the rest flattens to in (a conv kernel out × in × k...).
LAYOUTS = ("out_in", "in_out", "conv")
# torch.optim flags that name implementations slimopt does not have.
TORCH_ONLY_FLAGS = ("fused", "capturable", "differentiable")


class FallbackWarning(UserWarning):
    """A parameter in a matrix group that is not a matrix: it trains with plain AdamW instead."""


@dataclass(frozen=True)
class Route:
    """How one parameter is updated: by which algorithm, as how many matrices of which (oriented) shape.

    ``count`` matrices of shape ``shape`` are the parameter's trailing two dimensions, batched over its
    leading ones (an MoE weight E × out × in is E matrices); ``transposed`` says whether the oriented
    matrix is the transpose of the stored one. Elementwise algorithms see the parameter's own shape.
    """

    algorithm: Algorithm
    shape: tuple[int, ...]
    count: int = 1
    transposed: bool = False


class SlimOptimizer(torch.optim.Optimizer):
    """Base class: routes each param group to its ``"algorithm"`` and batches the work.

    Keyword-only options (optimizer-wide, not per group):
        foreach: stack same-shape matrices and run one batched call per shape
            (default). False runs the per-matrix reference step instead.
        skip_nonfinite: on a NaN/Inf gradient skip the whole step and count it
            in ``skipped_steps`` instead of raising.
        max_stack_bytes: at most this many bytes of fp32 gradients per batched
            call (a larger single matrix goes alone). The step's transient
            memory is a small multiple of it (see ``slimopt.bench.memory``).
        stochastic_rounding: round the fp32 update of bf16 weights to bf16
            stochastically (unbiased) instead of to nearest, so that updates
            below half a bf16 ulp still move the weights on average. Draws from
            torch's global RNG on the weight's device.
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

    A parameter whose gradient is exactly zero everywhere is treated like one
    without a gradient: its state is created if missing, and nothing else
    changes (no update, no weight decay, no subspace refresh, no step counted).
    That is what torch's distributed checkpoint's state-dict helpers need: they
    initialize state by stepping once with zero gradients.
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
        self._positions: dict[int, int] = {}
        # Stacked matrix state, keyed by the ids of the params it holds, with the views each param's state holds.
        self._stacks: dict[tuple[int, ...], tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] = {}
        self.process_group = process_group
        self._plan: Plan | None = None
        self._plan_for: tuple[int, ...] | None = None  # the params the plan was built for
        super().__init__(params, {"algorithm": self.algorithm, "layout": "out_in", **defaults})
        self.plan()

    # ---------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict) -> None:
        name = param_group.get("algorithm", self.defaults["algorithm"])
        own = name == self.defaults["algorithm"]
        for key, default in self._algorithm(name).defaults.items():
            param_group.setdefault(key, self.defaults[key] if own else default)
        for key in (*SHARED_HYPERPARAMETERS, "layout"):
            param_group.setdefault(key, self.defaults[key])
        param_group["algorithm"] = name
        self._validate_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for index, param in enumerate(group["params"]):
            self._positions[id(param)] = len(self._positions)
            self._check_param(param, group, index)

    def _algorithm(self, name) -> Algorithm:
        if name not in self.algorithms:
            raise ValueError(f"invalid algorithm={name!r}: expected one of {sorted(self.algorithms)}")
        return self.algorithms[name]

    def _validate_group(self, group: dict) -> None:
        algorithm = self._algorithm(group.get("algorithm"))
        missing = [k for k in (*SHARED_HYPERPARAMETERS, *algorithm.defaults) if k not in group]
        if missing:
            raise ValueError(f"param group for algorithm={algorithm.name!r} lacks hyperparameters {missing}")
        check_shared(group)
        if group.get("layout", "out_in") not in LAYOUTS:
            raise ValueError(f"invalid layout={group['layout']!r}: expected one of {list(LAYOUTS)}")
        algorithm.validate(group)

    def _check_param(self, param: torch.Tensor, group: dict, index: int) -> None:
        name = self._param_name(group, index)
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
        if algorithm.matrix and self._route(param, group).algorithm is not algorithm:
            weight = "this ≥ 2-D weight" if param.ndim >= 2 else "it"
            warn_user(f"slimopt: {name} has shape {tuple(param.shape)}, whose last two dimensions are not a "
                       f"matrix with both sides ≥ 2; algorithm {algorithm.name!r} cannot update {weight}, so it "
                       "trains with the AdamW fallback", FallbackWarning)

    # --------------------------------------------------------------- routing

    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return names[index]
        return f"parameter {self._positions.get(id(group['params'][index]), index)}"

    def _route(self, param: torch.Tensor, group: dict) -> Route:
        algorithm = self._algorithm(group["algorithm"])
        if not algorithm.matrix:
            return Route(algorithm, tuple(param.shape))
        layout = group.get("layout", "out_in")
        conv = layout == "conv" and param.ndim >= 2
        matrix_view = (param.shape[0], math.prod(param.shape[1:])) if conv else param.shape
        if len(matrix_view) >= 2 and param.numel() > 0 and min(matrix_view[-2:]) >= 2:
            *lead, rows, cols = matrix_view
            stored_in_out = layout == "in_out"
            out_features, in_features = (cols, rows) if stored_in_out else (rows, cols)
            flip = {"tall": out_features < in_features, "wide": out_features > in_features,
                    "wide, square transposed": out_features >= in_features}[algorithm.orientation(group)]
            transposed = flip != stored_in_out
            shape = (cols, rows) if transposed else (rows, cols)
            count = 1
            for size in lead:
                count *= size
            return Route(algorithm, shape, count, transposed)
        return Route(self._algorithm("adamw"), tuple(param.shape))

    def _seeds(self, param: torch.Tensor, group: dict, count: int) -> list[int]:
        """Per-matrix subspace seeds, fixed by the parameter's position (and the matrix's index in a batch)."""
        base = sketch_seed(group.get("seed", 0), self._positions[id(param)])
        return [base] if count == 1 else [sketch_seed(base, index) for index in range(count)]

    def plan(self) -> Plan | None:
        """How the step is split over ranks (None: in one process), rebuilt when the params change.

        Building it is collective (every rank checks that all built the same plan), and it creates the state
        this rank holds at once, so that every rank's state exists, with the same keys, before any step (as
        torch's distributed checkpoint needs)."""
        params = tuple(id(p) for group in self.param_groups for p in group["params"])
        if params != self._plan_for:
            self._plan = build_plan(self, self.process_group)
            self._plan_for = params
            if self._plan is not None:
                self.create_state()
        return self._plan

    def create_state(self) -> None:
        """Create now the state a first step would create (what this rank holds): inert, as a step with zero
        gradients leaves it. Checkpoint loaders need it to know what to read."""
        plan = self.plan()
        for group in self.param_groups:
            for param in group["params"]:
                route = self._route(param, group)
                if route.algorithm.stateful and not self.state[param] and (plan is None or plan.holds_state(param)):
                    self.state[param].update(self._init_state(param, route, group))

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

    def _check_gradients(self, plan: Plan | None) -> list[tuple[dict, int, torch.Tensor, bool]] | None:
        """Validate everything a step reads. Returns (group, index, grad, all zero?) items, or None to skip.

        FSDP2: every rank checks its rows, and one all-reduce gives every rank the same verdict."""
        work = []
        for group in self.param_groups:
            self._validate_group(group)
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if grad.layout != torch.strided:
                    raise TypeError(f"slimopt does not support sparse gradients ({self._param_name(group, index)})")
                if grad.is_complex():
                    raise TypeError(f"slimopt does not support complex gradients ({self._param_name(group, index)})")
                work.append((group, index, grad))
        if not work:
            return []
        across_ranks = _max_over_ranks(plan.group) if plan is not None and plan.mode == "fsdp" else None
        largest = _largest_magnitudes([local(grad) for _, _, grad in work], across_ranks)
        bad = [item for item, value in zip(work, largest) if not _finite(value)]
        if not bad:
            return [(*item, value == 0) for item, value in zip(work, largest)]
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return None
        group, index, grad = bad[0]
        count = int((~torch.isfinite(local(grad))).sum())
        where = f"{count} of {local(grad).numel()} entries" + (" on this rank" if is_sharded(grad) else "")
        raise FloatingPointError(
            f"non-finite gradient in {self._param_name(group, index)}: {where} are NaN or Inf; nothing was "
            "updated (pass skip_nonfinite=True to skip such steps)"
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        plan = self.plan()
        work = self._check_gradients(plan)
        if work is None:
            return loss
        items = []
        for group, index, grad, all_zero in work:
            param = group["params"][index]
            route = self._route(param, group)
            state = self.state[param]
            if route.algorithm.stateful and not state and (plan is None or plan.holds_state(param)):
                state.update(self._init_state(param, route, group))
            if not all_zero:
                items.append((group, param, grad, route))
        if plan is None:
            self._step_here(items)
        elif plan.mode == "ddp":
            step_ddp(self, plan, items)
        else:
            step_fsdp(self, plan, items)
        return loss

    def _step_here(self, items) -> None:
        """Step (group, param, grad, route) items whose state this process holds."""
        buckets = defaultdict(list)
        for item in items:
            group, param, _, route = item
            state = self.state[param]
            step = int(state["step"]) if "step" in state else 0
            # Matrices stack by shape; an elementwise algorithm (AdamW) takes all its params in one torch call.
            shape = route.shape if route.algorithm.matrix else None
            buckets[(id(group), route.algorithm.name, shape, param.dtype, param.device, step)].append(item)
        for (_, name, shape, _, _, step), bucket in buckets.items():
            algorithm = self._algorithm(name)
            group = bucket[0][0]
            for chunk in self._chunks(bucket):  # elementwise too: low-precision weights step through fp32 copies
                params = [p for _, p, _, _ in chunk]
                if algorithm.matrix or not self.foreach:
                    # One expression: the chunk's Δs (its gradient stack) are freed before the next chunk's.
                    self._apply_update([local(p) for p in params], self._deltas(algorithm, shape, step, chunk),
                                       read_lr(group["lr"]), group["weight_decay"])
                else:
                    algorithm.step_params([local(p) for p in params], [local(g) for _, _, g, _ in chunk],
                                          [{k: local(v) for k, v in self.state[p].items()} for p in params],
                                          group, step, stochastic_rounding=self.stochastic_rounding)
                    self._count_step(params)

    def _chunks(self, items) -> list[list]:
        """Consecutive runs of items whose fp32 gradients take at most ``max_stack_bytes``."""
        sizes = [route.count * math.prod(route.shape) * compute_dtype(param.dtype).itemsize
                 for _, param, _, route in items]
        return [[items[i] for i in chunk] for chunk in chunk_by_bytes(sizes, self.max_stack_bytes)]

    def _deltas(self, algorithm: Algorithm, shape, step: int, items) -> list[torch.Tensor]:
        """Δ of each item, shaped as its param (an elementwise one: as its local rows); updates the items' state
        and counts the step. Batched matrices, or (``foreach=False``) the reference step of any algorithm."""
        if self.foreach:
            return self._stack_deltas(algorithm, shape, step, items)
        return self._reference_deltas(algorithm, step, items)

    def _stack_deltas(self, algorithm: Algorithm, shape, step: int, items) -> list[torch.Tensor]:
        """One batched call for a run of same-shape matrices: the gradients are copied once, into an fp32
        stack the algorithm may overwrite; the state is updated in place where it is stacked."""
        group = items[0][0]
        params = [param for _, param, _, _ in items]
        counts = [route.count for _, _, _, route in items]
        G = torch.empty((sum(counts), *shape), dtype=compute_dtype(params[0].dtype), device=params[0].device)
        torch._foreach_copy_(list(G.split(counts)), [_as_matrices(grad, route) for _, _, grad, route in items])
        if group["maximize"]:
            G.neg_()
        stacked = self._stacked_state(params, counts)
        delta, new_state = algorithm.update(G, stacked, group, step)
        for key, value in new_state.items():
            if value is not stacked[key]:
                stacked[key].copy_(value)
        self._count_step(params)
        return [_as_param(d, param, route) for d, (_, param, _, route) in zip(delta.split(counts), items)]

    def _stacked_state(self, params, counts) -> dict[str, torch.Tensor]:
        """The params' state as (Σcounts, ...) tensors that persist between steps.

        Built (one copy) the first time these params step together, or when their state was replaced (a
        load); afterwards every param's state entries are views into it, so a step neither re-stacks nor
        copies back. ``torch.save`` stores the shared storage once; DCP clones each view.
        """
        states = [self.state[p] for p in params]
        keys = [k for k in states[0] if k != "step"]
        ids = tuple(id(p) for p in params)
        if ids in self._stacks:
            stacked, views = self._stacks[ids]
            if all(state[k] is view[k] for state, view in zip(states, views) for k in keys):
                return stacked
        for other in [key for key in self._stacks if set(key) & set(ids)]:
            del self._stacks[other]
        stacked = {k: _concat([s[k] for s in states], counts) for k in keys}
        if len(params) > 1:  # a single param's stack is a view of its own state already
            stacked = {k: v.clone() for k, v in stacked.items()}
            for state, view in zip(states, _split(stacked, keys, counts, states)):
                state.update(view)
        self._stacks[ids] = (stacked, [{k: state[k] for k in keys} for state in states])
        return stacked

    def _reference_deltas(self, algorithm: Algorithm, step: int, items) -> list[torch.Tensor]:
        """The readable path (``foreach=False``): the algorithm's reference step, one matrix at a time."""
        group = items[0][0]
        params = [param for _, param, _, _ in items]
        deltas = []
        for _, param, grad, route in items:
            state = self.state[param]
            keys = [k for k in state if k != "step"]
            grad = -grad if group["maximize"] else grad
            matrices = _as_matrices(grad, route)
            per_matrix = []
            for index in range(route.count):
                own = {k: local(state[k]) if route.count == 1 else state[k][index] for k in keys}
                delta, new_state = algorithm.reference_update(matrices[index].to(compute_dtype(param.dtype)), own,
                                                              group, step)
                for k in keys:
                    own[k].copy_(new_state[k])
                per_matrix.append(delta)
            deltas.append(_as_param(torch.stack(per_matrix), param, route))
        self._count_step(params)
        return deltas

    def _count_step(self, params) -> None:
        for param in params:
            state = self.state[param]
            if "step" in state:
                state["step"] += 1

    def _apply_update(self, params, deltas, lr: float, weight_decay: float) -> None:
        """W ← W·(1 − lr·wd) − lr·Δ. Low-precision weights are updated in fp32 and rounded once."""
        decay = 1.0 - lr * weight_decay
        full = [(p, d) for p, d in zip(params, deltas) if p.dtype == d.dtype]
        if full:
            ps, ds = zip(*full)
            if decay != 1.0:
                torch._foreach_mul_(ps, decay)
            torch._foreach_add_(ps, ds, alpha=-lr)
        for param, delta in zip(params, deltas):
            if param.dtype != delta.dtype:
                updated = param.to(delta.dtype).mul_(decay).add_(delta, alpha=-lr)
                param.copy_(round_stochastically(updated) if self.stochastic_rounding else updated)

    # ----------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking the checkpoint fully; a corrupt one raises and changes nothing.

        Unlike torch.optim.Optimizer, state tensors keep their saved dtype (fp32
        moments of a bf16 parameter stay fp32), so resuming is exact. Host-side
        counters (``step``, ``seed``) stay on the CPU wherever the checkpoint put
        them. Pre-hooks see the checkpoint before it is checked, post-hooks the
        optimizer with its state installed, as in torch.
        """
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = {**state_dict, "param_groups": self._check_state_dict(state_dict)}
        # torch restores the groups; the state is installed here, without torch's cast to the param dtype.
        post_hooks = self._optimizer_load_state_dict_post_hooks
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_post_hooks = post_hooks
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    k: v.detach().to("cpu", copy=True) if k in HOST_STATE else v.detach().to(param.device, copy=True)
                    for k, v in state_dict["state"][saved_id].items()
                }
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
            self._validate_group(saved)
            completed.append(saved)
            for index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(saved_id)
                if saved_state is None:
                    continue
                where = f"checkpoint state of {self._param_name(group, index)}"
                merged = {**saved, "params": group["params"]}
                expected = self._init_state(param, self._route(param, merged), merged, device="meta")
                if set(saved_state) != set(expected):
                    raise ValueError(f"{where} has keys {sorted(saved_state)}, expected {sorted(expected)}")
                for key, reference in expected.items():
                    value = saved_state[key]
                    if not isinstance(value, torch.Tensor):
                        raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
                    if value.shape != reference.shape or value.is_floating_point() != reference.is_floating_point():
                        raise ValueError(
                            f"{where}: {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                            f"expected shape {tuple(reference.shape)} and dtype {reference.dtype}"
                        )
                    if value.is_floating_point() and not bool(torch.isfinite(local(value)).all()):
                        raise ValueError(f"{where}: {key!r} contains NaN or Inf")
                    if key == "step" and int(value) < 0:
                        raise ValueError(f"{where}: step={int(value)} is negative")
        return completed


def evaluate_closure(closure):
    """torch.optim's closure protocol: recompute the loss (and gradients) with autograd on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _largest_magnitudes(grads: list[torch.Tensor], across_ranks=None) -> list[float]:
    """max |g| of every gradient: NaN or Inf exactly when it has a non-finite entry, 0 exactly when it is all zero.

    One fused pass per (device, dtype) and one host transfer per device; unlike the
    2-norm, the max-norm neither overflows on large finite entries nor
    underflows on tiny ones. ``across_ranks`` combines each device's maxima with
    the other ranks' before the transfer.
    """
    by_device = defaultdict(lambda: defaultdict(list))
    for position, grad in enumerate(grads):
        if grad.numel() > 0:  # an empty gradient counts as all zero
            by_device[grad.device][grad.dtype].append(position)
    largest = [0.0] * len(grads)
    for by_dtype in by_device.values():
        # fp32 holds every bf16/fp16/fp32 max exactly; fp64 gradients keep fp64.
        dtype = torch.float64 if torch.float64 in by_dtype else torch.float32
        order = [p for positions in by_dtype.values() for p in positions]
        norms = torch.cat([torch.stack(torch._foreach_norm([grads[p] for p in positions], ord=float("inf"))).to(dtype)
                           for positions in by_dtype.values()])
        if across_ranks is not None:
            norms = across_ranks(norms)
        for position, value in zip(order, norms.tolist()):
            largest[position] = value
    return largest


def _max_over_ranks(group):
    """Elementwise max over the ranks of ``group``; NaN becomes Inf first, which MAX keeps on every backend."""
    def combine(norms: torch.Tensor) -> torch.Tensor:
        norms = torch.nan_to_num(norms, nan=math.inf)
        torch.distributed.all_reduce(norms, torch.distributed.ReduceOp.MAX, group=group)
        return norms
    return combine


def _finite(value: float) -> bool:
    return value - value == 0  # False for NaN and ±Inf


def chunk_by_bytes(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of consecutive runs whose sizes add up to at most ``max_bytes`` (a larger one goes alone): how a
    step splits its stacks, and how ``slimopt memory`` predicts them."""
    chunks, total = [], 0
    for index, size in enumerate(sizes):
        if not chunks or total + size > max_bytes:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks


def _as_matrices(grad: torch.Tensor, route: Route) -> torch.Tensor:
    """The gradient as (count, *route.shape): oriented matrices, or the elementwise tensor with a batch dim."""
    if not route.algorithm.matrix:
        return local(grad).unsqueeze(0)
    m, n = route.shape
    return grad.reshape(-1, n, m).mT if route.transposed else grad.reshape(-1, m, n)


def _as_param(delta: torch.Tensor, param: torch.Tensor, route: Route) -> torch.Tensor:
    """Δ shaped as the param: whole for a matrix (an owner's, under FSDP2), its local rows if elementwise."""
    return (delta.mT if route.transposed else delta).reshape(param.shape if route.algorithm.matrix
                                                              else local(param).shape)


def _concat(tensors: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Per-parameter states along one batch dim; a single one becomes a view, so in-place updates reach it."""
    batched = [t if count > 1 else t.unsqueeze(0) for t, count in zip(tensors, counts)]
    return batched[0] if len(batched) == 1 else torch.cat(batched)


def _split(stacked: dict[str, torch.Tensor], keys, counts: list[int], states) -> list[dict[str, torch.Tensor]]:
    """Each param's views of the stacked state, shaped as its own state entries."""
    parts = {k: stacked[k].split(counts) for k in keys}
    return [{k: parts[k][i].reshape(state[k].shape) for k in keys} for i, state in enumerate(states)]


def round_stochastically(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16, rounding up or down with probabilities given by the distance to each neighbour.

    bf16 is the top 16 bits of an fp32; adding uniform noise to the low 16 bits
    before truncating carries into the kept bits with exactly that probability.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    rounded = (bits + noise) & -65536  # clear the low 16 bits
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x).to(torch.bfloat16)


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn at the first caller outside slimopt and torch, however deep the call came from."""
    skipped = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
