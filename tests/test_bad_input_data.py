"""Bad data as a user would bring it, in training input and evaluation sets: every probe gets its
reason, nothing outside an image root or beyond the byte cap is read, and one bad row or file
never costs the others (issue 21)."""
from __future__ import annotations

import json
import logging
import os
import resource
import struct
import time
import types
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafe.config import EvalConfig, IngestConfig
from cafe.files import RefusedFile, check_image_file, confine, read_regular_file
from cluster.cli import main as cafe_main
from evaluation.mmeb import load_mmeb, score_mmeb
from evaluation.pope import load_pope
from evaluation.requests import answer, decode_image
from evaluation.suites import pope_task
from pipelines import ingest
from pipelines.ingest import run_pipeline
from pipelines.onevision import write_onevision_shard
from pipelines.subsets import SubsetSpec
from tests.test_mmeb import _row as mmeb_row
from tests.test_mmeb import _subset as mmeb_subset
from tests.test_pipeline import ANSWER, ASK, fv, jpeg, ov_row, read_dir


def ingest_llava_json(tmp_path: Path, text: str, executor: str = "local", **options):
    """Convert a LLaVA json file (given as text) whose image root is its folder, `tmp_path/lj`."""
    (tmp_path / "lj" / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "lj" / "images" / "ok.jpg").write_bytes(jpeg())
    (tmp_path / "lj" / "data.json").write_text(text)
    subset = SubsetSpec(name="lj", path=str(tmp_path / "lj" / "data.json"), format="llava_json")
    summary = run_pipeline(subsets=[subset], output_dir=str(tmp_path / "train"),
                           quarantine_dir=str(tmp_path / "quarantine"),
                           options=IngestConfig(executor=executor, **options))
    assert summary.read == summary.written + summary.quarantined
    reasons = {row["id"]: row["reason"] for row in read_dir(tmp_path / "quarantine")}
    return summary, [row["id"] for row in read_dir(tmp_path / "train")], reasons


def image_rows(images: dict[str, str]) -> str:
    """A good row `good` with images/ok.jpg, then one row per (id, image path)."""
    rows = [{"id": "good", "image": "images/ok.jpg", "conversations": fv(ASK, ANSWER)}]
    rows += [{"id": row_id, "image": path, "conversations": fv(ASK, ANSWER)} for row_id, path in images.items()]
    return json.dumps(rows)


def test_llava_json_images_outside_the_image_root_are_quarantined(tmp_path):
    (tmp_path / "secret.png").write_bytes(jpeg())  # beside the json's folder: readable, but not its image
    (tmp_path / "lj" / "images").mkdir(parents=True)
    (tmp_path / "lj" / "images" / "link.jpg").symlink_to(tmp_path / "secret.png")
    summary, written, reasons = ingest_llava_json(tmp_path, image_rows({
        "dotdot": "../secret.png", "absolute": str(tmp_path / "secret.png"), "symlink": "images/link.jpg",
        "passwd": "/etc/passwd",
    }))
    assert written == ["lj/good"]
    assert reasons == {f"lj/{name}": "path_outside_root" for name in ("dotdot", "absolute", "symlink", "passwd")}
    assert (summary.read, summary.written, summary.quarantined) == (5, 1, 4)
    assert summary.quarantined_by_reason == {"path_outside_root": 4}


@pytest.mark.parametrize("path, inside", [
    ("a/b.png", True), ("a/../b.png", True), ("s3://bucket/root/b.png", True),
    ("../b.png", False), ("a/../../b.png", False), ("s3://bucket/rooted/b.png", False),
    ("s3://other/root/b.png", False), ("/etc/passwd", False),
])
def test_s3_keys_are_confined_to_the_root_prefix(path, inside):
    if inside:
        assert confine(path, "s3://bucket/root/").startswith("s3://bucket/root/")
    else:
        with pytest.raises(RefusedFile, match="^path_outside_root"):
            confine(path, "s3://bucket/root/")


def test_devices_fifos_folders_and_big_files_are_refused_unread(tmp_path):
    images = tmp_path / "lj" / "images"
    images.mkdir(parents=True)
    os.mkfifo(images / "pipe.jpg")  # opened blocking, this would wait for a writer for ever
    (images / "folder.jpg").mkdir()
    (images / "big.jpg").write_bytes(jpeg(64, 64) + b"\0" * 4096)
    peak_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    summary, written, reasons = ingest_llava_json(tmp_path, image_rows({
        "zero": "/dev/zero", "environ": "/proc/self/environ", "pipe": "images/pipe.jpg",
        "folder": "images/folder.jpg", "big": "images/big.jpg",
    }), max_image_bytes=4096)
    assert written == ["lj/good"]
    assert reasons == {"lj/zero": "path_outside_root", "lj/environ": "path_outside_root",
                       "lj/pipe": "not_a_regular_file", "lj/folder": "not_a_regular_file", "lj/big": "image_too_large"}
    assert (summary.read, summary.quarantined) == (6, 5)
    # the checks themselves, under a root that would let them through
    with pytest.raises(RefusedFile, match="^not_a_regular_file: /dev/zero"):
        check_image_file("zero", "/dev")  # by its stat, not opened
    with pytest.raises(RefusedFile, match="^not_a_regular_file: /dev/zero"):
        read_regular_file("/dev/zero")  # by the opened descriptor, not read
    with pytest.raises(RefusedFile, match="^image_too_large"):  # /proc says 0 bytes: the read is capped
        read_regular_file("/proc/self/environ", max_bytes=8)
    assert time.monotonic() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 256 << 10  # KiB: under 256 MiB


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_lone_surrogate_costs_only_its_row(tmp_path, request, executor):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    text = image_rows({}).removesuffix("]") + (
        ', {"id": "surrogate", "conversations": [{"from": "human", "value": "Hi \\ud800"}, '
        '{"from": "gpt", "value": "Hello."}]}]')
    summary, written, reasons = ingest_llava_json(tmp_path, text, executor=executor)
    assert written == ["lj/good"] and reasons == {"lj/surrogate": "unencodable_text"}
    assert (summary.read, summary.written, summary.quarantined) == (2, 1, 1)
    raw = json.loads(read_dir(tmp_path / "quarantine")[0]["raw"])
    assert raw["conversations"][0]["value"] == "Hi \ud800"  # kept as a JSON escape, read back as it was


def invalid_utf8_shard(path: Path, bad_column: str) -> None:
    """Three rows (ids <file>1 to <file>3); the middle one's `bad_column` holds bytes that are not
    UTF-8 (Arrow writes them unchecked, as a foreign writer might)."""
    good = json.dumps(fv(("human", "What is 2+2?"), ("gpt", "4"))).encode()  # text only: these rows have no image
    ids = [f"{path.stem}{i}".encode() for i in (1, 2, 3)]
    values = {"id": ids, "conversations": [good] * 3, "data_source": [b"x"] * 3}
    values[bad_column][1] = b"\xff\xfe" + values[bad_column][1]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, pa.binary()).view(pa.string()) for k, v in values.items()}), path)


def test_invalid_utf8_in_parquet_quarantines_only_its_rows(tmp_path):
    invalid_utf8_shard(tmp_path / "raw" / "s" / "a.parquet", "conversations")
    invalid_utf8_shard(tmp_path / "raw" / "s" / "b.parquet", "id")  # the column the plan reads
    summary = run_pipeline(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "train"),
                           options=IngestConfig(executor="local"))
    assert [r["id"] for r in read_dir(tmp_path / "train")] == ["s/a1", "s/a3", "s/b1", "s/b3"]
    assert (summary.read, summary.written, summary.quarantined_by_reason) == (6, 4, {"undecodable_text": 2})
    details = sorted(r["detail"] for r in read_dir(tmp_path / "train-quarantine"))
    assert details[0].startswith("column 'conversations' is not UTF-8") and details[1].startswith("column 'id'")


def good_shard(path: Path) -> None:
    write_onevision_shard([ov_row("1", fv(ASK, ANSWER), jpeg()), ov_row("2", fv(ASK, ANSWER), jpeg())], str(path))


@pytest.mark.parametrize("damage, detail", [
    (lambda data: data[: len(data) // 2], "ArrowInvalid: Parquet magic bytes not found in footer"),
    (lambda data: b"", "the file is empty (0 bytes)"),
], ids=["truncated", "zero_bytes"])
def test_an_unreadable_parquet_is_quarantined_whole_and_named(tmp_path, damage, detail):
    good_shard(tmp_path / "raw" / "s" / "a.parquet")
    good_shard(tmp_path / "raw" / "broken" / "b.parquet")  # alone in its folder: only the scan finds it
    broken = tmp_path / "raw" / "broken" / "b.parquet"
    broken.write_bytes(damage(broken.read_bytes()))
    summary = run_pipeline(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "train"),
                           options=IngestConfig(executor="local"))
    assert (summary.read, summary.written, summary.quarantined) == (2, 2, 0)
    (problem,) = summary.quarantined_files
    assert problem.pop("detail").startswith(detail)
    assert problem == {"subset": "broken", "file": str(broken), "reason": "unreadable_file"}
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["quarantined_files"][0]["file"] == str(broken)


def test_a_parquet_without_rows_is_counted_and_warned_about(tmp_path, caplog, capsys):
    good_shard(tmp_path / "raw" / "s" / "a.parquet")
    write_onevision_shard([], str(tmp_path / "raw" / "s" / "empty.parquet"))
    with caplog.at_level(logging.WARNING, logger=ingest.log.name):
        code = ingest.main(["--input-dir", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "train"),
                            "--executor", "local"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    empty = {"subset": "s", "file": str(tmp_path / "raw" / "s" / "empty.parquet")}
    assert summary["files_without_rows"] == [empty] and summary["written"] == 2 and summary["quarantined_files"] == []
    assert [r.getMessage() for r in caplog.records] == [f"{empty['file']} (subset 's') holds no rows"]


def png(width: int, height: int) -> bytes:
    """A PNG header of the given size around a few bytes of pixels: a bomb when the size is large."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def test_eval_images_outside_the_root_are_counted_skips(tmp_path):
    (tmp_path / "ok.png").write_bytes(jpeg())
    lines = [{"question_id": 1, "image": "ok.png", "text": "Is there a dog?", "label": "yes"},
             {"question_id": 2, "image": "../../etc/passwd", "text": "Is there a cat?", "label": "no"}]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    items, skipped = load_pope(tmp_path / "pope.jsonl")
    assert [it.question_id for it in items] == [1]
    assert [(s["question_id"], s["reason"].split(":")[0]) for s in skipped] == [(2, "path_outside_root")]

    os.mkfifo(tmp_path / "pipe.png")
    mmeb_subset(tmp_path / "mmeb", "S", [mmeb_row("q", ["a", "b"], "ok.png"), mmeb_row("q", ["a"], "../../etc/passwd"),
                                         mmeb_row("q", ["a"], "", ["pipe.png"])])
    data = load_mmeb(tmp_path / "mmeb", tmp_path)
    assert [r.row for r in data.rows] == [0]
    assert [(s["row"], s["reason"].split(":")[0]) for s in data.skipped] == [(1, "path_outside_root"),
                                                                            (2, "not_a_regular_file")]
    metrics, _ = score_mmeb(data, [[1.0, 0.0]] * len(data.items), [False] * len(data.items))
    assert metrics["skipped_rows"] == 2.0


def test_an_eval_bomb_is_a_counted_skip_and_the_rest_is_scored(tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"question_id": i, "question": f"Is there a dog? {i}", "answer": "yes", "image": {"bytes": data}}
            for i, data in enumerate([jpeg(), png(20_000, 20_000), jpeg(), b"not an image"])]
    rows.append({"question_id": 4, "question": "Is there a cat?", "answer": "no",
                 "image": {"path": "../../etc/passwd"}})
    (tmp_path / "pope").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([("question_id", pa.int64()), ("question", pa.string()),
                                                         ("answer", pa.string()), ("image", image)])),
                   tmp_path / "pope" / "test.parquet")
    task = pope_task("probe", tmp_path / "pope" / "test.parquet", None, EvalConfig())
    says_yes = types.SimpleNamespace(hidden_size=4, generate=lambda inputs, max_new_tokens: ["yes"] * len(inputs))
    result = task.score(answer(says_yes, task.requests))
    assert (result.metrics["count"], result.metrics["accuracy"], result.metrics["skipped"]) == (2.0, 1.0, 3.0)
    reasons = {s["question_id"]: s["reason"].split(":")[0] for s in result.skipped}
    assert reasons == {1: "image_too_large", 3: "undecodable_image", 4: "path_outside_root"}
    with pytest.raises(ValueError, match="^image_too_large: Image size"):
        decode_image(png(20_000, 20_000), None)


def test_pope_without_an_image_column_is_one_line_exit_2(tmp_path, capsys):
    pope = tmp_path / "eval" / "pope" / "scenes" / "test.parquet"
    pope.parent.mkdir(parents=True)
    pq.write_table(pa.table({"question_id": [1], "question": ["Is there a dog?"], "answer": ["yes"]}), pope)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # all the CLI checks before loading the data
    code = cafe_main(["eval", "--checkpoint", str(tmp_path / "model"), "--suite", "pope",
                      "--set", f"data.eval_dir={tmp_path / 'eval'}",
                      "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"cafe eval: {pope}: missing 'image'; "
                   "a POPE parquet file has question_id, question, answer, image")
