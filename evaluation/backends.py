"""Where requests are answered: this process, a pool of warm Ray actors, or the training
workers' own live model. All three call `evaluation.requests.answer`, so they give the same
numbers; they differ only in who holds the model and how the work is split."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
import ray
import torch.distributed as dist

from cafe.inference import InferenceModel
from cafe.logs import quiet_libraries
from cafe.model import claim_cpus
from evaluation.requests import Answers, Request, answer

Backend = Callable[[list[Request]], Answers]
CHUNKS_PER_ACTOR = 4
IN_FLIGHT = 2
IN_PROCESS_BLOCK = 512  # requests decoded at once in one process: bounds the memory of decoded images


def _cost_order(requests: list[Request]) -> list[int]:
    """Grouped by op, then by length: each slice of this order is one homogeneous batch."""
    return sorted(range(len(requests)), key=lambda i: (requests[i].op, requests[i].cost))


def _chunks(requests: list[Request], batch_size: int, at_least: int) -> list[list[int]]:
    """Cost-ordered chunks of one op each, at most `batch_size` requests and about 1/`at_least`
    of the total cost, so that the slow (image) chunks are small enough to spread."""
    order = _cost_order(requests)
    budget = sum(requests[i].cost for i in order) / at_least
    chunks: list[list[int]] = []
    spent = 0.0
    for i in order:
        if (not chunks or len(chunks[-1]) == batch_size or spent >= budget
                or requests[chunks[-1][0]].op != requests[i].op):
            chunks.append([])
            spent = 0.0
        chunks[-1].append(i)
        spent += requests[i].cost
    return chunks


def in_process(model: InferenceModel) -> Backend:
    def run(requests: list[Request]) -> Answers:
        order = _cost_order(requests)
        parts = [(block, answer(model, [requests[i] for i in block]))
                 for block in (order[s : s + IN_PROCESS_BLOCK] for s in range(0, len(order), IN_PROCESS_BLOCK))]
        return _merge(parts, len(requests), model.hidden_size)

    return run


@ray.remote
class AnswerWorker:
    """Holds one model; answers chunks of requests. Reloads only when the checkpoint changes."""

    def __init__(self, cpus: float) -> None:
        quiet_libraries()
        claim_cpus(cpus)
        self.model: InferenceModel | None = None
        self.loaded: tuple | None = None

    def load(self, checkpoint: str, device: str, emb_type: str, batch_size: int) -> None:
        if self.loaded != (checkpoint, device, emb_type, batch_size):
            self.model = InferenceModel.load(checkpoint, device=device, emb_type=emb_type, batch_size=batch_size)
            self.loaded = (checkpoint, device, emb_type, batch_size)

    def answer(self, index: list[int], requests: list[Request]) -> tuple[list[int], Answers]:
        return index, answer(self.model, requests)


class ActorPool:
    """Ray actors that stay up across calls: processes start and import once, and a checkpoint
    is loaded once per actor however many suites or calls use it (`backend(checkpoint)`)."""

    def __init__(self, *, num_actors: int = 1, cpus_per_actor: float = 1.0, use_gpu: bool = False) -> None:
        self.use_gpu = use_gpu
        worker = AnswerWorker.options(num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)
        self.actors = [worker.remote(cpus_per_actor) for _ in range(num_actors)]

    def backend(self, checkpoint: str, *, batch_size: int = 32, emb_type: str = "last") -> Backend:
        device = "cuda" if self.use_gpu else "cpu"
        ray.get([a.load.remote(str(checkpoint), device, emb_type, batch_size) for a in self.actors])

        def run(requests: list[Request]) -> Answers:
            parts = self._dispatch(_chunks(requests, batch_size, CHUNKS_PER_ACTOR * len(self.actors)), requests)
            return _merge(parts, len(requests), parts[0][1].embeddings.shape[1])

        return run

    def _dispatch(self, chunks: list[list[int]], requests: list[Request]) -> list[tuple[list[int], Answers]]:
        """Work stealing with `IN_FLIGHT` chunks queued per actor, so an actor never waits for
        the driver between chunks."""
        queue = deque(chunks)
        pending: dict = {}

        def submit(actor) -> None:
            chunk = queue.popleft()
            pending[actor.answer.remote(chunk, [requests[i] for i in chunk])] = actor

        for actor in self.actors:
            for _ in range(IN_FLIGHT):
                if queue:
                    submit(actor)
        parts = []
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done)
            parts.append(ray.get(done))
            if queue:
                submit(actor)
        return parts

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def training_workers(model: InferenceModel, rank: int, world: int) -> Backend:
    """Every rank answers an equal share of each model call (each op, and generation per
    `max_new_tokens`, which `answer` calls separately), padded by repeating a request; then all
    ranks gather every answer. Equal shares mean the same model calls, in the same order, on
    every rank, which ZeRO-3's parameter gathers need."""

    def run(requests: list[Request]) -> Answers:
        mine = rank_share(requests, rank, world)
        local = answer(model, [requests[i] for i in mine]) if mine else None
        parts: list = [None] * world
        dist.all_gather_object(parts, (mine, local))
        return _merge([p for p in parts if p[1] is not None], len(requests), model.hidden_size)

    return run


def model_call(request: Request) -> tuple[str, int]:
    """Which call of `answer` serves the request: its op, and for generation its token budget."""
    return request.op, request.max_new_tokens if request.op == "generate" else 0


def rank_share(requests: list[Request], rank: int, world: int) -> list[int]:
    """This rank's requests: an equal share of each model call's, the last repeated to pad."""
    calls: dict[tuple[str, int], list[int]] = {}
    for i in _cost_order(requests):
        calls.setdefault(model_call(requests[i]), []).append(i)
    mine: list[int] = []
    for index in calls.values():
        share = index[rank::world]
        mine += share + [index[-1]] * (math.ceil(len(index) / world) - len(share))
    return mine


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
