"""Which training rows each rank reads at each step.

The order is a pure function of (seed, epoch, world size, step), so a resumed run continues at
its checkpoint's step with no row seen twice and none skipped, and two runs that differ only in
ZeRO stage or micro-batching see the same batches. (Ray Data's streaming split hands blocks to
workers in arrival order and cannot restore an iterator's position; training therefore reads
its Parquet itself, on the prefetch thread.)

Each epoch deals the row groups ("pieces", large ones cut so every rank gets several) to the
ranks in a seeded order; a rank reads only its own pieces, `window` at a time, and shuffles the
rows of each window. Every rank takes the same number of steps per epoch (the smallest rank's
share); the few rows past it are left for that epoch.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset
import pyarrow.fs
import pyarrow.parquet as pq

from pipelines.storage import Storage

PIECES_PER_RANK = 8  # a row group larger than rows / (world * this) is cut, so small data still deals out


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one Parquet file."""

    path: str
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def row_groups(train_dir: str) -> tuple[pyarrow.fs.FileSystem, list[Piece]]:
    """Every row group of the training Parquet under `train_dir` (a folder or URI), in path
    order, read from the footers. Other files beside the shards (a summary.json) are skipped."""
    filesystem, path = Storage.for_uris([train_dir]).resolve(train_dir)  # s3:// with the AWS_* settings
    dataset = pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet", exclude_invalid_files=True)
    groups = []
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        for group in fragment.row_groups:
            groups.append(Piece(fragment.path, group.id, 0, group.num_rows))
    return dataset.filesystem, groups


def cut(groups: list[Piece], world_size: int, batch_size: int) -> list[Piece]:
    """Row groups cut into pieces of at most max(batch_size, rows / (world * PIECES_PER_RANK))."""
    total = sum(g.rows for g in groups)
    limit = max(batch_size, math.ceil(total / (world_size * PIECES_PER_RANK)))
    pieces = []
    for g in groups:
        parts = math.ceil(g.rows / limit) or 1
        bounds = [g.start + g.rows * i // parts for i in range(parts + 1)]
        pieces += [Piece(g.path, g.row_group, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return pieces


@dataclass(frozen=True)
class DataOrder:
    """The training order of `pieces` for `world_size` ranks taking `batch_size` rows a step each."""

    pieces: tuple[Piece, ...]
    world_size: int
    batch_size: int
    seed: int = 0
    window: int = 4  # pieces whose rows are shuffled together
    filesystem: pyarrow.fs.FileSystem | None = field(default=None, compare=False)

    @classmethod
    def for_training(cls, train_dir: str, world_size: int, batch_size: int, seed: int = 0) -> DataOrder:
        filesystem, groups = row_groups(train_dir)
        return cls(tuple(cut(groups, world_size, batch_size)), world_size, batch_size, seed, filesystem=filesystem)

    def rank_pieces(self, epoch: int, rank: int) -> list[Piece]:
        order = list(range(len(self.pieces)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return [self.pieces[i] for i in order[rank :: self.world_size]]

    def epoch_steps(self, epoch: int) -> int:
        return min(sum(p.rows for p in self.rank_pieces(epoch, r)) for r in range(self.world_size)) // self.batch_size

    def total_steps(self, epochs: int) -> int:
        return sum(self.epoch_steps(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of the run's `step` (0-based, counted from the start)."""
        epoch = 0
        while step >= (in_epoch := self.epoch_steps(epoch)):
            if in_epoch == 0:
                raise ValueError(f"epoch {epoch} has no full batch of {self.batch_size} rows for every rank")
            step -= in_epoch
            epoch += 1
        return epoch, step

    def batches(self, rank: int, start_step: int = 0) -> Iterator[pa.Table]:
        """This rank's batches from the run's `start_step` on, epoch after epoch, without end."""
        reader = _PieceReader(self.filesystem)
        epoch, skip = self.locate(start_step)
        while True:
            rows = self._epoch_rows(epoch, rank, skip * self.batch_size, reader)
            yield from _rebatch(rows, self.batch_size, (self.epoch_steps(epoch) - skip) * self.batch_size)
            epoch, skip = epoch + 1, 0

    def _epoch_rows(self, epoch: int, rank: int, skip_rows: int, reader: _PieceReader) -> Iterator[pa.Table]:
        """The rank's rows of `epoch` in training order, window by window, after the first `skip_rows`."""
        mine = self.rank_pieces(epoch, rank)
        for w in range(0, len(mine), self.window):
            window = mine[w : w + self.window]
            size = sum(p.rows for p in window)
            if skip_rows >= size:  # consumed before the checkpoint: not even read
                skip_rows -= size
                continue
            order = list(range(size))
            random.Random(f"{self.seed}/{epoch}/{rank}/{w}").shuffle(order)
            yield pa.concat_tables([reader.read(p) for p in window]).take(order[skip_rows:])
            skip_rows = 0


def _rebatch(tables: Iterator[pa.Table], batch_size: int, limit: int) -> Iterator[pa.Table]:
    """Batches of exactly `batch_size` rows from the first `limit` rows of `tables`."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        if limit <= 0:
            return
        table = table.slice(0, limit)
        limit -= table.num_rows
        pending.append(table)
        held += table.num_rows
        if held >= batch_size:
            ready = pa.concat_tables(pending)
            whole = held // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield ready.slice(start, batch_size)
            pending, held = [ready.slice(whole)], held - whole


class _PieceReader:
    """Reads pieces, keeping the last row group read (several pieces of one group come in turn)."""

    def __init__(self, filesystem) -> None:
        self.filesystem = filesystem
        self.key: tuple[str, int] | None = None
        self.table: pa.Table | None = None

    def read(self, piece: Piece) -> pa.Table:
        if self.key != (piece.path, piece.row_group):
            source = self.filesystem.open_input_file(piece.path) if self.filesystem else piece.path
            self.table = pq.ParquetFile(source).read_row_group(piece.row_group)
            self.key = (piece.path, piece.row_group)
        return self.table.slice(piece.start, piece.rows)
