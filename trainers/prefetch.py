"""Input off the hot path: a thread decodes and collates the next batches while the current
step runs, and the loop learns how long it waited for each one."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(source: Iterable, prepare: Callable[[Any], Any], *, depth: int = 2) -> Iterator[tuple[Any, float]]:
    """`prepare(item)` for each item of `source`, computed up to `depth` items ahead on a
    background thread; yields (prepared, seconds the caller waited for it). An error in the
    thread is raised here, in the caller, with its own traceback."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Queue `item` unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(prepare(item)):
                    return
            offer(_DONE)
        except BaseException as err:  # handed to the consumer, which decides
            offer(_Failure(err))

    thread = threading.Thread(target=produce, name="cafe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            started = time.perf_counter()
            item = ready.get()
            waited = time.perf_counter() - started
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item, waited
    finally:  # the consumer stopped early (max_steps) or failed: let the thread end
        stop.set()
