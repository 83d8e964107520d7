"""pipelines against S3: input and output as `s3://` URIs, served by moto on 127.0.0.1."""
from __future__ import annotations

import io
import json
import logging
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cafe.config import IngestConfig
from cafe.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY
from pipelines.ingest import run_pipeline
from pipelines.onevision import write_onevision_shard
from pipelines.storage import Storage, StorageError
from pipelines.subsets import DatasetYamlError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
BUCKET = "cafe-data"
SECRET = "fake-secret-do-not-log-4242"


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    import boto3

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return Storage.for_uris([f"s3://{BUCKET}"])


def jpeg(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(out, format="JPEG")
    return out.getvalue()


def conv(answer: str, token: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if token else "") + "What is it?"},
            {"from": "gpt", "value": answer}]


def test_s3_input_and_output(ray_cluster, s3, tmp_path, caplog):
    root = f"s3://{BUCKET}/onevision"
    rows = [
        {"id": f"c{i}", "image": {"bytes": jpeg(), "path": None}, "conversations": conv(f"Red {i}."),
         "data_source": "coco"}
        for i in range(5)
    ]
    rows.append({"id": "bad", "image": {"bytes": b"nope", "path": None}, "conversations": conv("x"),
                 "data_source": "coco"})
    write_onevision_shard(rows[:3], f"{root}/sharegpt4v(coco)/train-00000-of-00002.parquet", storage=s3)
    write_onevision_shard(rows[3:], f"{root}/sharegpt4v(coco)/train-00001-of-00002.parquet", storage=s3)
    s3.write_bytes(f"{root}/llava/images/a.jpg", jpeg((0, 0, 255)))
    llava = [
        {"id": "l1", "image": "images/a.jpg", "conversations": conv("Blue.", token=False)},
        {"id": "l2", "image": "images/gone.jpg", "conversations": conv("Gone.")},
    ]
    s3.write_bytes(f"{root}/llava/data.json", json.dumps(llava).encode())
    yaml_path = tmp_path / "datasets.yaml"
    yaml_path.write_text(
        "datasets:\n"
        "  - name: sharegpt4v(coco)\n    path: ${raw_dir}/sharegpt4v(coco)/\n    format: onevision_parquet\n"
        "  - name: llava\n    path: ${raw_dir}/llava/data.json\n    format: llava_json\n"
    )
    out, quarantine = f"s3://{BUCKET}/runs/train", f"s3://{BUCKET}/runs/quarantine"
    options = IngestConfig(executor="ray", rows_per_shard=2)
    with caplog.at_level(logging.INFO):
        summary = run_pipeline(dataset_yaml=str(yaml_path), input_dir=root, output_dir=out, quarantine_dir=quarantine,
                               options=options)

    assert (summary.read, summary.written, summary.quarantined) == (8, 6, 2)
    assert summary.quarantined_by_reason == {"missing_image_file": 1, "undecodable_image": 1}
    files = s3.list_files(out, ".parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == summary.train_files
    fs, _ = s3.resolve(out)
    tables = [pq.read_table(s3.resolve(f)[1], filesystem=fs) for f in files]
    assert [r["id"] for t in tables for r in t.to_pylist()] == \
        [f"sharegpt4v(coco)/c{i}" for i in range(5)] + ["llava/l1"]
    assert all(t.schema.metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode() for t in tables)
    llava_row = tables[-1].to_pylist()[0]
    assert json.loads(llava_row["conversations"])[0]["content"] == "<image>\nWhat is it?"
    bad = [r for f in s3.list_files(quarantine, ".parquet")
           for r in pq.read_table(s3.resolve(f)[1], filesystem=fs).to_pylist()]
    assert sorted((r["id"], r["reason"]) for r in bad) == [
        ("llava/l2", "missing_image_file"), ("sharegpt4v(coco)/bad", "undecodable_image")]
    summary_json = s3.read_bytes(f"{out}/summary.json").decode()
    assert json.loads(summary_json) == summary.to_dict()
    # credentials never leave the environment
    for text in [summary_json, caplog.text] + [r["raw"] + r["detail"] for r in bad]:
        assert SECRET not in text and "fake-key-id" not in text

    # a re-run replaces the outputs: same objects, same bytes, no staging prefix left
    before = {f: s3.read_bytes(f) for f in s3.list_files(out, ".parquet")}
    again = run_pipeline(dataset_yaml=str(yaml_path), input_dir=root, output_dir=out, quarantine_dir=quarantine,
                         options=options)
    assert again.to_dict() == summary.to_dict()
    assert {f: s3.read_bytes(f) for f in s3.list_files(out, ".parquet")} == before
    assert not s3.exists(f"s3://{BUCKET}/runs/.train.staging") and not s3.exists(f"s3://{BUCKET}/runs/.quarantine.staging")


def test_s3_missing_prefix_and_embedded_credentials(s3, tmp_path):
    yaml_path = tmp_path / "d.yaml"
    yaml_path.write_text(f"datasets:\n  - name: nothing\n    path: s3://{BUCKET}/no/such/prefix/\n")
    with pytest.raises(DatasetYamlError, match="subset 'nothing': path 's3://cafe-data/no/such/prefix' does not exist"):
        run_pipeline(dataset_yaml=str(yaml_path), output_dir=f"s3://{BUCKET}/x/train",
                     options=IngestConfig(executor="local"))
    yaml_path.write_text(f"datasets:\n  - name: leaky\n    path: s3://AKIA:{SECRET}@{BUCKET}/data/\n")
    with pytest.raises(DatasetYamlError) as err:
        run_pipeline(dataset_yaml=str(yaml_path), output_dir=f"s3://{BUCKET}/x/train",
                     options=IngestConfig(executor="local"))
    assert "must not embed credentials" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(StorageError):
        s3.resolve(f"s3://{BUCKET}/data?endpoint_override=evil:9000")
