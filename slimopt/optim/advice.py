"""Warnings that save memory, given once per optimizer when it is built (``RoutingWarning``).

- A rank at or above a matrix's smaller side: the rank is clamped to that side, the matrix is not low-rank, and
  its state is about as large as AdamW's (SUMO: Q m×n + M n×n, ≥ AdamW's 2·m·n for a square matrix; GaLore more).
  The warning names the matrices and gives their state bytes against AdamW's.
- Embeddings or output heads in a matrix algorithm's group, which ``slimopt.param_groups(model)`` would give
  AdamW: the naive swap ``SUMO(model.named_parameters())``. Recognized by parameter name
  (:func:`~slimopt.optim.routing.looks_like_embedding_or_head`), so only where names are known: torch's
  ``model.named_parameters()``, or groups of (name, param) pairs as ``slimopt.param_groups`` builds them.
  A plain ``model.parameters()`` carries no names; a matrix group that mixes matrices with 1-D parameters,
  as ``model.parameters()`` does, gets one warning saying that it cannot tell (slimopt.hf, which knows the
  model, also checks its input and output embeddings by identity).
"""

from __future__ import annotations

import torch

from slimopt.optim.routing import RoutingWarning, looks_like_embedding_or_head, warn_user
from slimopt.transforms.numerics import compute_dtype

MiB = 2**20


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _bytes(count: int) -> str:
    return f"{count / MiB:.2f} MiB" if count >= MiB // 10 else f"{count:,} bytes"


def _state_nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def adamw_state_bytes(param: torch.Tensor) -> int:
    """Bytes of slimopt's AdamW state for ``param``: two moments in the compute dtype and an int64 step."""
    return 2 * param.numel() * compute_dtype(param.dtype).itemsize + 8


def _leader() -> bool:
    """Warn once per job, not once per rank."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def warn_at_construction(optimizer) -> None:
    """The optimizer's once-per-optimizer warnings (see the module)."""
    if not _leader():
        return
    warn_about_rank(optimizer)
    warn_about_embeddings(optimizer)


def _matrix_items(optimizer):
    """(group, index, param, route) of every trainable param that its group's matrix algorithm updates."""
    for group in optimizer.param_groups:
        algorithm = optimizer._algorithm(group["algorithm"])
        if not algorithm.matrix:
            continue
        for index, param in enumerate(group["params"]):
            if not param.requires_grad:
                continue
            route = optimizer.route(param, group)
            if route.algorithm is algorithm:
                yield group, index, param, route


def warn_about_rank(optimizer) -> None:
    """One RoutingWarning for every matrix whose group's rank is ≥ its smaller side."""
    clamped, ranks, state, adamw, sides = [], set(), 0, 0, set()
    for group, index, param, route in _matrix_items(optimizer):
        rank = group.get("rank")
        if "rank" not in optimizer._algorithm(group["algorithm"]).defaults or rank is None:
            continue
        side = min(route.shape)
        if rank < side:
            continue
        clamped.append(f"{optimizer.param_name(group, index)} ({'×'.join(map(str, param.shape))})")
        ranks.add(rank)
        sides.add(side)
        state += _state_nbytes(optimizer.state_template(param, group))
        adamw += adamw_state_bytes(param)
    if not clamped:
        return
    name = type(optimizer).__name__
    rank = f"rank={next(iter(ranks))}" if len(ranks) == 1 else f"ranks {sorted(ranks)}"
    warn_user(f"slimopt: {name}'s {rank} is ≥ the smaller side of {len(clamped)} matrices "
              f"({_listed(clamped)}), so it is clamped to that side and they are not low-rank: their state takes "
              f"{_bytes(state)} against AdamW's {_bytes(adamw)} ({state / adamw:.2f}×). A rank below "
              f"{min(sides)} makes all of them low-rank", RoutingWarning)


def warn_about_embeddings(optimizer, known: dict[int, str] | None = None) -> None:
    """One RoutingWarning for the embeddings and output heads a matrix algorithm would update: by name where the
    groups carry names, and by identity for the params in ``known`` (id → name; slimopt.hf passes the model's
    input and output embeddings). Without names, one warning if a matrix group mixes matrices with 1-D params,
    as ``model.parameters()`` does. Warns at most once per optimizer."""
    if getattr(optimizer, "_warned_embeddings", False) or not _leader():
        return
    known = known or {}
    flagged, unnamed = [], []
    for group, index, param, _ in _matrix_items(optimizer):
        named = group.get("param_names") is not None
        param_name = optimizer.param_name(group, index)
        if id(param) in known or (named and looks_like_embedding_or_head(param_name)):
            flagged.append(param_name if named else known[id(param)])
        elif not named:
            unnamed.append(group)
    name = type(optimizer).__name__
    fix = f"{name}(slimopt.param_groups(model), ...)"
    if flagged:
        optimizer._warned_embeddings = True
        warn_user(f"slimopt: {name} updates {_listed(flagged)} with its matrix algorithm, but by their names they "
                  "are embeddings or an output head, not hidden matrices; slimopt.param_groups(model) trains them "
                  f"with AdamW. Fix: {fix}",
                  RoutingWarning)
        return
    for group in {id(g): g for g in unnamed}.values():
        flat = sum(p.ndim < 2 for p in group["params"])
        if flat:
            optimizer._warned_embeddings = True
            warn_user(f"slimopt: {name} got unnamed parameters, matrices and {flat} 1-D ones in one "
                      f"{group['algorithm']!r} group, as model.parameters() gives them: if they are a model's, "
                      "its embeddings and output head are updated by the matrix algorithm too (slimopt cannot "
                      "tell them apart without names; model.named_parameters() lets it check). Fix: "
                      f"{fix}, which gives embeddings, heads, norms and biases AdamW", RoutingWarning)
            return
