"""OneVision parquet / LLaVA json -> training Parquet (+ quarantine), as a Ray Data job.

How a run goes:
1. plan (driver): list the subsets' files, read parquet footers and the `id` column only (or
   parse the json), mark repeated ids (first occurrence in input order wins), and cut the input
   into work units of at most `rows_per_shard` rows, aligned to parquet row groups;
2. convert (Ray Data tasks with fractional CPUs, or a plain loop with `executor="local"`):
   each unit reads its rows, runs `records.convert_row` on each (decode, validate, re-encode;
   every failure becomes a quarantine row with its reason) and writes one training shard and
   one quarantine shard, named after the unit, into staging directories;
3. check and publish (driver): read == written + quarantined per unit and per run (the written
   counts are read back from the files' footers), then the staging directories replace the
   outputs and `summary.json` is written with the counts.

Determinism: file names and row order come from the plan (subset order, sorted file names, row
order), never from scheduling, so re-runs, the Ray and the local executor and any parallelism
give byte-identical files. Reading the output files sorted by name gives the input order.
"""
from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cafe.schema import QUARANTINE_SCHEMA, SCHEMA_VERSION, TRAIN_SCHEMA
from pipelines.records import (
    REASONS,
    ConvertOptions,
    convert_row,
    keep_by_hash,
    quarantine_record,
    row_id,
    unique_id,
)
from pipelines.storage import Storage, StorageError, is_s3, join, normalise, redact, staging_path
from pipelines.subsets import (
    DatasetYamlError,
    SubsetSpec,
    default_image_root,
    discover_subsets,
    load_dataset_yaml,
)

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
_PLAN_THREADS = 8


class PipelineError(RuntimeError):
    """The run could not complete; the previous outputs are left as they were."""


@dataclass(kw_only=True)
class PipelineOptions:
    """What to check and how to run. Only the first five change the output bytes."""

    max_image_pixels: int = 25_000_000
    max_text_chars: int = 32_768
    max_side: int | None = None  # resize keeping aspect so that max(width, height) <= max_side
    multimodal_input: bool = False  # default for subsets that do not set it
    rows_per_shard: int = 512  # rows per work unit, hence at most this many rows per output shard
    executor: Literal["ray", "local"] = "ray"  # "local": the same units in a one-process loop
    # CPUs one conversion task asks Ray for. Fractional so that tasks fit beside training
    # workers on a shared node. On a node with nothing else to run, 1.0 is faster for short
    # jobs: with 0.5, Ray runs two tasks per CPU and starts workers beyond its one-per-CPU
    # soft limit, which it reaps after a second idle, so every short job pays their start-up.
    cpus_per_task: float = 0.5
    max_concurrent_tasks: int | None = None  # cap on concurrent tasks; None: as many as fit
    num_cpus: int | None = None  # for ray.init when Ray is not running yet
    compression: str = "zstd"  # text columns; encoded image columns are stored uncompressed


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


@dataclass(kw_only=True)
class PipelineSummary:
    read: int  # rows selected (after sampling) = written + quarantined
    written: int
    quarantined: int
    sampled_out: int  # rows left out on purpose by sampling_ratio
    quarantined_by_reason: dict[str, int]
    subsets: dict[str, dict[str, Any]]
    train_files: list[str]
    quarantine_files: list[str]
    output_dir: str
    quarantine_dir: str
    options: dict[str, Any]
    schema_version: str = SCHEMA_VERSION
    elapsed_s: float = 0.0  # wall time; not in summary.json (it would break byte-identical re-runs)
    task_s: float = 0.0  # time spent converting units, summed over tasks; not in summary.json

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("elapsed_s")
        out.pop("task_s")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@dataclass(kw_only=True)
class _TaskContext:
    storage: Storage
    options: PipelineOptions
    train_staging: str
    quarantine_staging: str


# ---------------------------------------------------------------------------------------------
# public entry points


def run_pipeline(
    *,
    output_dir: str,
    quarantine_dir: str | None = None,
    dataset_yaml: str | None = None,
    input_dir: str | None = None,
    subsets: list[SubsetSpec] | None = None,
    options: PipelineOptions | None = None,
) -> PipelineSummary:
    """Convert the selected subsets into training Parquet under `output_dir`.

    Args:
        output_dir: training shards + `summary.json` (local path or `s3://`); replaced whole.
        quarantine_dir: quarantine shards; default: `<output_dir>-quarantine` beside it.
        dataset_yaml: subset selection (see `pipelines.subsets`); `${raw_dir}` = `input_dir`.
        input_dir: without a YAML, every parquet shard under it, one subset per folder.
        subsets: an already parsed selection (overrides the two above).
        options: checks and execution settings.
    """
    options = options or PipelineOptions()
    if options.executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {options.executor!r}")
    start = time.perf_counter()
    output_dir = normalise(output_dir)
    quarantine_dir = normalise(quarantine_dir or output_dir.rstrip("/") + "-quarantine")
    _check_output_dirs(output_dir, quarantine_dir)
    if subsets is None:
        subsets = select_subsets(dataset_yaml=dataset_yaml, input_dir=input_dir)
    uris = [output_dir, quarantine_dir] + [s.path for s in subsets] + [s.image_root or "" for s in subsets]
    storage = Storage.for_uris(uris)
    for final in (output_dir, quarantine_dir):
        _check_replaceable(storage, final)

    units, source_rows = plan_units(subsets, storage=storage, options=options)
    log.info("planned %d units over %d subsets (%d source rows)", len(units), len(subsets), sum(source_rows.values()))
    context = _TaskContext(
        storage=storage,
        options=options,
        train_staging=staging_path(output_dir),
        quarantine_staging=staging_path(quarantine_dir),
    )
    staging = (context.train_staging, context.quarantine_staging)
    for path in staging:
        storage.remove_dir(path)
        storage.make_dir(path)
    try:
        if options.executor == "ray":
            reports = _run_units_with_ray(units, context)
        else:
            reports = [process_unit(u, context) for u in units]
        summary = _summarise(units, reports, source_rows, subsets, options, output_dir, quarantine_dir)
        summary.task_s = sum(r["seconds"] for r in reports)
    except BaseException:
        for path in staging:
            try:
                storage.remove_dir(path)
            except Exception:  # noqa: BLE001 - best effort clean-up; the real error follows
                log.warning("could not remove staging directory %s", redact(path))
        raise
    _publish(storage, context, summary, output_dir, quarantine_dir)
    summary.elapsed_s = time.perf_counter() - start
    log.info(
        "read %d, written %d, quarantined %d %s, sampled out %d, in %.1fs (%.1fs of conversion tasks)",
        summary.read, summary.written, summary.quarantined, summary.quarantined_by_reason, summary.sampled_out,
        summary.elapsed_s, summary.task_s,
    )
    log_to_mlflow(summary)
    return summary


def select_subsets(*, dataset_yaml: str | None = None, input_dir: str | None = None) -> list[SubsetSpec]:
    """The subsets of a dataset YAML (`${raw_dir}` = input_dir), or every folder of shards under input_dir."""
    if dataset_yaml:
        return load_dataset_yaml(dataset_yaml, raw_dir=input_dir)
    if input_dir:
        return discover_subsets(input_dir)
    raise DatasetYamlError("give a dataset YAML or an input directory")


def run_from_config(data: Any, *, options: PipelineOptions | None = None) -> PipelineSummary:
    """Run for a `cafe.config.DataConfig`: its dataset YAML (or every shard under raw_dir)."""
    return run_pipeline(
        output_dir=data.train_dir,
        quarantine_dir=data.quarantine_dir,
        dataset_yaml=data.dataset_yaml or None,
        input_dir=data.raw_dir,
        options=options,
    )


def log_to_mlflow(summary: PipelineSummary) -> bool:
    """Log counts as metrics and the summary as an artifact when an MLflow run is active.

    mlflow is never imported here: a run can only be active if the caller imported it.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return False
    metrics = {"data/read": summary.read, "data/written": summary.written, "data/quarantined": summary.quarantined}
    metrics["data/sampled_out"] = summary.sampled_out
    for reason in REASONS:
        metrics[f"data/quarantined/{reason}"] = summary.quarantined_by_reason.get(reason, 0)
    mlflow.log_metrics(metrics)
    mlflow.log_dict(summary.to_dict(), "data/summary.json")
    return True


# ---------------------------------------------------------------------------------------------
# plan


def plan_units(
    subsets: list[SubsetSpec], *, storage: Storage, options: PipelineOptions
) -> tuple[list[WorkUnit], dict[str, int]]:
    """Work units in input order, and the number of source rows per subset."""
    if options.rows_per_shard < 1:
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
            multimodal = options.multimodal_input if spec.multimodal_input is None else spec.multimodal_input
            for row_start, row_stop in _unit_ranges(plan, options.rows_per_shard):
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


# ---------------------------------------------------------------------------------------------
# convert


def process_unit(unit: WorkUnit, context: _TaskContext) -> dict[str, Any]:
    """Convert one unit and write its shards; returns a report. Never raises."""
    start = time.perf_counter()
    report: dict[str, Any] = {"index": unit.index, "subset": unit.subset, "error": ""}
    try:
        report.update(_process_unit(unit, context))
    except Exception as e:  # noqa: BLE001 - surfaced by the driver with the unit named
        report["error"] = f"{type(e).__name__}: {e}"
    report["seconds"] = time.perf_counter() - start
    return report


def _process_unit(unit: WorkUnit, context: _TaskContext) -> dict[str, Any]:
    storage, options = context.storage, context.options
    convert_options = ConvertOptions(
        max_image_pixels=options.max_image_pixels,
        max_text_chars=options.max_text_chars,
        max_side=options.max_side,
        multimodal_input=unit.multimodal_input,
    )
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
        return storage.read_bytes(_image_uri(path, unit.image_root))

    duplicates = set(unit.duplicates)
    good, bad, sampled_out = [], [], 0
    for offset, row in enumerate(rows):
        file_row = unit.row_start + offset
        origin = {"file": source, "row": file_row}
        if load_error:
            bad.append(quarantine_record(
                None, subset=unit.subset, uid=None, reason="unreadable_source", detail=load_error, origin=origin
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
        ok, record = convert_row(
            row, subset=unit.subset, options=convert_options, load_image=load_image,
            duplicate=file_row in duplicates, origin=origin,
        )
        (good if ok else bad).append(record)

    name, codec = unit.output_name, options.compression
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
    return table.slice(unit.row_start - first, unit.row_stop - unit.row_start).to_pylist()


def _image_uri(path: str, image_root: str | None) -> str:
    if is_s3(path) or os.path.isabs(path):
        return path
    if not image_root:
        raise FileNotFoundError(f"relative image path {path!r} and the subset has no image_root")
    return join(image_root, path)


def _write(records: list[dict], schema: pa.Schema, uri: str, storage: Storage, compression: str) -> int:
    """Write one shard (none when empty); return the row count read back from its footer."""
    if not records:
        return 0
    table = pa.Table.from_pylist(records, schema=schema)
    fs, path = storage.resolve(uri)
    codecs = {f.name: ("none" if pa.types.is_binary(f.type) else compression) for f in schema}
    pq.write_table(table, path, filesystem=fs, compression=codecs, write_statistics=["id", "source", "reason"])
    return pq.read_metadata(path, filesystem=fs).num_rows


def _process_batch(batch: pa.Table, context: _TaskContext) -> pa.Table:
    reports = [process_unit(WorkUnit(**json.loads(text)), context) for text in batch.column("unit").to_pylist()]
    return pa.table({"report": [json.dumps(r) for r in reports]})


def _run_units_with_ray(units: list[WorkUnit], context: _TaskContext) -> list[dict[str, Any]]:
    import ray

    if not units:
        return []
    if not ray.is_initialized():
        ray.init(num_cpus=context.options.num_cpus, include_dashboard=False)
    options = context.options
    items = [{"unit": json.dumps(dataclasses.asdict(u), ensure_ascii=False)} for u in units]
    with _single_operator_data_context(ray.data.DataContext.get_current()):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _process_batch,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"context": context},
            num_cpus=options.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=options.max_concurrent_tasks),
        )
        return [json.loads(row["report"]) for row in ds.take_all()]


@contextlib.contextmanager
def _single_operator_data_context(data_context: Any):
    """Ray Data settings for a job of one map operator with tiny outputs, restored afterwards.

    Measured with Ray 2.60 on 2 CPUs: the per-operator resource reservation holds the job to
    one task until the first task has finished, and a concurrency cap (TaskPoolStrategy size)
    lets the output-queue backpressure run tasks one at a time. Neither has anything to do
    here: there is one operator and its outputs are a few hundred bytes. Ray's scheduler
    still enforces `cpus_per_task`.
    """
    saved = (data_context.op_resource_reservation_enabled, data_context.enable_dynamic_output_queue_size_backpressure)
    data_context.op_resource_reservation_enabled = False
    data_context.enable_dynamic_output_queue_size_backpressure = False
    try:
        yield data_context
    finally:
        data_context.op_resource_reservation_enabled, data_context.enable_dynamic_output_queue_size_backpressure = saved


# ---------------------------------------------------------------------------------------------
# check and summarise


def _summarise(
    units: list[WorkUnit],
    reports: list[dict[str, Any]],
    source_rows: dict[str, int],
    subsets: list[SubsetSpec],
    options: PipelineOptions,
    output_dir: str,
    quarantine_dir: str,
) -> PipelineSummary:
    reports = sorted(reports, key=lambda r: r["index"])
    if [r["index"] for r in reports] != [u.index for u in units]:
        raise PipelineError(f"got reports for {len(reports)} of {len(units)} work units")
    failed = [
        f"{units[r['index']].output_name} ({redact(units[r['index']].source)}): {r['error']}" for r in reports if r["error"]
    ]
    if failed:
        raise PipelineError(f"{len(failed)} work unit(s) failed; outputs left unchanged. First: {'; '.join(failed[:3])}")
    per_subset: dict[str, dict[str, Any]] = {}
    for spec in subsets:
        per_subset[spec.name] = {
            "path": redact(spec.path),
            "format": spec.format,
            "sampling_ratio": spec.sampling_ratio,
            "source_rows": source_rows.get(spec.name, 0),
            "sampled_out": 0, "read": 0, "written": 0, "quarantined": 0,
            "quarantined_by_reason": Counter(),
        }
    for r in reports:
        s = per_subset[r["subset"]]
        if r["read"] != r["written"] + r["quarantined"] or r["source_rows"] != r["read"] + r["sampled_out"]:
            raise PipelineError(f"unit {r['index']}: counts do not add up: {r}")
        for key in ("sampled_out", "read", "written", "quarantined"):
            s[key] += r[key]
        s["quarantined_by_reason"].update(r["reasons"])
    by_reason: Counter = Counter()
    for name, s in per_subset.items():
        if s["source_rows"] != s["read"] + s["sampled_out"]:
            raise PipelineError(
                f"subset {name!r}: {s['source_rows']} source rows but {s['read']} read + {s['sampled_out']} sampled out"
            )
        by_reason.update(s["quarantined_by_reason"])
        s["quarantined_by_reason"] = dict(sorted(s["quarantined_by_reason"].items()))
    summary = PipelineSummary(
        read=sum(s["read"] for s in per_subset.values()),
        written=sum(s["written"] for s in per_subset.values()),
        quarantined=sum(s["quarantined"] for s in per_subset.values()),
        sampled_out=sum(s["sampled_out"] for s in per_subset.values()),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        subsets=per_subset,
        train_files=[r["train_file"] for r in reports if r["train_file"]],
        quarantine_files=[r["quarantine_file"] for r in reports if r["quarantine_file"]],
        output_dir=redact(output_dir),
        quarantine_dir=redact(quarantine_dir),
        options={
            "max_image_pixels": options.max_image_pixels,
            "max_text_chars": options.max_text_chars,
            "max_side": options.max_side,
            "multimodal_input": options.multimodal_input,
            "rows_per_shard": options.rows_per_shard,
            "compression": options.compression,
        },
    )
    assert summary.read == summary.written + summary.quarantined, "read != written + quarantined"
    assert summary.quarantined == sum(summary.quarantined_by_reason.values())
    return summary


def _publish(
    storage: Storage, context: _TaskContext, summary: PipelineSummary, output_dir: str, quarantine_dir: str
) -> None:
    """Staging -> final. summary.json is the commit marker: it lands with (local) or after (S3) the shards."""
    text = summary.to_json().encode()
    storage.publish_dir(context.quarantine_staging, quarantine_dir)
    if is_s3(output_dir):
        storage.publish_dir(context.train_staging, output_dir)
        storage.write_bytes(join(output_dir, SUMMARY_FILE), text)
    else:
        storage.write_bytes(join(context.train_staging, SUMMARY_FILE), text)
        storage.publish_dir(context.train_staging, output_dir)


def _check_output_dirs(output_dir: str, quarantine_dir: str) -> None:
    a, b = output_dir.rstrip("/") + "/", quarantine_dir.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise PipelineError(
            f"output_dir {redact(output_dir)!r} and quarantine_dir {redact(quarantine_dir)!r} must not contain each other"
        )


def _check_replaceable(storage: Storage, final: str) -> None:
    """Refuse to replace a directory that does not look like an output of this pipeline."""
    info = storage.info(final)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.File:
        raise PipelineError(f"{redact(final)!r} is a file, expected an output directory")
    fs, path = storage.resolve(final)
    for item in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        name = item.path.rsplit("/", 1)[-1]
        if item.type == pafs.FileType.File and not (name.endswith(".parquet") or name == SUMMARY_FILE):
            raise PipelineError(
                f"refusing to replace {redact(final)!r}: it holds {name!r}, which this pipeline does not write"
            )


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-yaml", help="subset selection; ${raw_dir} in paths = --input-dir")
    parser.add_argument("--input-dir", help="without a YAML: every parquet shard under it, one subset per folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--quarantine-dir")
    defaults = PipelineOptions()
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--max-side", type=int, default=None, help="resize so the longer side is at most this")
    parser.add_argument("--multimodal-input", action="store_true")
    parser.add_argument("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    parser.add_argument("--executor", choices=["ray", "local"], default=defaults.executor)
    parser.add_argument("--cpus-per-task", type=float, default=defaults.cpus_per_task)
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=...) if Ray is not running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = PipelineOptions(
        max_image_pixels=args.max_image_pixels,
        max_text_chars=args.max_text_chars,
        max_side=args.max_side,
        multimodal_input=args.multimodal_input,
        rows_per_shard=args.rows_per_shard,
        executor=args.executor,
        cpus_per_task=args.cpus_per_task,
        max_concurrent_tasks=args.max_concurrent_tasks,
        num_cpus=args.num_cpus,
    )
    try:
        summary = run_pipeline(
            output_dir=args.output_dir,
            quarantine_dir=args.quarantine_dir,
            dataset_yaml=args.dataset_yaml,
            input_dir=args.input_dir,
            options=options,
        )
    except (DatasetYamlError, PipelineError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.to_json(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
