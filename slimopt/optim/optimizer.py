"""SlimOptimizer: the torch.optim.Optimizer that SUMO, SWAN and GaLore share.

A step reads top to bottom:
1. check every group's hyperparameters and every gradient, before touching
   anything, so rejected input never leaves a half-applied step;
2. route each parameter: matrices to the group's algorithm, everything else
   (1-D, scalars, 1×n) to the AdamW fallback;
3. bucket same-shape matrices and run the algorithm once per bucket on the
   stacked gradients (``foreach=True``), or once per matrix through the
   algorithm's reference step (``foreach=False``);
4. apply ``W ← W·(1 − lr·wd) − lr·Δ`` in the parameter's dtype.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch

from slimopt.optim.algorithm import REGISTRY, Algorithm, check_int, check_shared
from slimopt.transforms.orthogonalize import compute_dtype
from slimopt.transforms.subspace import sketch_seed

SHARED_HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps")
# Integer state that stays on the CPU, as torch keeps "step".
HOST_STATE = ("step", "seed")


class SlimOptimizer(torch.optim.Optimizer):
    """Base class: routes each param group to its ``"algorithm"`` and batches the work.

    Keyword-only options (optimizer-wide, not per group):
        foreach: stack same-shape matrices and run one batched call per shape
            (default). False runs the per-matrix reference step instead.
        skip_nonfinite: on a NaN/Inf gradient skip the whole step and count it
            in ``skipped_steps`` instead of raising.
        max_stack: at most this many matrices per batched call; bounds the
            transient memory of the stacked fp32 gradients.

    A group naming another algorithm than the class's own gets that algorithm's
    defaults for its specific hyperparameters; ``lr``, ``weight_decay``,
    ``betas`` and ``eps`` come from the constructor for every group.
    """

    algorithm: str

    def __init__(self, params, defaults: dict, *, foreach: bool = True,
                 skip_nonfinite: bool = False, max_stack: int = 16):
        check_int({"max_stack": max_stack}, "max_stack", low=1)
        self.foreach = foreach
        self.skip_nonfinite = skip_nonfinite
        self.max_stack = max_stack
        self.skipped_steps = 0
        self._warned_fallback: set[int] = set()
        super().__init__(params, {"algorithm": self.algorithm, **defaults})

    # ---------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict) -> None:
        name = param_group.get("algorithm", self.defaults["algorithm"])
        own = name == self.defaults["algorithm"]
        for key, default in _algorithm(name).defaults.items():
            param_group.setdefault(key, self.defaults[key] if own else default)
        for key in SHARED_HYPERPARAMETERS:
            param_group.setdefault(key, self.defaults[key])
        param_group["algorithm"] = name
        self._validate_group(param_group)
        super().add_param_group(param_group)

    @staticmethod
    def _validate_group(group: dict) -> None:
        algorithm = _algorithm(group.get("algorithm"))
        missing = [k for k in (*SHARED_HYPERPARAMETERS, *algorithm.defaults) if k not in group]
        if missing:
            raise ValueError(f"param group for algorithm={algorithm.name!r} lacks hyperparameters {missing}")
        check_shared(group)
        algorithm.validate(group)

    # --------------------------------------------------------------- routing

    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return names[index]
        return f"parameter {self._position(group['params'][index])}"

    def _route(self, param: torch.Tensor, group: dict, index: int) -> tuple[Algorithm, tuple[int, ...], bool]:
        """(algorithm, shape it sees, transposed?) for one parameter of a group."""
        algorithm = REGISTRY[group["algorithm"]]
        if not algorithm.matrix:
            return algorithm, tuple(param.shape), False
        if param.ndim >= 2 and param.numel() > 0:
            rows = param.shape[0]
            cols = param.numel() // rows
            if min(rows, cols) >= 2:
                transposed = (rows < cols) if algorithm.orientation == "tall" else (rows > cols)
                return algorithm, ((cols, rows) if transposed else (rows, cols)), transposed
        if id(param) not in self._warned_fallback:
            self._warned_fallback.add(id(param))
            warnings.warn(
                f"slimopt: {self._param_name(group, index)} has shape {tuple(param.shape)}, which is not "
                f"a matrix with both sides ≥ 2; algorithm {algorithm.name!r} uses the AdamW fallback for it",
                stacklevel=5,
            )
        return REGISTRY["adamw"], tuple(param.shape), False

    def _position(self, param: torch.Tensor) -> int:
        """Index of ``param`` across all groups: fixes its subspace seed."""
        return next(i for i, p in enumerate(p for g in self.param_groups for p in g["params"]) if p is param)

    def _init_state(self, param, algorithm, shape, group, device=None) -> dict:
        """Fresh state; ``device="meta"`` gives only the shapes and dtypes, for checking checkpoints."""
        device = device or param.device
        state = algorithm.init_state(
            shape, group, dtype=compute_dtype(param.dtype), device=device,
            seed=sketch_seed(group.get("seed", 0), self._position(param)),
        )
        if algorithm.stateful:
            state["step"] = torch.tensor(0, dtype=torch.int64)
        host = "meta" if str(device) == "meta" else "cpu"
        return {k: v.to(host) if k in HOST_STATE else v for k, v in state.items()}

    # ------------------------------------------------------------------ step

    def _check_gradients(self) -> list[tuple[dict, int, torch.Tensor]] | None:
        """Validate everything a step reads. Returns the work list, or None to skip."""
        work = []
        for group in self.param_groups:
            self._validate_group(group)
            for index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if grad.layout != torch.strided:
                    raise TypeError(f"slimopt does not support sparse gradients ({self._param_name(group, index)})")
                if grad.is_complex() or param.is_complex():
                    raise TypeError(f"slimopt does not support complex parameters ({self._param_name(group, index)})")
                work.append((group, index, grad))
        if not work or _all_finite([grad for _, _, grad in work]):
            return work
        group, index, grad = next(item for item in work if not bool(torch.isfinite(item[2]).all()))
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return None
        count = int((~torch.isfinite(grad)).sum())
        raise FloatingPointError(
            f"non-finite gradient in {self._param_name(group, index)}: {count} of {grad.numel()} entries are "
            "NaN or Inf; nothing was updated (pass skip_nonfinite=True to skip such steps)"
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        work = self._check_gradients()
        if work is None:
            return loss

        buckets = defaultdict(list)
        for group, index, grad in work:
            param = group["params"][index]
            algorithm, shape, transposed = self._route(param, group, index)
            state = self.state[param]
            if algorithm.stateful and not state:
                state.update(self._init_state(param, algorithm, shape, group))
            step = int(state["step"]) if "step" in state else 0
            # An elementwise update (AdamW) gains nothing from stacking, which would only copy its tensors.
            alone = None if algorithm.matrix else id(param)
            key = (id(group), algorithm.name, shape, param.dtype, param.device, step, alone)
            buckets[key].append((group, param, grad, transposed))

        for (_, name, shape, _, _, step, _), items in buckets.items():
            for start in range(0, len(items), self.max_stack):
                self._step_bucket(REGISTRY[name], shape, step, items[start:start + self.max_stack])
        return loss

    def _step_bucket(self, algorithm: Algorithm, shape, step: int, items) -> None:
        group = items[0][0]
        params = [param for _, param, _, _ in items]
        states = [self.state[param] for param in params]
        grads = [_oriented(grad, shape, transposed) for _, _, grad, transposed in items]
        dtype = compute_dtype(grads[0].dtype)
        keys = [k for k in states[0] if k != "step"]

        if self.foreach:
            G = (grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)).to(dtype)
            stacked = {k: _stack([s[k] for s in states]) for k in keys}
            delta, new_state = algorithm.update(G, stacked, group, step)
            for k in keys:
                _write_back([s[k] for s in states], new_state[k])
            deltas = list(delta.unbind(0))
        else:
            deltas = []
            for grad, state in zip(grads, states):
                delta, new_state = algorithm.reference_update(grad.to(dtype), {k: state[k] for k in keys}, group, step)
                for k in keys:
                    state[k].copy_(new_state[k])
                deltas.append(delta)

        for state in states:
            if "step" in state:
                state["step"] += 1
        deltas = [(d.mT if transposed else d).reshape(param.shape)
                  for d, (_, param, _, transposed) in zip(deltas, items)]
        _apply_update(params, deltas, group["lr"], group["weight_decay"])

    # ----------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking the checkpoint fully; a corrupt one raises and changes nothing.

        Unlike torch.optim.Optimizer, state tensors keep their saved dtype (fp32
        moments of a bf16 parameter stay fp32), so resuming is exact.
        """
        self._check_state_dict(state_dict)
        # torch restores the groups; the state is installed here, without torch's cast to the param dtype.
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    k: v.detach().clone() if k in HOST_STATE else v.detach().to(param.device, copy=True)
                    for k, v in state_dict["state"][saved_id].items()
                }
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def _check_state_dict(self, state_dict) -> None:
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"checkpoint param group {group_index} has {len(saved['params'])} params, "
                    f"this optimizer's has {len(group['params'])}"
                )
            self._validate_group(saved)
            for index, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(saved_id)
                if saved_state is None:
                    continue
                where = f"checkpoint state of {self._param_name(group, index)}"
                merged = {**saved, "params": group["params"]}
                algorithm, shape, _ = self._route(param, merged, index)
                expected = self._init_state(param, algorithm, shape, merged, device="meta")
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
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValueError(f"{where}: {key!r} contains NaN or Inf")
                    if key == "step" and int(value) < 0:
                        raise ValueError(f"{where}: step={int(value)} is negative")


def evaluate_closure(closure):
    """torch.optim's closure protocol: recompute the loss (and gradients) with autograd on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """One fused norm pass (a NaN or Inf entry makes its norm non-finite), one host sync per dtype.

    A norm can also overflow on huge finite gradients, so a non-finite norm is
    confirmed entry by entry before the step is rejected.
    """
    by_dtype = defaultdict(list)  # fp64 norms stay fp64 (a norm cannot narrow its input's dtype)
    for grad in grads:
        by_dtype[torch.float64 if grad.dtype == torch.float64 else torch.float32].append(grad)
    if all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, dtype=dtype))).all())
           for dtype, group in by_dtype.items()):
        return True
    return all(bool(torch.isfinite(grad).all()) for grad in grads)


def _algorithm(name) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"invalid algorithm={name!r}: expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def _oriented(grad: torch.Tensor, shape, transposed: bool) -> torch.Tensor:
    return grad.reshape(shape[::-1]).mT if transposed else grad.reshape(shape)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack along a new dim 0; a single tensor becomes a view, so in-place updates reach the state."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _write_back(targets: list[torch.Tensor], stacked: torch.Tensor) -> None:
    if len(targets) == 1 and stacked.data_ptr() == targets[0].data_ptr():
        return  # updated in place through the view
    torch._foreach_copy_(targets, list(stacked.unbind(0)))


def _apply_update(params, deltas, lr: float, weight_decay: float) -> None:
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
            param.copy_(param.to(delta.dtype).mul_(decay).add_(delta, alpha=-lr))

