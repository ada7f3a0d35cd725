"""RSO: randomized subspace optimization (Chen, Zhang, Liu, Yuan & Wen, 2025).

Per adapted layer W (n_out × n_in), subproblem k, with P_k (n_in × r) random and frozen:

    minimize over B (n_out × r), from B = 0:   f(W_k + B P_kᵀ) + (proximal / 2)·‖B‖²
    inner solver: Adam on B (the proximal term enters B's gradient as proximal·B)
    every update_gap steps:  W_{k+1} = W_k + B P_kᵀ,  B ← 0,  B's Adam state ← 0,  draw P_{k+1}

Every other trainable parameter (embeddings, head, norms, biases) trains with plain AdamW.
State per adapted layer: B's two moments (2·n_out·r) and a step; W_k has no gradient and no state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from slimopt.optim import ALGORITHMS
from slimopt.optim.adamw import AdamWAlgorithm
from slimopt.optim.algorithm import check_int, check_number
from slimopt.optim.optimizer import SlimOptimizer, evaluate_closure
from slimopt.rso.surgery import Adaptation, apply

# Off by default: on a small LLaMA (benchmarks/rso_memory.py's loss setup, 3 seeds) every positive value
# tried raised the validation loss: 1e-4 by 0.05, 1e-3 by 0.09, 1e-2 by 0.26. Adam already bounds each
# step of B; the proximal term only fights the (small) gradient.
PROXIMAL = 0.0


class RSOAlgorithm(AdamWAlgorithm):
    """Adam, elementwise, on the B's of an RSO optimizer.

    The proximal term and the end of each subproblem need the model's layers, so ``RSO.step`` does them;
    this class holds the group's hyperparameters and the Adam step.
    """

    name = "rso"
    defaults = {"update_gap": 200, "proximal": PROXIMAL}

    def validate(self, group):
        check_int(group, "update_gap", low=1)
        check_number(group, "proximal", low=0.0)


class RSO(SlimOptimizer):
    """RSO on ``model``: swaps its hidden nn.Linear layers for RSO layers (``slimopt.rso.apply``) and
    optimizes their B's with Adam, everything else with AdamW.

        optimizer = slimopt.rso.RSO(model, lr=1e-3, rank=128)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        slimopt.rso.merge(model)   # plain nn.Linear layers again, for saving or inference

    Args:
        model: modified in place; move it to its device and dtype first. Or the :class:`Adaptation` that
            ``slimopt.rso.apply`` returned, whose surgery settings then hold: with FSDP2, ``apply`` first,
            then ``fully_shard``, then build RSO, so that it holds the sharded parameters.
        lr: learning rate, for B and for the AdamW group.
        rank, targets, distribution, seed, share_inputs: see :func:`slimopt.rso.apply`.
        update_gap: Adam steps per subproblem; then W_k absorbs B Pᵀ and a new P is drawn.
        proximal: 1/η of the subproblem's proximal term (1/(2η))·‖B‖²; 0 turns it off.
        weight_decay: decoupled, on the whole weight: W_k and B both shrink by (1 − lr·wd), and the
            AdamW group as usual.
        betas, eps: Adam settings, for B and the AdamW group.
        maximize: maximize the objective, as in torch.optim.
        foreach, skip_nonfinite, stochastic_rounding: see :class:`slimopt.optim.SlimOptimizer`.

    ``optimizer.adaptation`` holds the swapped layers and their projections. The model's state dict
    keeps W_k, B and each projection's seed and subproblem index (P is redrawn on load); the optimizer's
    keeps B's moments and steps. Checkpoint both, and load them into a fresh model on which RSO was built
    with the same arguments.
    """

    algorithm = "rso"
    algorithms = {**ALGORITHMS, RSOAlgorithm.name: RSOAlgorithm()}

    def __init__(self, model: nn.Module | Adaptation, lr: float = 1e-3, rank: int = 128, update_gap: int = 200,
                 distribution: str = "gaussian", proximal: float = PROXIMAL, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0,
                 targets: str | Iterable[str] | None = None, share_inputs: bool = True, maximize: bool = False,
                 **options):
        defaults = dict(lr=lr, update_gap=update_gap, proximal=proximal, betas=betas, eps=eps,
                        weight_decay=weight_decay, maximize=maximize)
        # Every hyperparameter is checked before apply() swaps a module: bad input leaves the model as it was.
        self.validate_group({**defaults, "algorithm": self.algorithm})
        if options.get("process_group") is not None:
            raise ValueError("RSO does not take process_group: its state is elementwise and small, so under DDP "
                             "every rank steps it (only B's gradients are all-reduced); under FSDP2 it is sharded")
        self.adaptation = model if isinstance(model, Adaptation) else apply(
            model, rank=rank, targets=targets, distribution=distribution, seed=seed, share_inputs=share_inputs)
        self._layer_of = {id(layer.B): layer for layer in self.adaptation.layers.values()}
        super().__init__(self.adaptation.param_groups(), defaults, **options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:  # a bad value raises before the proximal term touches a gradient
            self.validate_group(group)
        for name, layer in self.adaptation.layers.items():
            if id(layer.B) not in self._layer_of:
                raise RuntimeError(
                    f"{name}.B is no longer the parameter this optimizer holds: the model's parameters were replaced "
                    "after RSO was built (e.g. by fully_shard); build RSO after wrapping, from slimopt.rso.apply's "
                    "Adaptation")
        candidates = self._add_proximal_term()
        steps_before = [self._steps_taken(B) for _, B in candidates]
        super().step()
        # Only the B's that really stepped (not skipped, not an all-zero gradient) move their W_k.
        stepped = [(group, B) for (group, B), before in zip(candidates, steps_before) if self._steps_taken(B) > before]
        self._decay_frozen_weights(stepped)
        self._end_finished_subproblems()
        return loss

    def _steps_taken(self, B: nn.Parameter) -> int:
        state = self.state.get(B)
        return int(state["step"]) if state else 0

    def _add_proximal_term(self) -> list[tuple[dict, nn.Parameter]]:
        """B.grad += proximal·B, the gradient of the subproblem's objective. Returns the (group, B) stepped."""
        stepped = []
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["proximal"] != 0:
                # Maximizing f − (proximal/2)·‖B‖²: the step negates the gradient, so the term enters negated.
                alpha = -group["proximal"] if group["maximize"] else group["proximal"]
                torch._foreach_add_([p.grad for p in params], params, alpha=alpha)
            stepped += [(group, p) for p in params]
        return stepped

    def _decay_frozen_weights(self, stepped) -> None:
        """Decoupled weight decay of W = W_k + B Pᵀ: the step decayed B, this decays W_k."""
        for group, B in stepped:
            if id(B) in self._layer_of and group["weight_decay"] != 0:
                self._layer_of[id(B)].weight.mul_(1 - group["lr"] * group["weight_decay"])

    def _end_finished_subproblems(self) -> None:
        """Merge and resample every projection one of whose layers has taken update_gap steps."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for projection in self.adaptation.projections:
            layers = self.adaptation.layers_reading(projection)
            if any(int(self.state[layer.B].get("step", 0)) >= group_of[id(layer.B)]["update_gap"]
                   for layer in layers if layer.B in self.state):
                for B in self.adaptation.resample([projection]):
                    for value in self.state[B].values():  # a fresh Adam for the new subproblem
                        value.zero_()


def state_numel(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Elements of floating-point optimizer state per group algorithm, step counters left out.

    For RSO: ``{"rso": 2·Σ n_out·r over adapted layers (B's moments), "adamw": 2·(other trainable params)}``;
    a ``torch.optim`` optimizer's groups count as its class name in lower case.
    """
    counts = {}
    for group in optimizer.param_groups:
        name = group.get("algorithm", type(optimizer).__name__.lower())
        numel = sum(value.numel() for p in group["params"] for value in optimizer.state.get(p, {}).values()
                    if torch.is_tensor(value) and value.is_floating_point())
        counts[name] = counts.get(name, 0) + numel
    return counts
