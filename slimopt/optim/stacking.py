"""Stacking: same-shape matrices step as one batch, on state that stays stacked between steps.

The first time a run of params steps together, their per-param state tensors are concatenated once into
(Σcount, ...) stacks, and every param's state entries become views into them. Later steps find the views in
place and reuse the stacks: a step neither re-stacks nor copies back. ``torch.save`` stores the shared storage
once; DCP clones each view. Loading a state dict replaces the entries, which the next step notices.
"""

from __future__ import annotations

import torch

# Integer state that stays on the CPU, as torch keeps "step": host counters, never stacked on a device.
HOST_STATE = ("step", "seed")


def chunk_by_bytes(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of consecutive runs whose sizes add up to at most ``max_bytes`` (a larger one goes alone): how a
    step splits its stacks and its exchanges, and how ``slimopt memory`` predicts them."""
    chunks, total = [], 0
    for index, size in enumerate(sizes):
        if not chunks or total + size > max_bytes:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks


class Stacks:
    """The stacked state of every run of params that stepped together, keyed by the params' ids."""

    def __init__(self):
        self._stacks: dict[tuple[int, ...], tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] = {}

    def clear(self) -> None:
        self._stacks.clear()

    def get(self, params, states: list[dict], counts: list[int]) -> dict[str, torch.Tensor]:
        """The params' state as (Σcounts, ...) tensors that persist between steps (built on first use)."""
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
            parts = {k: stacked[k].split(counts) for k in keys}
            for i, state in enumerate(states):
                state.update({k: parts[k][i].reshape(state[k].shape) for k in keys})
        self._stacks[ids] = (stacked, [{k: state[k] for k in keys} for state in states])
        return stacked


def _concat(tensors: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Per-parameter states along one batch dim; a single one becomes a view, so in-place updates reach it."""
    batched = [t if count > 1 else t.unsqueeze(0) for t, count in zip(tensors, counts)]
    return batched[0] if len(batched) == 1 else torch.cat(batched)
