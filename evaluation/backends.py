"""Where requests are answered: this process, a pool of warm Ray Data actors, or the training
workers' own live model. All three call `evaluation.requests.answer`, so they give the same
numbers; they differ only in who holds the model and how the work is split."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import ray
import torch.distributed as dist

from cafe.inference import InferenceModel
from evaluation.requests import (Answers, Request, answer, answers_from_columns, answers_to_columns, from_columns,
                                 to_table)

Backend = Callable[[list[Request]], Answers]
IN_PROCESS_BLOCK = 512  # requests decoded at once in one process: bounds the memory of decoded images


def _cost_order(requests: list[Request]) -> list[int]:
    """Grouped by op, then by length: each slice of this order is one homogeneous batch."""
    return sorted(range(len(requests)), key=lambda i: (requests[i].op, requests[i].cost))


def in_process(model: InferenceModel) -> Backend:
    def run(requests: list[Request]) -> Answers:
        order = _cost_order(requests)
        parts = [(block, answer(model, [requests[i] for i in block]))
                 for block in (order[s : s + IN_PROCESS_BLOCK] for s in range(0, len(order), IN_PROCESS_BLOCK))]
        return _merge(parts, len(requests), model.hidden_size)

    return run


class AnswerActor:
    """Ray Data callable class: loads the model once, then answers batch after batch."""

    def __init__(self, checkpoint: str, *, device: str, emb_type: str, batch_size: int) -> None:
        self.model = InferenceModel.load(checkpoint, device=device, emb_type=emb_type, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return answers_to_columns(batch["key"], answer(self.model, from_columns(batch)))


def actor_pool(checkpoint: str, *, num_actors: int = 1, cpus_per_actor: float = 1.0, batch_size: int = 32,
               use_gpu: bool = False, emb_type: str = "last") -> Backend:
    """Requests of one call go through one pool: each actor loads the model once for the whole
    scorecard (every suite's requests are answered in the same call)."""

    def run(requests: list[Request]) -> Answers:
        table = to_table(requests).take(_cost_order(requests))
        # one block per batch, so every actor gets work (a single block would go to one actor)
        blocks = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(
            AnswerActor,
            fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": "cuda" if use_gpu else "cpu",
                                   "emb_type": emb_type, "batch_size": batch_size},
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            udf_modifying_row_count=False,
        )
        return answers_from_columns(list(ds.iter_batches(batch_format="numpy", batch_size=None)), len(requests))

    return run


def training_workers(model: InferenceModel, rank: int, world: int) -> Backend:
    """Every rank answers an equal share of each op (padded by repeating a request), then all
    ranks gather every answer. Equal shares mean an equal number of forward calls per rank,
    which ZeRO-3's parameter gathers need."""

    def run(requests: list[Request]) -> Answers:
        mine: list[int] = []
        for op in ("embed", "generate", "nll"):
            index = [i for i in _cost_order(requests) if requests[i].op == op]
            if index:
                share = index[rank::world]
                mine += share + [index[-1]] * (math.ceil(len(index) / world) - len(share))
        local = answer(model, [requests[i] for i in mine]) if mine else None
        parts: list = [None] * world
        dist.all_gather_object(parts, (mine, local))
        return _merge([p for p in parts if p[1] is not None], len(requests), model.hidden_size)

    return run


def _merge(parts: list[tuple[list[int], Answers]], n: int, dim: int) -> Answers:
    out = Answers(np.zeros((n, dim), np.float32), [""] * n, np.zeros(n), np.zeros(n, np.int64), [""] * n)
    seen = np.zeros(n, dtype=bool)
    for index, part in parts:
        out.embeddings[index], out.nll[index], out.tokens[index] = part.embeddings, part.nll, part.tokens
        for i, text, error in zip(index, part.texts, part.errors):
            out.texts[i], out.errors[i] = text, error
        seen[index] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n} requests were not answered")
    return out
