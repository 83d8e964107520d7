"""GradCache (Gao et al. 2021, as VLM2Vec trains) for the CAFe step: a contrastive batch larger
than the activation memory holds, with the unchunked step's loss and gradient.

1. Embed every chunk of examples without a graph and keep the embeddings (the LM head runs
   too, on the labelled tokens only: the price of one forward for both passes).
2. Compute the step's objective on those embeddings as leaves (gathered across ranks, as
   `CafeModel.forward` does) and keep its gradient with respect to each embedding, to the LM
   loss, and to the loss's own learnable temperature (and bias).
3. Forward each chunk again, with a graph, and back-propagate its surrogate (`CachedGrads`), so
   only one chunk's activations are alive at a time. The chunks' gradients sum to the step's.

The LM loss is a mean over the labelled tokens of the whole local batch, so a chunk's own mean
weighs in by its share of those tokens. Each chunk's second forward replays the random state of
its first, so dropout draws the same masks in both.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from cafe.batch import PackedBatch, pair_share
from cafe.losses import CachedGrads, LossTerms
from cafe.model import CafeModel
from cafe.prompts import IGNORE_INDEX


def chunked(examples: list, size: int) -> list[list]:
    """`examples` in runs of `size` (0: one run), one collator call each."""
    size = size or len(examples)
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def plain_backward(objective: torch.Tensor, last: bool) -> None:
    objective.backward()


def gradcache_step(model: CafeModel, chunks: list[PackedBatch], rank: int = 0, world_size: int = 1, *,
                   backward: Callable[[torch.Tensor, bool], object] = plain_backward) -> LossTerms:
    """Back-propagate the CAFe step of the local batch `chunks` (split by examples), chunk by
    chunk, and return its terms for logging, detached, as `CafeModel.forward` would.

    Args:
        model: a `CafeModel`, or a DeepSpeed engine around one (its attributes pass through, and
            both passes over each chunk then go through the engine's forward, as ZeRO-3 needs).
        chunks: the local batch, a `PackedBatch` per run of examples (`chunked`), on the device.
        backward: called as `backward(objective, last)` once per chunk, `last` on the final one
            (where a DeepSpeed engine's gradient accumulation boundary goes).
    """
    loss_fn = model.loss
    device = chunks[0].input_ids.device
    states, queries, targets = [], [], []
    if loss_fn.compute_contrastive_loss:
        for chunk in chunks:
            states.append(_rng_state(device))
            with torch.no_grad():
                out = model(chunk, rank, world_size, cached=CachedGrads())
            queries.append(out.query)
            targets.append(out.target)
    leaves = {
        "query": torch.cat(queries).requires_grad_() if queries else None,
        "target": torch.cat(targets).requires_grad_() if targets else None,
        # stands in for the full-batch LM loss, whose value only the second pass gives
        "lm": torch.zeros((), device=device, requires_grad=True) if loss_fn.compute_language_loss else None,
    }
    terms = loss_fn(lm_loss=leaves["lm"], query=leaves["query"], target=leaves["target"], rank=rank,
                    world_size=world_size)
    live = [name for name, leaf in leaves.items() if leaf is not None]
    params = {name: p for name, p in loss_fn.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(terms.objective, [leaves[name] for name in live] + list(params.values()),
                                allow_unused=True)
    grad = dict(zip(live, grads))
    param_grads = [(name, g) for name, g in zip(params, grads[len(live) :]) if g is not None]  # None: unused
    sizes = [chunk.num_pairs for chunk in chunks]
    query_grads = grad["query"].split(sizes) if "query" in grad else [None] * len(chunks)
    target_grads = grad["target"].split(sizes) if "target" in grad else [None] * len(chunks)
    labelled = [int((chunk.lm_targets != IGNORE_INDEX).sum()) for chunk in chunks]
    total = sum(labelled)

    lm = None
    for i, chunk in enumerate(chunks):
        share = labelled[i] / total if "lm" in grad and total else 0.0
        cached = CachedGrads(query=query_grads[i], target=target_grads[i], lm=grad["lm"] * share if share else 0.0,
                             params=param_grads if i == 0 else [])
        if states:
            _set_rng_state(device, states[i])
        out = model(chunk, rank, world_size, cached=cached)
        backward(out.objective, i == len(chunks) - 1)
        if share:  # a chunk without labels has no weight
            part = out.lm_loss.detach() * share
            lm = part if lm is None else lm + part
    con = terms.con_loss.detach() if terms.con_loss is not None else None
    return loss_fn.combine(lm, con, world_size, pair_share=pair_share(chunks))


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
