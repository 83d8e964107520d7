"""The input prefetcher and the progress line: input prepared beside the step, waits measured."""
import threading
import time

import pytest

from trainers.prefetch import prefetched
from trainers.progress import Progress


def test_items_arrive_in_order_and_prepared_while_the_step_runs():
    def prepare(i):
        time.sleep(0.05)  # decoding and collation
        return i * 10

    started = time.perf_counter()
    seen, waits = [], []
    for value, waited in prefetched(range(8), prepare):
        seen.append(value)
        waits.append(waited)
        time.sleep(0.05)  # the step
    elapsed = time.perf_counter() - started
    assert seen == [i * 10 for i in range(8)]
    assert elapsed < 8 * 0.1 * 0.8  # overlapped, not serial (0.8 s)
    assert sum(waits[1:]) < 0.5 * sum(waits[:1]) + 0.1  # after the first batch the step rarely waits


def test_an_error_while_preparing_reaches_the_loop():
    def prepare(i):
        if i == 3:
            raise ValueError("row 3: undecodable image")
        return i

    got = []
    with pytest.raises(ValueError, match="row 3"):
        for value, _ in prefetched(range(10), prepare):
            got.append(value)
    assert got == [0, 1, 2]


def test_stopping_early_ends_the_thread():
    before = threading.active_count()
    for value, _ in prefetched(iter(range(1000)), lambda i: i, depth=2):
        if value == 5:
            break
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_progress_metrics_and_line():
    progress = Progress(100, samples_per_step=32)
    for _ in range(10):
        progress.add(waited=0.01, busy=0.09, tokens=5000)
    metrics = progress.interval_metrics(world=1)
    assert metrics["train/samples_per_s"] == pytest.approx(320)
    assert metrics["train/tokens_per_s"] == pytest.approx(50_000)
    assert metrics["train/data_wait_fraction"] == pytest.approx(0.1)
    line = progress.line(10, {"train/loss": 1.5, "train/lm_loss": 1.2, **metrics})
    assert line == ("[train] step 10/100 | loss 1.5000 | lm 1.2000 | 320.0 samples/s | 50,000 tok/s | "
                    "data wait 10.0% | ETA 0:09")
    assert progress.interval_metrics(world=1) == {}  # the interval was consumed
