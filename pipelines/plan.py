"""Plan a run: cut the selected subsets into work units, in input order.

The driver lists each subset's files, reads parquet footers and the `id` column only (or parses
the LLaVA json once), marks repeated ids (the first occurrence in input order wins) and cuts
each file into units of at most `rows_per_shard` rows, aligned to parquet row groups where they
fit. A unit becomes one output shard, named after its subset and position: names and row order
come from the plan, never from scheduling.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import json
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.records import row_id, unique_id
from pipelines.storage import Storage, redact
from pipelines.subsets import DatasetYamlError, SubsetSpec, default_image_root

_PLAN_THREADS = 8


class PipelineError(RuntimeError):
    """The run could not complete; the previous outputs are left as they were."""


@dataclass(kw_only=True)
class WorkUnit:
    """Rows [row_start, row_stop) of one source file; one output shard (+ quarantine shard)."""

    index: int
    subset_index: int
    subset: str
    format: str
    source: str
    row_start: int
    row_stop: int
    duplicates: list[int] = field(default_factory=list)  # source rows whose id appeared earlier
    rows_json: str | None = None  # llava_json: the rows themselves (parsed once on the driver)
    image_root: str | None = None
    sampling_ratio: float = 1.0
    multimodal_input: bool = False
    output_name: str = ""


def plan_units(
    subsets: list[SubsetSpec], *, storage: Storage, rows_per_shard: int, multimodal_input: bool = False
) -> tuple[list[WorkUnit], dict[str, int]]:
    """Work units in input order, and the number of source rows per subset.

    `multimodal_input` is the default for subsets whose YAML entry does not set it.
    """
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    units: list[WorkUnit] = []
    source_rows: dict[str, int] = {}
    for subset_index, spec in enumerate(subsets):
        seen: set[str] = set()
        unit_in_subset = 0
        source_rows[spec.name] = 0
        for source, plan in _subset_sources(spec, storage):
            ids = plan["ids"]
            source_rows[spec.name] += len(ids)
            duplicates = []  # rows whose id appeared earlier in the subset (input order)
            for row, source_id in enumerate(ids):
                if source_id is None:
                    continue
                uid = unique_id(spec.name, source_id)
                if uid in seen:
                    duplicates.append(row)
                seen.add(uid)
            rows = plan.get("rows")
            multimodal = multimodal_input if spec.multimodal_input is None else spec.multimodal_input
            for row_start, row_stop in _unit_ranges(plan, rows_per_shard):
                first, stop = bisect.bisect_left(duplicates, row_start), bisect.bisect_left(duplicates, row_stop)
                units.append(
                    WorkUnit(
                        index=len(units),
                        subset_index=subset_index,
                        subset=spec.name,
                        format=spec.format,
                        source=source,
                        row_start=row_start,
                        row_stop=row_stop,
                        duplicates=duplicates[first:stop],
                        rows_json=None if rows is None else json.dumps(rows[row_start:row_stop], ensure_ascii=False),
                        image_root=default_image_root(spec),
                        sampling_ratio=spec.sampling_ratio,
                        multimodal_input=multimodal,
                        output_name=f"{subset_index:03d}-{_slug(spec.name)}-{unit_in_subset:05d}.parquet",
                    )
                )
                unit_in_subset += 1
    return units, source_rows


def _subset_sources(spec: SubsetSpec, storage: Storage) -> list[tuple[str, dict]]:
    """(file, {"ids", and "group_sizes" (parquet) or "rows" (json)}) for each source file, in order."""
    info = storage.info(spec.path)
    if info.type == pafs.FileType.NotFound:
        raise DatasetYamlError(f"subset {spec.name!r}: path {redact(spec.path)!r} does not exist")
    if spec.format == "llava_json":
        if info.type != pafs.FileType.File:
            raise DatasetYamlError(f"subset {spec.name!r}: format llava_json needs a .json file, got a directory")
        return [(spec.path, _read_json_rows(spec, storage))]
    files = [spec.path] if info.type == pafs.FileType.File else storage.list_files(spec.path, ".parquet")
    if not files:
        raise DatasetYamlError(f"subset {spec.name!r}: no .parquet shards in {redact(spec.path)!r}")
    return _scan_parquet_files(files, storage, spec.name)


def _scan_parquet_files(files: list[str], storage: Storage, subset: str) -> list[tuple[str, dict]]:
    """Footer + `id` column of each shard, read in parallel threads, returned in file order."""
    def scan(path: str) -> dict:
        fs, fs_path = storage.resolve(path)
        try:
            with fs.open_input_file(fs_path) as f:
                pf = pq.ParquetFile(f)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                if "id" in pf.schema_arrow.names:
                    ids = [row_id({"id": v}) for v in pf.read(columns=["id"]).column("id").to_pylist()]
                else:
                    ids = [None] * pf.metadata.num_rows
        except Exception as e:  # noqa: BLE001 - reported with the subset and file
            raise PipelineError(
                f"subset {subset!r}: cannot read parquet shard {redact(path)!r}: {type(e).__name__}: {e}"
            ) from e
        return {"ids": ids, "group_sizes": sizes}

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_PLAN_THREADS, len(files))) as pool:
        return list(zip(files, pool.map(scan, files)))


def _read_json_rows(spec: SubsetSpec, storage: Storage) -> dict:
    try:
        rows = json.loads(storage.read_bytes(spec.path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"subset {spec.name!r}: {redact(spec.path)!r} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise PipelineError(f"subset {spec.name!r}: {redact(spec.path)!r} must hold a JSON list of rows")
    return {"ids": [row_id(r) if isinstance(r, dict) else None for r in rows], "rows": rows}


def _unit_ranges(plan: dict, rows_per_shard: int) -> list[tuple[int, int]]:
    """Row ranges of at most rows_per_shard rows; parquet: whole row groups where they fit."""
    sizes = plan.get("group_sizes") or [len(plan["ids"])]
    ranges, start, offset = [], 0, 0
    for size in sizes:
        if offset + size - start > rows_per_shard and offset > start:
            ranges.append((start, offset))
            start = offset
        offset += size
        while offset - start > rows_per_shard:
            ranges.append((start, start + rows_per_shard))
            start += rows_per_shard
    if offset > start:
        ranges.append((start, offset))
    return ranges


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "subset"
