"""The standard split of a model's parameters into matrix groups and an AdamW group."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from slimopt.optim.optimizer import FallbackWarning, warn_user

# Module names (any dotted component) whose Linear layers are heads, not hidden
# matrices: they map to or from a vocabulary or a label set and train with AdamW.
DEFAULT_HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score", "qa_outputs")


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_hidden_matrix(
    model: nn.Module, module_name: str, module: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES
) -> bool:
    """Default rule: an ``nn.Linear`` or HF ``Conv1D`` that is not the model's output head nor named like a head."""
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        return False
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is module:
        return False
    return not set(module_name.split(".")) & set(head_names)


def param_groups(
    model: nn.Module,
    *,
    is_matrix: Callable[[str, nn.Module], bool] | None = None,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    adamw: dict | None = None,
    **matrix_hparams,
) -> list[dict]:
    """Split ``model``'s trainable parameters into matrix groups and an ``"adamw"`` group.

    The matrix group holds the weights of hidden ``nn.Linear`` layers, and a
    second one (``"layout": "in_out"``) those of HF ``Conv1D`` layers, whose
    weights are stored transposed; the AdamW group holds everything else:
    embeddings, the LM head (tied or not), norms, biases and other 1-D
    parameters. The rule decides by module type and name, never by ``ndim``
    alone (an embedding is 2-D but is no hidden matrix).

    Warns (``FallbackWarning``) when no hidden matrix is found, and when weights
    with ≥ 2 dimensions other than embeddings and heads go to AdamW (e.g. the
    layers of a library whose linear class is not ``nn.Linear``).

    Args:
        is_matrix: replaces the rule: called as ``is_matrix(module_name, module)``
            for every module; a True puts that module's ``weight`` in a matrix group.
        head_names: dotted-name components that mark a Linear layer as a head.
        adamw: hyperparameters for the AdamW group only, e.g. ``{"lr": 3e-4}``.
        **matrix_hparams: hyperparameters for the matrix groups, e.g. ``rank=128``.

    Returns param groups with named parameters, so optimizer errors name them.
    A parameter shared between modules (a tied head) is listed once, and goes to
    AdamW if any module holding it does.
    """
    if is_matrix is None:
        def is_matrix(name, module):
            return is_hidden_matrix(model, name, module, head_names)

    matrix_ids, transposed_ids, adamw_ids, expected_in_adamw = set(), set(), set(), set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and is_matrix(module_name, module):
            (transposed_ids if is_conv1d(module) else matrix_ids).add(id(weight))
        else:
            adamw_ids.update(id(p) for p in module.parameters(recurse=False))
            if isinstance(module, nn.Embedding) or isinstance(module, nn.Linear) or is_conv1d(module):
                expected_in_adamw.update(id(p) for p in module.parameters(recurse=False))

    matrices, transposed, others = [], [], []
    for name, param in model.named_parameters():  # yields a shared parameter once
        if not param.requires_grad:
            continue
        if id(param) in adamw_ids:
            others.append((name, param))
        elif id(param) in matrix_ids:
            matrices.append((name, param))
        elif id(param) in transposed_ids:
            transposed.append((name, param))
        else:
            others.append((name, param))

    _warn_about_routing(model, matrices + transposed, others, expected_in_adamw)
    groups = []
    if matrices:
        groups.append({"params": matrices, **matrix_hparams})
    if transposed:
        groups.append({"params": transposed, "layout": "in_out", **matrix_hparams})
    if others:
        groups.append({"params": others, "algorithm": "adamw", **(adamw or {})})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def _warn_about_routing(model, matrices, others, expected_in_adamw) -> None:
    if not matrices and others:
        warn_user(f"slimopt.param_groups found no hidden matrix in {type(model).__name__}: every parameter trains "
                   "with plain AdamW. Its linear layers are not nn.Linear or HF Conv1D; pass is_matrix=... to route "
                   "them", FallbackWarning)
        return
    unexpected = [name for name, p in others if p.ndim >= 2 and id(p) not in expected_in_adamw]
    if unexpected:
        listed = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        warn_user(f"slimopt.param_groups: {len(unexpected)} weight(s) with ≥ 2 dimensions train with plain AdamW "
                   f"because their modules are not linear layers: {listed}; pass is_matrix=... to route them",
                   FallbackWarning)
