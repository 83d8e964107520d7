"""Convert one work unit: read its rows, run `records.convert_row` on each, write one training
shard and one quarantine shard. The Ray tasks and the one-process loop both call
`process_unit`, so both do exactly the same work and write the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cafe.files import confine
from cafe.schema import QUARANTINE_SCHEMA, TRAIN_SCHEMA
from pipelines.plan import PipelineError, WorkUnit
from pipelines.records import ConvertOptions, convert_row, keep_by_hash, quarantine_record, row_id, unique_id
from pipelines.storage import Storage, join, redact


@dataclass(kw_only=True)
class UnitContext:
    """What every unit needs besides itself; pickled once into the Ray tasks."""

    storage: Storage
    convert: ConvertOptions  # multimodal_input and pair_text come from each unit
    max_image_bytes: int  # image files named by path are refused unread above this
    compression: str  # text columns; encoded image columns are stored uncompressed
    train_staging: str
    quarantine_staging: str


def process_unit(unit: WorkUnit, context: UnitContext) -> dict[str, Any]:
    """Convert one unit and write its shards; returns a report. Never raises."""
    start = time.perf_counter()
    report: dict[str, Any] = {"index": unit.index, "subset": unit.subset, "error": ""}
    try:
        report.update(_process_unit(unit, context))
    except Exception as e:  # noqa: BLE001 - surfaced by the driver with the unit named
        report["error"] = f"{type(e).__name__}: {e}"
    report["seconds"] = time.perf_counter() - start
    return report


def _process_unit(unit: WorkUnit, context: UnitContext) -> dict[str, Any]:
    storage = context.storage
    convert_options = dataclasses.replace(context.convert, multimodal_input=unit.multimodal_input,
                                          pair_text=unit.pair_text)
    expected = unit.row_stop - unit.row_start
    source = redact(unit.source)
    try:
        rows = _load_rows(unit, storage)
        load_error = ""
    except Exception as e:  # noqa: BLE001 - the chunk's rows are quarantined by position below
        rows, load_error = [None] * expected, f"{type(e).__name__}: {e}"
    if len(rows) != expected:
        raise PipelineError(
            f"{source} rows {unit.row_start}-{unit.row_stop}: got {len(rows)} rows, planned {expected}; did it change?"
        )

    def load_image(path: str) -> bytes:
        return storage.read_capped(confine(path, unit.image_root), max_bytes=context.max_image_bytes)

    duplicates = set(unit.duplicates)
    good, bad, sampled_out = [], [], 0
    pairs: Counter = Counter()  # training rows by pair outcome: "paired", or why they have none
    for offset, row in enumerate(rows):
        file_row = unit.row_start + offset
        origin = {"file": source, "row": file_row}
        if load_error:
            bad.append(quarantine_record(
                None, subset=unit.subset, uid=None, reason="unreadable_source", detail=load_error, origin=origin
            ))
            continue
        if isinstance(row, UndecodableRow):
            bad.append(quarantine_record(
                None, subset=unit.subset, uid=None, reason="undecodable_text", detail=row.detail, origin=origin
            ))
            continue
        if not isinstance(row, dict):
            bad.append(quarantine_record(
                {"value": row}, subset=unit.subset, uid=None, reason="malformed_row", detail="row is not a mapping",
                origin=origin,
            ))
            continue
        source_id = row_id(row)
        if source_id is not None and not keep_by_hash(unique_id(unit.subset, source_id), unit.sampling_ratio):
            sampled_out += 1
            continue
        ok, record, pair = convert_row(
            row, subset=unit.subset, options=convert_options, load_image=load_image,
            duplicate=file_row in duplicates, origin=origin,
        )
        (good if ok else bad).append(record)
        if ok:
            pairs[pair] += 1

    name, codec = unit.output_name, context.compression
    written = _write(good, TRAIN_SCHEMA, join(context.train_staging, name), storage, codec)
    quarantined = _write(bad, QUARANTINE_SCHEMA, join(context.quarantine_staging, name), storage, codec)
    if written != len(good) or quarantined != len(bad):
        raise PipelineError(f"{unit.output_name}: wrote {written}+{quarantined} rows, expected {len(good)}+{len(bad)}")
    return {
        "source_rows": expected,
        "sampled_out": sampled_out,
        "read": len(good) + len(bad),
        "written": written,
        "quarantined": quarantined,
        "reasons": dict(Counter(r["reason"] for r in bad)),
        "pairs": dict(pairs),
        "train_file": unit.output_name if good else "",
        "quarantine_file": unit.output_name if bad else "",
    }


def _load_rows(unit: WorkUnit, storage: Storage) -> list[Any]:
    if unit.rows_json is not None:
        return json.loads(unit.rows_json)
    fs, path = storage.resolve(unit.source)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if offset < unit.row_stop and offset + size > unit.row_start:
                groups.append(g)
                first = offset if first is None else first
            offset += size
        if not groups:
            return []
        table = pf.read_row_groups(groups)
    return _python_rows(table.slice(unit.row_start - first, unit.row_stop - unit.row_start))


@dataclass(frozen=True)
class UndecodableRow:
    """A parquet row holding text that is not UTF-8 (Arrow reads it; Python cannot decode it)."""

    detail: str


def _python_rows(table: pa.Table) -> list[dict[str, Any] | UndecodableRow]:
    """The rows as dicts; where some text is not UTF-8, row by row, so that only the rows that
    hold it are lost."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        return [_python_row(table.slice(i, 1)) for i in range(table.num_rows)]


def _python_row(row: pa.Table) -> dict[str, Any] | UndecodableRow:
    values = {}
    for name in row.column_names:
        try:
            values[name] = row.column(name)[0].as_py()
        except UnicodeDecodeError as e:
            return UndecodableRow(f"column {name!r} is not UTF-8: {e.reason} at byte {e.start}")
    return values


def _write(records: list[dict], schema: pa.Schema, uri: str, storage: Storage, compression: str) -> int:
    """Write one shard (none when empty); return the row count read back from its footer."""
    if not records:
        return 0
    table = pa.Table.from_pylist(records, schema=schema)
    fs, path = storage.resolve(uri)
    codecs = {f.name: ("none" if pa.types.is_binary(f.type) else compression) for f in schema}
    pq.write_table(table, path, filesystem=fs, compression=codecs, write_statistics=["id", "source", "reason"])
    return pq.read_metadata(path, filesystem=fs).num_rows
