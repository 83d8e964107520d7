"""Gradient accumulation for the CAFe step: the local batch runs as several micro-batches, each
a CAFe step of its own (in-batch negatives from the micro-batch, gathered across ranks, as the
research code accumulates), one optimizer step for all of them.

The LM loss is a mean over labelled tokens, so each micro-batch's mean weighs in by its share
of the local batch's labelled tokens: the LM term and its gradient equal one unsplit batch's.
The contrastive term is the micro-batches' mean (one without a pair on any rank adds zero).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from cafe.batch import PackedBatch, pair_share
from cafe.gradcache import plain_backward
from cafe.losses import LossTerms
from cafe.prompts import IGNORE_INDEX


def accumulated_step(model, micro_batches: list[PackedBatch], rank: int = 0, world_size: int = 1, *,
                     backward: Callable[[torch.Tensor, bool], object] = plain_backward) -> LossTerms:
    """Back-propagate `micro_batches` one at a time (`backward(objective, last)`, as in
    `cafe.gradcache`) and return the local batch's terms, detached, for logging."""
    loss_fn = model.loss
    labelled = [int((m.lm_targets != IGNORE_INDEX).sum()) for m in micro_batches]
    total = sum(labelled)
    lm = con = None
    for i, micro in enumerate(micro_batches):
        terms = model(micro, rank, world_size)
        share = labelled[i] / total if total else 0.0
        # a micro-batch without labels has a NaN mean and no weight
        lm_part = terms.lm_loss * share if share else None
        if loss_fn.compute_language_loss and lm_part is None:
            lm_part = torch.zeros((), device=micro.input_ids.device)
        con_part = terms.con_loss / len(micro_batches) if terms.con_loss is not None else None
        backward(loss_fn.combine(lm_part, con_part, world_size).objective, i == len(micro_batches) - 1)
        if lm_part is not None:
            lm = lm_part.detach() if lm is None else lm + lm_part.detach()
        if con_part is not None:
            con = con_part.detach() if con is None else con + con_part.detach()
    return loss_fn.combine(lm, con, world_size, pair_share=pair_share(micro_batches))
