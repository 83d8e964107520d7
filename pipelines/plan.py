"""Plan a run: cut the selected subsets into work units, in input order.

The driver lists each subset's files, reads parquet footers and the `id` column only (or parses
the LLaVA json once), marks repeated ids (the first occurrence in input order wins) and cuts
each file into units of at most `rows_per_shard` rows, aligned to parquet row groups where they
fit. A unit becomes one output shard, named after its subset and position: names and row order
come from the plan, never from scheduling. A file that cannot be opened (empty, truncated, not
parquet or JSON) is quarantined whole, by name, and the run goes on without it; a file without
rows is listed too.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import json
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.records import ConvertOptions, row_id, unique_id
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
    pair_text: str = ConvertOptions.pair_text
    output_name: str = ""


@dataclass(kw_only=True)
class Plan:
    units: list[WorkUnit]  # in input order
    source_rows: dict[str, int]  # per subset
    quarantined_files: list[dict[str, str]]  # {"subset", "file", "reason", "detail"}: files not opened
    files_without_rows: list[dict[str, str]]  # {"subset", "file"}


def plan_units(
    subsets: list[SubsetSpec], *, storage: Storage, rows_per_shard: int, multimodal_input: bool = False,
    pair_text: str = ConvertOptions.pair_text,
) -> Plan:
    """Work units in input order, the number of source rows per subset, and the files left out.

    `multimodal_input` and `pair_text` are the defaults for subsets whose YAML entry does not set them.
    """
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    result = Plan(units=[], source_rows={}, quarantined_files=[], files_without_rows=[])
    units, source_rows = result.units, result.source_rows
    for subset_index, spec in enumerate(subsets):
        seen: set[str] = set()
        unit_in_subset = 0
        source_rows[spec.name] = 0
        for source, plan in _subset_sources(spec, storage):
            where = {"subset": spec.name, "file": redact(source)}
            if "unreadable" in plan:
                result.quarantined_files.append(where | {"reason": "unreadable_file", "detail": plan["unreadable"]})
                continue
            ids = plan["ids"]
            if not ids:
                result.files_without_rows.append(where)
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
                        pair_text=spec.pair_text or pair_text,
                        output_name=f"{subset_index:03d}-{_slug(spec.name)}-{unit_in_subset:05d}.parquet",
                    )
                )
                unit_in_subset += 1
    return result


def _subset_sources(spec: SubsetSpec, storage: Storage) -> list[tuple[str, dict]]:
    """(file, {"ids", and "group_sizes" (parquet) or "rows" (json)} or {"unreadable": why}) for
    each source file, in order."""
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
    return _scan_parquet_files(files, storage)


def _scan_parquet_files(files: list[str], storage: Storage) -> list[tuple[str, dict]]:
    """Footer + `id` column of each shard, read in parallel threads, returned in file order."""
    def scan(path: str) -> dict:
        fs, fs_path = storage.resolve(path)
        try:
            with fs.open_input_file(fs_path) as f:
                if f.size() == 0:
                    return {"unreadable": "the file is empty (0 bytes)"}
                pf = pq.ParquetFile(f)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                if "id" in pf.schema_arrow.names:
                    ids = [row_id({"id": v}) for v in _values_or_none(pf.read(columns=["id"]).column("id"))]
                else:
                    ids = [None] * pf.metadata.num_rows
        except Exception as e:  # noqa: BLE001 - the file is quarantined whole, with the error
            return {"unreadable": f"{type(e).__name__}: {e}"}
        return {"ids": ids, "group_sizes": sizes}

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_PLAN_THREADS, len(files))) as pool:
        return list(zip(files, pool.map(scan, files)))


def _values_or_none(column: pa.ChunkedArray) -> list:
    """The column's values; a text value that is not UTF-8 reads as None (its row is quarantined
    when its unit reads it)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_value_or_none(value) for value in column]


def _value_or_none(value: pa.Scalar) -> object:
    try:
        return value.as_py()
    except UnicodeDecodeError:
        return None


def _read_json_rows(spec: SubsetSpec, storage: Storage) -> dict:
    try:
        rows = json.loads(storage.read_bytes(spec.path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"unreadable": f"not valid JSON: {e}"}
    if not isinstance(rows, list):
        return {"unreadable": "the file must hold a JSON list of rows"}
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
