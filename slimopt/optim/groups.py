"""The standard split of a model's parameters into matrix groups and an AdamW group."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimopt.optim.optimizer import FallbackWarning, warn_user
from slimopt.optim.routing import DEFAULT_HEAD_NAMES, LAYOUTS

__all__ = ["DEFAULT_HEAD_NAMES", "DEFAULT_ROUTER_NAMES", "default_layout", "is_conv1d", "is_fused_experts",
           "is_hidden_matrix", "is_router", "matrix_routes", "param_groups"]

# Module names (a dotted component) of MoE routers and gates: they score the experts, E × hidden (or 1 × hidden
# for Qwen2-MoE's shared-expert gate), and train with AdamW. So do modules whose class name ends in "Router"
# (transformers 5.x: MixtralTopKRouter, Qwen3MoeTopKRouter, ...).
DEFAULT_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_router(module_name: str, module: nn.Module) -> bool:
    """An MoE router or gate: its class name ends in "Router", or its name's last component is one of
    ``DEFAULT_ROUTER_NAMES`` (``gate``, ``router``, ``shared_expert_gate``; ``gate_proj`` is no router)."""
    return type(module).__name__.lower().endswith("router") or module_name.rpartition(".")[2] in DEFAULT_ROUTER_NAMES


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5.x fused MoE experts (``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ...): a
    module whose class name ends in "Experts" and that holds its experts' weights as 3-D parameters, E × out × in
    (``gate_up_proj`` E × 2i × h, ``down_proj`` E × h × i), or E × in × out where it says ``is_transposed``."""
    return type(module).__name__.endswith("Experts") and any(p.ndim == 3 for p in module.parameters(recurse=False))


def default_layout(module: nn.Module) -> str:
    """How ``module``'s weights are matrices (a group ``"layout"``): ``"in_out"`` for HF Conv1D and for fused
    experts stored transposed (``is_transposed``, e.g. gpt-oss), ``"conv"`` for torch's conv layers, else
    ``"out_in"`` (nn.Linear, and E × out × in experts as F.linear reads each ``weight[e]``)."""
    if is_conv1d(module) or (is_fused_experts(module) and getattr(module, "is_transposed", False) is True):
        return "in_out"
    if isinstance(module, _ConvNd):
        return "conv"
    return "out_in"


def is_hidden_matrix(
    model: nn.Module, module_name: str, module: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES
) -> bool:
    """Default rule for a module's ``weight``: an ``nn.Linear`` or HF ``Conv1D`` that is not the model's output
    head nor named like a head, no MoE router (:func:`is_router`), and with both sides ≥ 2 (an h → 1 gate or
    value head is no matrix)."""
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        return False
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is module:
        return False
    if is_router(module_name, module) or min(module.weight.shape) < 2:
        return False
    return not set(module_name.split(".")) & set(head_names)


def _default_route(model, module_name, module, local_name, param, head_names) -> str | None:
    """The default rule for one parameter: its layout if it is a hidden matrix, else None (AdamW)."""
    if local_name == "weight" and is_hidden_matrix(model, module_name, module, head_names):
        return default_layout(module)
    if param.ndim == 3 and is_fused_experts(module) and "bias" not in local_name \
            and not set(module_name.split(".")) & set(head_names):
        return default_layout(module)
    return None


def _expected_in_adamw(module_name, module, local_name, param) -> bool:
    """Parameters the default rule gives AdamW on purpose: no warning that a ≥ 2-D weight goes there."""
    return (param.ndim < 2 or "bias" in local_name or isinstance(module, (nn.Embedding, nn.Linear))
            or is_conv1d(module) or is_router(module_name, module))


def _rule_style(is_matrix: Callable) -> str:
    """"param": ``is_matrix(name, param, module)`` (three required positional arguments, or ``*args``);
    "module": the original ``is_matrix(module_name, module)``."""
    try:
        signature = inspect.signature(is_matrix)
    except (TypeError, ValueError):
        return "module"
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        return "param"
    return "param" if len([p for p in positional if p.default is p.empty]) >= 3 else "module"


def matrix_routes(model: nn.Module, *, is_matrix: Callable | None = None,
                  head_names: Iterable[str] = DEFAULT_HEAD_NAMES) -> tuple[dict[int, str], set[int], set[int]]:
    """How :func:`param_groups` routes ``model``'s parameters (frozen ones included).

    Returns ``(layouts, adamw_ids, expected_ids)``: ``layouts`` maps id(param) → the layout of a matrix
    param; ``adamw_ids`` are the params some holder routes to AdamW (a tied param goes to AdamW if any module
    holding it does); ``expected_ids`` the AdamW params that go there on purpose (no FallbackWarning)."""
    style = "default" if is_matrix is None else _rule_style(is_matrix)
    layouts, adamw_ids, expected = {}, set(), set()
    for module_name, module in model.named_modules():
        module_rule = None
        if style == "module":
            # Asked, as before, of modules with a weight; and now of those without one that hold ≥ 3-D params.
            holds_weight = isinstance(getattr(module, "weight", None), nn.Parameter)
            if holds_weight or any(p.ndim >= 3 for p in module.parameters(recurse=False)):
                module_rule = is_matrix(module_name, module)
        for local_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            decision = None
            if style == "param":
                decision = is_matrix(name, param, module)
                if decision is not None and decision is not True and decision is not False \
                        and decision not in LAYOUTS:
                    raise ValueError(f"is_matrix({name!r}, ...) returned {decision!r}: expected True, False, None "
                                     f"(the default rule decides) or a layout, one of {list(LAYOUTS)}")
                if decision is False:
                    expected.add(id(param))  # the user's own choice: no warning
            elif style == "module":
                # A True routes the module's weight; for a module without one (fused MoE experts) its ≥ 3-D params.
                chosen = (local_name == "weight") if holds_weight else (param.ndim >= 3)
                decision = True if module_rule and chosen else False
            if decision is None:
                decision = _default_route(model, module_name, module, local_name, param, head_names) or False
                if not decision and _expected_in_adamw(module_name, module, local_name, param):
                    expected.add(id(param))
            elif style == "module" and not decision and _expected_in_adamw(module_name, module, local_name, param):
                expected.add(id(param))
            if decision is True:
                decision = default_layout(module)
            if decision and id(param) not in adamw_ids:
                layouts.setdefault(id(param), decision)
            else:
                adamw_ids.add(id(param))
                layouts.pop(id(param), None)
    return layouts, adamw_ids, expected


def param_groups(
    model: nn.Module,
    *,
    is_matrix: Callable | None = None,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    adamw: dict | None = None,
    **matrix_hparams,
) -> list[dict]:
    """Split ``model``'s trainable parameters into matrix groups and an ``"adamw"`` group.

    The matrix groups hold the weights of hidden ``nn.Linear`` layers and the fused 3-D expert weights of
    transformers 5.x MoE models (``experts.gate_up_proj`` E × 2i × h, ``experts.down_proj`` E × h × i: E
    matrices each, ``"layout": "out_in"``); a second group (``"layout": "in_out"``) holds the weights of HF
    ``Conv1D`` layers and of experts stored transposed, E × in × out. The AdamW group holds everything else:
    embeddings, the LM head (tied or not), MoE routers and gates, norms, biases and other 1-D parameters. The
    rule decides by module type and name, never by ``ndim`` alone (an embedding is 2-D but is no hidden matrix).

    Warns (``FallbackWarning``) when no hidden matrix is found, and when weights with ≥ 2 dimensions other than
    embeddings, heads, routers and biases go to AdamW (e.g. the layers of a library whose linear class is not
    ``nn.Linear``); the warning gives an ``is_matrix=`` that routes them.

    Args:
        is_matrix: a rule of your own, in one of two forms:

            - ``is_matrix(name, param, module)`` (three arguments): called for every parameter with its full
              name (``"model.layers.0.mlp.experts.down_proj"``), the parameter and the module holding it.
              Return True to put it in a matrix group (its layout: ``"in_out"`` for Conv1D and transposed
              experts, ``"conv"`` for conv layers, else ``"out_in"``), a layout (``"out_in"``, ``"in_out"``,
              ``"conv"``) to choose it, False for AdamW, or None to leave it to the default rule; e.g.
              ``is_matrix=lambda name, param, module: name.endswith(".w1") or None`` adds ``w1`` to the default
              routing. A parameter held by several modules (a tied head) is asked under each of its names, and
              goes to AdamW if any answer does.
            - ``is_matrix(module_name, module)`` (two arguments, the original form): called for every module
              instead of the default rule; a True puts that module's ``weight`` in a matrix group (for a module
              without one, such as fused MoE experts, its ≥ 3-D parameters).
        head_names: dotted-name components that mark a Linear layer as a head.
        adamw: hyperparameters for the AdamW group only, e.g. ``{"lr": 3e-4}``.
        **matrix_hparams: hyperparameters for the matrix groups, e.g. ``rank=128``.

    Returns param groups with named parameters, so optimizer errors name them.
    A parameter shared between modules (a tied head) is listed once, and goes to
    AdamW if any module holding it does.
    """
    layouts, adamw_ids, expected = matrix_routes(model, is_matrix=is_matrix, head_names=head_names)
    by_layout = {layout: [] for layout in LAYOUTS}
    others = []
    for name, param in model.named_parameters():  # yields a shared parameter once
        if not param.requires_grad:
            continue
        if id(param) in layouts and id(param) not in adamw_ids:
            by_layout[layouts[id(param)]].append((name, param))
        else:
            others.append((name, param))

    _warn_about_routing(model, [p for group in by_layout.values() for p in group], others, expected)
    groups = []
    for layout, params in by_layout.items():
        if params:
            groups.append({"params": params, **({} if layout == "out_in" else {"layout": layout}), **matrix_hparams})
    if others:
        groups.append({"params": others, "algorithm": "adamw", **(adamw or {})})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def suggested_rule(names: list[str]) -> str:
    """An ``is_matrix=`` that adds ``names`` to the default routing, as code to paste."""
    if len(names) <= 6:
        chosen = "name in (" + ", ".join(repr(n) for n in names) + ("," if len(names) == 1 else "") + ")"
    else:
        suffixes = sorted({"." + ".".join(n.split(".")[-2:]) if n.count(".") >= 2 else n for n in names})
        chosen = "name.endswith((" + ", ".join(repr(s) for s in suffixes) + ("," if len(suffixes) == 1 else "") + "))"
    return f"lambda name, param, module: {chosen} or None"


def _warn_about_routing(model, matrices, others, expected) -> None:
    unexpected = [name for name, p in others if p.ndim >= 2 and id(p) not in expected]
    fix = (f"; to train them with the matrix algorithm, pass is_matrix={suggested_rule(unexpected)} (None leaves "
           "the other parameters to the default rule; return 'in_out' instead of True for weights stored "
           "(in, out))") if unexpected else ""
    if not matrices and others:
        warn_user(f"slimopt.param_groups found no hidden matrix in {type(model).__name__}: every parameter trains "
                  "with plain AdamW. Its linear layers are not nn.Linear, HF Conv1D or fused MoE experts"
                  + (fix or "; pass is_matrix=lambda name, param, module: ... to route them"), FallbackWarning)
        return
    if unexpected:
        listed = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        warn_user(f"slimopt.param_groups: {len(unexpected)} weight(s) with ≥ 2 dimensions train with plain AdamW "
                  f"because their modules are not linear layers or fused MoE experts: {listed}{fix}",
                  FallbackWarning)
