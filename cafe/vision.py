"""The vision tower runs once per distinct view.

LLaVA-OneVision encodes every image as a base view plus anyres crops. When an image fits one
crop of the grid at its own aspect ratio (a square image no larger than the tower's input, as
in the embedded scenes), that crop is pixel for pixel the base view, and the same image may also
appear twice in a batch. Identical inputs give identical features, so the tower takes each
distinct view once and its outputs are copied back to every place that shows it. The
parameters' gradients are the same sums as before (every copy's gradient flows through the
index), only the work is not repeated.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def distinct_views(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first occurrence of each distinct view, which distinct view each view is), or None when
    all differ. Exact comparison, in float32 (exact for every lower precision too)."""
    _, inverse = torch.unique(views.flatten(1).float(), dim=0, return_inverse=True)
    distinct = int(inverse.max()) + 1 if inverse.numel() else 0
    if distinct == views.shape[0]:
        return None
    order = torch.arange(views.shape[0], device=views.device)
    first = torch.full((distinct,), views.shape[0], dtype=order.dtype, device=views.device)
    return first.scatter_reduce(0, inverse, order, reduce="amin"), inverse


def _expand(value, index: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, tuple):
        return tuple(_expand(v, index) for v in value)
    return value


@contextmanager
def encode_distinct_views(tower: nn.Module) -> Iterator[None]:
    """Within the block, each call of `tower` (pixel_values first) encodes only the distinct
    views of its batch; every tensor it returns (last and per-layer hidden states, pooled
    output) is expanded back to one row per input view."""
    pending: list[torch.Tensor | None] = []

    def before(module, args, kwargs):
        views = args[0] if args else kwargs["pixel_values"]
        found = distinct_views(views)
        pending.append(None if found is None else found[1])
        if found is None:
            return None
        kept = views.index_select(0, found[0])
        return ((kept, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": kept})

    def after(module, args, kwargs, output):
        index = pending.pop()
        if index is None:
            return output
        for key in list(output.keys()):
            output[key] = _expand(output[key], index)
        return output

    handles = [tower.register_forward_pre_hook(before, with_kwargs=True),
               tower.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
