"""Swap a model's hidden nn.Linear layers for RSO layers (``apply``) and back (``merge``).

Everything ``apply`` is given is checked before the first module is swapped, so a bad argument leaves
the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from slimopt.optim.algorithm import check_choice, check_int
from slimopt.optim.groups import is_hidden_matrix
from slimopt.rso.layer import DISTRIBUTIONS, Projection, RSOLinear
from slimopt.transforms.subspace import sketch_seed

# Sibling layers that read the same input in HF LLaMA-family models (LLaMA, Mistral, Qwen, ...).
# With share_inputs=True each such set shares one P and one saved x·P.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Adaptation:
    """What ``apply`` did: the RSO layers by module name, and their projections in module order."""

    model: nn.Module
    layers: dict[str, RSOLinear]
    projections: list[Projection]

    def param_groups(self, adamw: dict | None = None, **rso_hparams) -> list[dict]:
        """An ``"rso"`` group with every B, and an ``"adamw"`` group with every other trainable parameter
        (embeddings, head, norms, biases, linear layers left out of ``targets``). Named, like
        ``slimopt.param_groups``, so optimizer errors name the parameter."""
        subspace = [(f"{name}.B", layer.B) for name, layer in self.layers.items()]
        subspace_ids = {id(B) for _, B in subspace}
        others = [(name, p) for name, p in self.model.named_parameters()
                  if p.requires_grad and id(p) not in subspace_ids]
        groups = [{"params": subspace, "algorithm": "rso", **rso_hparams}]
        if others:
            groups.append({"params": others, "algorithm": "adamw", **(adamw or {})})
        return groups

    def layers_reading(self, projection: Projection) -> list[RSOLinear]:
        return [layer for layer in self.layers.values() if layer.projection is projection]

    @torch.no_grad()
    def resample(self, projections: Iterable[Projection] | None = None) -> list[nn.Parameter]:
        """End the subproblem of these projections (default: all): W_k ← W_k + B Pᵀ, B ← 0, draw the next P.

        The model computes the same function afterwards. Returns the B parameters that were reset: with
        your own optimizer, reset their state too (e.g. ``optimizer.state.pop(B, None)``), since a new
        subproblem starts a fresh Adam. ``RSO.step`` does all of this itself every ``update_gap`` steps.
        """
        reset = []
        for projection in self.projections if projections is None else projections:
            layers = self.layers_reading(projection)
            for layer in layers:  # all of them, before P changes under them
                layer.merge_()
                reset.append(layer.B)
            projection.next_subproblem()
        return reset


def apply(model: nn.Module, rank: int = 128, targets: str | Iterable[str] | None = None,
          distribution: str = "gaussian", seed: int = 0, share_inputs: bool = True) -> Adaptation:
    """Swap ``model``'s hidden nn.Linear layers for RSO layers, in place, and return what was swapped.

    Args:
        rank: r, columns of P (and of B); below every adapted layer's in_features.
        targets: module names (the full dotted name or its last components, e.g. ``"q_proj"``) of the
            nn.Linear layers to adapt. Default: every hidden linear layer, that is every nn.Linear but
            the output head (``slimopt.optim.groups.is_hidden_matrix``). Frozen layers are left alone.
        distribution: ``"gaussian"`` (entries N(0, 1/r)) or ``"orthogonal"`` (Haar, scaled so E[P Pᵀ] = I).
        seed: P is drawn from a generator seeded by (seed, layer, subproblem).
        share_inputs: layers reading the same input (q/k/v, gate/up) share one P and one saved x·P.

    B and P take each layer's device and dtype: move the model first, then apply.
    """
    check_int({"rank": rank}, "rank", low=1)
    check_choice({"distribution": distribution}, "distribution", DISTRIBUTIONS)
    check_int({"seed": seed}, "seed", low=0)
    if not isinstance(share_inputs, bool):
        raise ValueError(f"invalid share_inputs={share_inputs!r}: expected True or False")
    chosen = _chosen_layers(model, targets)
    for name, linear in chosen.items():
        if rank >= linear.in_features:
            raise ValueError(
                f"invalid rank={rank}: not below in_features={linear.in_features} of {name}. RSO gives nothing "
                f"there (x·P would be as large as x and B as large as the weight); use a rank < "
                f"{linear.in_features} or leave {name} out of targets"
            )

    # Sibling layers reading the same input share one projection (if share_inputs); every other layer
    # gets its own. Each projection draws from its own seed.
    projections, projection_of, shared = [], {}, {}
    for name, linear in chosen.items():
        parent, _, leaf = name.rpartition(".")
        siblings = next((names for names in SHARED_INPUTS if leaf in names), None)
        key = (parent, siblings, linear.in_features, linear.weight.device, linear.weight.dtype)
        if not (share_inputs and siblings and key in shared):
            shared[key] = Projection(linear.in_features, rank, distribution, sketch_seed(seed, len(projections)),
                                     device=linear.weight.device, dtype=linear.weight.dtype)
            projections.append(shared[key])
        projection_of[name] = shared[key]

    owned = set()  # the first layer reading a projection owns it: its state dict entries then appear once
    layers = {}
    for name, linear in chosen.items():
        projection = projection_of[name]
        layers[name] = RSOLinear(linear, projection, owns_projection=id(projection) not in owned)
        owned.add(id(projection))
    _swap(model, {id(chosen[name]): layer for name, layer in layers.items()})
    return Adaptation(model, layers, projections)


def merge(model: nn.Module) -> nn.Module:
    """Replace every RSO layer of ``model`` by a plain nn.Linear holding W_k + B Pᵀ, in place.

    The model computes the same function, saves and loads like the original architecture, and its weights
    are trainable again. An RSO optimizer built on the model is of no further use.
    """
    layers = {id(m): m for m in model.modules() if isinstance(m, RSOLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RSO layers to merge (slimopt.rso.apply was not called)")
    _swap(model, {key: layer.to_linear() for key, layer in layers.items()})
    return model


def _chosen_layers(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """The nn.Linear layers to adapt, by name; raises ValueError if there are none or a target is unknown."""
    if any(isinstance(m, RSOLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has RSO layers: slimopt.rso.apply was called on it before")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: RSO adapts linear layers only")

    if targets is None:
        chosen = {name: m for name, m in linears.items() if is_hidden_matrix(model, name, m)}
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no hidden nn.Linear layers (only heads: "
                             f"{sorted(linears)}); name the layers to adapt with targets=")
    else:
        names = (targets,) if isinstance(targets, str) else tuple(targets)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"invalid targets={targets!r}: expected module names, e.g. ['q_proj', 'v_proj']")
        unmatched = [t for t in names if not any(_matches(name, t) for name in linears)]
        if unmatched:
            leaves = sorted({name.rpartition(".")[2] for name in linears})
            raise ValueError(f"invalid targets={targets!r}: {unmatched} match no nn.Linear module of "
                             f"{type(model).__name__} (its linear layers are named {leaves})")
        chosen = {name: m for name, m in linears.items() if any(_matches(name, t) for t in names)}

    chosen = {name: m for name, m in chosen.items() if m.weight.requires_grad}
    if not chosen:
        raise ValueError(f"every targeted nn.Linear layer of {type(model).__name__} is frozen: nothing to train")
    owners = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, linear in chosen.items():
        if owners[id(linear.weight)] > 1:
            raise ValueError(f"{name}.weight is tied to another module's parameter; RSO freezes it, which would "
                             f"freeze the other module too: leave {name} out of targets")
    return chosen


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(child)]`` wherever ``child`` sits in the model (a module may sit in several places)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
