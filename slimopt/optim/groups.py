"""The standard split of a model's parameters into a matrix group and an AdamW group."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

# Module names (any dotted component) whose Linear layers are heads, not hidden
# matrices: they map to or from a vocabulary or a label set and train with AdamW.
DEFAULT_HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score", "qa_outputs")


def is_hidden_matrix(
    model: nn.Module, module_name: str, module: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES
) -> bool:
    """Default rule: an ``nn.Linear`` that is not the model's output head nor named like a head."""
    if not isinstance(module, nn.Linear):
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
    """Split ``model``'s trainable parameters into a matrix group and an ``"adamw"`` group.

    The matrix group holds the weights of hidden ``nn.Linear`` layers; the AdamW
    group holds everything else: embeddings, the LM head (tied or not), norms,
    biases and other 1-D parameters. The rule decides by module type and name,
    never by ``ndim`` alone (an embedding is 2-D but is no hidden matrix).

    Args:
        is_matrix: replaces the rule: called as ``is_matrix(module_name, module)``
            for every module; a True puts that module's ``weight`` in the matrix group.
        head_names: dotted-name components that mark a Linear layer as a head.
        adamw: hyperparameters for the AdamW group only, e.g. ``{"lr": 3e-4}``.
        **matrix_hparams: hyperparameters for the matrix group, e.g. ``rank=128``.

    Returns param groups with named parameters, so optimizer errors name them.
    A parameter shared between modules (a tied head) is listed once, and goes to
    AdamW if any module holding it does.
    """
    if is_matrix is None:
        def is_matrix(name, module):
            return is_hidden_matrix(model, name, module, head_names)

    matrix_ids = set()
    adamw_ids = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and is_matrix(module_name, module):
            matrix_ids.add(id(weight))
        else:
            adamw_ids.update(id(p) for p in module.parameters(recurse=False))

    matrices, others = [], []
    for name, param in model.named_parameters():  # yields a shared parameter once
        if not param.requires_grad:
            continue
        target = matrices if id(param) in matrix_ids and id(param) not in adamw_ids else others
        target.append((name, param))

    groups = []
    if matrices:
        groups.append({"params": matrices, **matrix_hparams})
    if others:
        groups.append({"params": others, "algorithm": "adamw", **(adamw or {})})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups
