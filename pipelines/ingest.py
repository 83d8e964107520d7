"""OneVision parquet / LLaVA json -> training Parquet (+ quarantine), as a Ray Data job.

How a run goes:
1. plan (driver, `pipelines.plan`): list the subsets' files, read parquet footers and the `id`
   column only (or parse the json), mark repeated ids (first occurrence in input order wins),
   cut the input into work units of at most `rows_per_shard` rows;
2. convert (`pipelines.units`, in Ray Data tasks with fractional CPUs, or in a plain loop with
   `executor="local"`): each unit reads its rows, runs `records.convert_row` on each (decode,
   validate, re-encode; every failure becomes a quarantine row with its reason) and writes one
   training shard and one quarantine shard, named after the unit, into staging directories;
3. check and publish (driver, here): read == written + quarantined per unit and per run (the
   written counts are read back from the files' footers), then the staging directories replace
   the outputs and `summary.json` is written with the counts, the files quarantined whole (they
   could not be opened) and the files without rows, both also warned about on the console;
   MLflow gets the counts too when a run is active.

Determinism: file names and row order come from the plan (subset order, sorted file names, row
order), never from scheduling, so re-runs, the Ray and the local executor and any parallelism
give byte-identical files. Reading the output files sorted by name gives the input order.

    python -m pipelines.ingest --dataset-yaml configs/datasets/scenes.yaml --input-dir runs/demo/raw \
        --output-dir runs/demo/train --quarantine-dir runs/demo/quarantine
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from cafe.config import IngestConfig
from cafe.logs import clock
from cafe.schema import SCHEMA_VERSION
from pipelines.pairs import NO_PAIR_REASONS, PAIRED
from pipelines.plan import PipelineError, Plan, WorkUnit, plan_units
from pipelines.records import REASONS, ConvertOptions
from pipelines.storage import Storage, StorageError, is_s3, join, normalise, redact, staging_path
from pipelines.subsets import DatasetYamlError, SubsetSpec, discover_subsets, load_dataset_yaml
from pipelines.units import UnitContext, process_unit

__all__ = ["PipelineError", "PipelineSummary", "run_from_config", "run_pipeline", "select_subsets"]

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
_PLAN_THREADS = 8


@dataclass(kw_only=True)
class PipelineSummary:
    read: int  # rows selected (after sampling) = written + quarantined
    written: int
    quarantined: int
    sampled_out: int  # rows left out on purpose by sampling_ratio
    quarantined_by_reason: dict[str, int]
    paired: int  # written rows with a contrastive pair text (`pipelines.pairs`)
    unpaired_by_reason: dict[str, int]  # written rows without one (they train the LM term only)
    subsets: dict[str, dict[str, Any]]
    train_files: list[str]
    quarantine_files: list[str]
    quarantined_files: list[dict[str, str]]  # input files not opened: subset, file, reason, detail
    files_without_rows: list[dict[str, str]]  # input files read whole that hold no row: subset, file
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


# ---------------------------------------------------------------------------------------------
# public entry points


def run_pipeline(
    *,
    output_dir: str,
    quarantine_dir: str | None = None,
    dataset_yaml: str | None = None,
    input_dir: str | None = None,
    subsets: list[SubsetSpec] | None = None,
    options: IngestConfig | None = None,
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
    options = options or IngestConfig()
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

    plan = plan_units(
        subsets, storage=storage, rows_per_shard=options.rows_per_shard, multimodal_input=options.multimodal_input,
        pair_text=options.pair_text,
    )
    units = plan.units
    log.info("planned %d units over %d subsets (%d source rows)", len(units), len(subsets),
             sum(plan.source_rows.values()))
    _warn_about_files(plan)
    context = UnitContext(
        storage=storage,
        convert=ConvertOptions(
            max_image_pixels=options.max_image_pixels,
            max_text_chars=options.max_text_chars,
            max_side=options.max_side or None,
        ),
        max_image_bytes=options.max_image_bytes,
        compression=options.compression,
        train_staging=staging_path(output_dir),
        quarantine_staging=staging_path(quarantine_dir),
    )
    staging = (context.train_staging, context.quarantine_staging)
    for path in staging:
        storage.remove_dir(path)
        storage.make_dir(path)
    try:
        if options.executor == "ray":
            reports = _run_units_with_ray(units, context, options)
        else:
            reports = [process_unit(u, context) for u in units]
        summary = _summarise(plan, reports, subsets, options, output_dir, quarantine_dir)
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


def run_from_config(data: Any) -> PipelineSummary:
    """Run for a `cafe.config.DataConfig`: its dataset YAML (or every shard under raw_dir), with
    its `ingest` settings."""
    return run_pipeline(
        output_dir=data.train_dir,
        quarantine_dir=data.quarantine_dir,
        dataset_yaml=data.dataset_yaml or None,
        input_dir=data.raw_dir,
        options=data.ingest,
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
    metrics["data/quarantined_files"] = len(summary.quarantined_files)
    metrics["data/files_without_rows"] = len(summary.files_without_rows)
    for reason in REASONS:
        metrics[f"data/quarantined/{reason}"] = summary.quarantined_by_reason.get(reason, 0)
    metrics["data/paired"] = summary.paired
    for reason in NO_PAIR_REASONS:
        metrics[f"data/unpaired/{reason}"] = summary.unpaired_by_reason.get(reason, 0)
    mlflow.log_metrics(metrics)
    mlflow.log_dict(summary.to_dict(), "data/summary.json")
    return True


# ---------------------------------------------------------------------------------------------
# Ray


def _process_batch(batch: pa.Table, context: UnitContext) -> pa.Table:
    reports = [process_unit(WorkUnit(**json.loads(text)), context) for text in batch.column("unit").to_pylist()]
    return pa.table({"report": [json.dumps(r) for r in reports]})


def _run_units_with_ray(units: list[WorkUnit], context: UnitContext, options: IngestConfig) -> list[dict[str, Any]]:
    import ray

    if not units:
        return []
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=options.num_cpus or None, include_dashboard=False)
    # ASCII JSON: a lone surrogate in a row would make Arrow fall back to pickling the unit
    items = [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]
    with _single_operator_data_context(ray.data.DataContext.get_current()), _ray_data_console_quiet():
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _process_batch,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"context": context},
            num_cpus=options.cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=options.max_concurrent_tasks or None),
        )
        progress = IngestProgress(len(units))
        reports = []
        for row in ds.iter_rows():
            reports.append(json.loads(row["report"]))
            progress.unit_done(reports[-1])
        return reports


class IngestProgress:
    """A console line (stderr) every `every_s` seconds while units convert: units done, rows
    written and quarantined, rate and ETA. Ray Data's own progress log goes to its session log."""

    def __init__(self, total_units: int, *, every_s: float = 10.0) -> None:
        self.total, self.every_s = total_units, every_s
        self.done = self.written = self.quarantined = 0
        self.last_line = time.perf_counter()
        self.first_done: float | None = None  # the rate counts from here: task start-up is not throughput

    def unit_done(self, report: dict[str, Any]) -> None:
        self.done += 1
        self.written += report.get("written", 0)  # a failed unit has no counts; the driver names its error
        self.quarantined += report.get("quarantined", 0)
        now = time.perf_counter()
        self.first_done = self.first_done or now
        if now - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        parts = [f"[data] {self.done:,}/{self.total:,} units",
                 f"{self.written:,} rows written, {self.quarantined:,} quarantined"]
        if self.done > 1 and now > self.first_done:
            rate = (self.done - 1) / (now - self.first_done)
            parts += [f"{rate:.2f} units/s", f"ETA {clock((self.total - self.done) / rate)}"]
        return " | ".join(parts)


@contextlib.contextmanager
def _ray_data_console_quiet():
    """Ray Data's logged progress blocks and execution notices off the console (a large ingest
    prints pages of them), still in its `ray-data.log` in the session directory; restored
    afterwards. (In a terminal Ray Data draws progress bars instead, which stay.)"""
    consoles = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = [h.level for h in consoles]
    for handler in consoles:
        handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in zip(consoles, saved):
            handler.setLevel(level)


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


def _warn_about_files(plan: Plan) -> None:
    for problem in plan.quarantined_files:
        log.warning("quarantined %s (subset %r) whole, it cannot be read: %s",
                    problem["file"], problem["subset"], problem["detail"])
    for empty in plan.files_without_rows:
        log.warning("%s (subset %r) holds no rows", empty["file"], empty["subset"])


def _summarise(
    plan: Plan,
    reports: list[dict[str, Any]],
    subsets: list[SubsetSpec],
    options: IngestConfig,
    output_dir: str,
    quarantine_dir: str,
) -> PipelineSummary:
    units, source_rows = plan.units, plan.source_rows
    reports = sorted(reports, key=lambda r: r["index"])
    if [r["index"] for r in reports] != [u.index for u in units]:
        raise PipelineError(f"got reports for {len(reports)} of {len(units)} work units")
    failed = [f"{units[r['index']].output_name} ({redact(units[r['index']].source)}): {r['error']}"
              for r in reports if r["error"]]
    if failed:
        raise PipelineError(f"{len(failed)} work unit(s) failed, outputs left as they were: {'; '.join(failed[:3])}")
    per_subset: dict[str, dict[str, Any]] = {}
    for spec in subsets:
        per_subset[spec.name] = {
            "path": redact(spec.path),
            "format": spec.format,
            "sampling_ratio": spec.sampling_ratio,
            "source_rows": source_rows.get(spec.name, 0),
            "sampled_out": 0, "read": 0, "written": 0, "quarantined": 0,
            "quarantined_by_reason": Counter(),
            "pair_text": spec.pair_text or options.pair_text,
            "pairs": Counter(),
        }
    for r in reports:
        s = per_subset[r["subset"]]
        if r["read"] != r["written"] + r["quarantined"] or r["source_rows"] != r["read"] + r["sampled_out"]:
            raise PipelineError(f"unit {r['index']}: counts do not add up: {r}")
        for key in ("sampled_out", "read", "written", "quarantined"):
            s[key] += r[key]
        s["quarantined_by_reason"].update(r["reasons"])
        s["pairs"].update(r["pairs"])
    by_reason: Counter = Counter()
    unpaired: Counter = Counter()
    for name, s in per_subset.items():
        if s["source_rows"] != s["read"] + s["sampled_out"]:
            raise PipelineError(
                f"subset {name!r}: {s['source_rows']} source rows but {s['read']} read + {s['sampled_out']} sampled out"
            )
        by_reason.update(s["quarantined_by_reason"])
        s["quarantined_by_reason"] = dict(sorted(s["quarantined_by_reason"].items()))
        s.update(_pair_counts(s.pop("pairs"), written=s["written"], subset=name))
        unpaired.update(s["unpaired_by_reason"])
    summary = PipelineSummary(
        read=sum(s["read"] for s in per_subset.values()),
        written=sum(s["written"] for s in per_subset.values()),
        quarantined=sum(s["quarantined"] for s in per_subset.values()),
        sampled_out=sum(s["sampled_out"] for s in per_subset.values()),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        paired=sum(s["paired"] for s in per_subset.values()),
        unpaired_by_reason=dict(sorted(unpaired.items())),
        subsets=per_subset,
        train_files=[r["train_file"] for r in reports if r["train_file"]],
        quarantine_files=[r["quarantine_file"] for r in reports if r["quarantine_file"]],
        quarantined_files=plan.quarantined_files,
        files_without_rows=plan.files_without_rows,
        output_dir=redact(output_dir),
        quarantine_dir=redact(quarantine_dir),
        options={
            "max_image_pixels": options.max_image_pixels,
            "max_image_bytes": options.max_image_bytes,
            "max_text_chars": options.max_text_chars,
            "max_side": options.max_side,
            "multimodal_input": options.multimodal_input,
            "pair_text": options.pair_text,
            "rows_per_shard": options.rows_per_shard,
            "compression": options.compression,
        },
    )
    assert summary.read == summary.written + summary.quarantined, "read != written + quarantined"
    assert summary.quarantined == sum(summary.quarantined_by_reason.values())
    return summary


def _pair_counts(pairs: Counter, *, written: int, subset: str) -> dict[str, Any]:
    """A subset's written rows split into those with a pair and those without, by reason."""
    unpaired = {reason: n for reason, n in sorted(pairs.items()) if reason != PAIRED}
    if pairs[PAIRED] + sum(unpaired.values()) != written:
        raise PipelineError(f"subset {subset!r}: {written} rows written but pair outcomes for {sum(pairs.values())}")
    return {"paired": pairs[PAIRED], "unpaired_by_reason": unpaired}


def _publish(
    storage: Storage, context: UnitContext, summary: PipelineSummary, output_dir: str, quarantine_dir: str
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
            f"output_dir {redact(output_dir)!r} and quarantine_dir {redact(quarantine_dir)!r} must not nest"
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
    defaults = IngestConfig()
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                        help="image files larger than this are quarantined unread")
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--max-side", type=int, default=defaults.max_side,
                        help="resize so the longer side is at most this")
    parser.add_argument("--multimodal-input", action="store_true")
    parser.add_argument("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    parser.add_argument("--executor", choices=["ray", "local"], default=defaults.executor)
    parser.add_argument("--cpus-per-task", type=float, default=defaults.cpus_per_task)
    parser.add_argument("--max-concurrent-tasks", type=int, default=defaults.max_concurrent_tasks)
    parser.add_argument("--num-cpus", type=int, default=defaults.num_cpus,
                        help="ray.init(num_cpus=...) if Ray is not running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = IngestConfig(
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes,
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
