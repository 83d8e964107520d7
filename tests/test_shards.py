"""trainers.shards: the training order is a function of (seed, epoch, world, step), so a resumed
rank continues exactly where it stopped."""
from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.shards import DataOrder, row_groups


def write_shards(folder, sizes: list[int], row_group_size: int) -> list[int]:
    """Parquet files of consecutive ids; returns every id."""
    ids, start = [], 0
    for i, size in enumerate(sizes):
        table = pa.table({"id": list(range(start, start + size))})
        pq.write_table(table, folder / f"shard-{i:03d}.parquet", row_group_size=row_group_size)
        ids += list(range(start, start + size))
        start += size
    (folder / "summary.json").write_text("{}")  # beside the shards, as the pipeline leaves it
    return ids


def ids_of(batches) -> list[list[int]]:
    return [batch.column("id").to_pylist() for batch in batches]


def epoch(order: DataOrder, rank: int, number: int) -> list[list[int]]:
    first = order.total_steps(number)
    return ids_of(itertools.islice(order.batches(rank, first), order.epoch_steps(number)))


@pytest.mark.parametrize("sizes,row_group_size,world,batch", [
    ([500] * 6, 100, 2, 16),  # many row groups
    ([97, 33, 250], 1000, 2, 8),  # one row group per file, uneven
    ([64], 64, 2, 4),  # a single row group, cut so both ranks read
    ([300, 300, 300], 50, 3, 5),
])
def test_an_epoch_gives_each_row_at_most_once_and_every_rank_the_same_steps(tmp_path, sizes, row_group_size, world,
                                                                           batch):
    every = write_shards(tmp_path, sizes, row_group_size)
    order = DataOrder.for_training(str(tmp_path), world, batch, seed=3)
    for number in range(2):
        steps = order.epoch_steps(number)
        seen = []
        for rank in range(world):
            batches = epoch(order, rank, number)
            assert len(batches) == steps
            assert all(len(b) == batch for b in batches)
            seen += [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == steps * batch * world
        assert set(seen) <= set(every)
        # only the ranks' uneven shares are left over: under one piece per rank
        assert len(every) - len(seen) < world * (max(sizes) + batch)


def test_resuming_at_any_step_continues_the_same_sequence(tmp_path):
    write_shards(tmp_path, [120, 80, 200], 40)
    order = DataOrder.for_training(str(tmp_path), 2, 8, seed=1)
    horizon = order.total_steps(2) + 5  # across two epoch boundaries
    for rank in range(2):
        straight = ids_of(itertools.islice(order.batches(rank), horizon))
        for start in (1, 7, order.epoch_steps(0), order.epoch_steps(0) + 3):
            resumed = ids_of(itertools.islice(order.batches(rank, start), horizon - start))
            assert resumed == straight[start:]


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    write_shards(tmp_path, [400], 50)
    a = DataOrder.for_training(str(tmp_path), 2, 8, seed=0)
    b = DataOrder.for_training(str(tmp_path), 2, 8, seed=0)
    c = DataOrder.for_training(str(tmp_path), 2, 8, seed=1)
    assert epoch(a, 0, 0) == epoch(b, 0, 0)
    assert epoch(a, 0, 0) != epoch(c, 0, 0)
    assert epoch(a, 0, 0) != epoch(a, 0, 1)
    # rows are mixed within a window, not read in file order
    assert epoch(a, 0, 0)[0] != sorted(epoch(a, 0, 0)[0])


def test_row_groups_read_from_footers(tmp_path):
    write_shards(tmp_path, [100, 30], 40)
    _, groups = row_groups(str(tmp_path))
    assert [g.rows for g in groups] == [40, 40, 20, 30]
