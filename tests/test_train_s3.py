"""Training against S3 (moto on 127.0.0.1): the training Parquet is read from s3://, the
checkpoints live under an s3:// storage path, and a worker that dies resumes from them."""
from __future__ import annotations

import boto3
import pyarrow.fs as pafs
import pytest
import ray

from cafe.config import load_config
from cluster import jobs
from cluster.session import init_ray
from pipelines.storage import Storage
from tests.test_pipeline_s3 import moto_endpoint  # noqa: F401 - the module's S3 server
from trainers.run import FAIL_AT_STEP_ENV, InputError, check_training_inputs

pytestmark = pytest.mark.slow
BUCKET = "cafe-train"


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):  # noqa: F811
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=BUCKET)
    return Storage.for_uris([f"s3://{BUCKET}"])


def test_train_from_and_checkpoint_to_s3(s3_env, tmp_path, monkeypatch):
    local = [f"output_dir={tmp_path}/out", f"model.checkpoint={tmp_path}/base", "model.pretrain_config=",
             f"data.raw_dir={tmp_path}/raw", f"data.train_dir={tmp_path}/train", f"data.quarantine_dir={tmp_path}/q",
             f"data.eval_dir={tmp_path}/raw/eval", "data.scenes.train_images=32", "data.scenes.eval_images=8",
             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.batch_size=4", "eval.every_steps=0"]
    cfg = load_config("configs/demo.yaml", local)
    init_ray(cfg)  # after the AWS_* settings: the workers inherit them
    try:
        jobs.prepare_scenes(cfg)
        jobs.ensure_checkpoint(cfg)
        jobs.run_data(cfg)
        shards = sorted((tmp_path / "train").glob("*.parquet"))
        for shard in shards:
            pafs.copy_files(str(shard), f"{BUCKET}/train/{shard.name}", destination_filesystem=s3_env.s3)

        remote = local + [f"data.train_dir=s3://{BUCKET}/train", f"train.storage_path=s3://{BUCKET}/ray",
                          "train.max_steps=4", "train.checkpoint_every=2", "train.max_failures=1", "name=s3-run"]
        cfg = load_config("configs/demo.yaml", remote)
        assert check_training_inputs(cfg) == 4
        monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")  # the resume after it reads step 2's checkpoint from S3
        model_dir, steps = jobs.train(cfg, jobs.open_run(cfg))
        assert steps == 4 and (model_dir / "config.json").exists()
        assert (tmp_path / "out" / "failed_at_step_3").exists()
        listed = s3_env.list_files(f"s3://{BUCKET}/ray/s3-run", ".json", recursive=True)
        assert any("checkpoint_0000002/" in f for f in listed) and any("checkpoint_0000004/" in f for f in listed)
        assert any(f.endswith("checkpoint_0000004/hf/config.json") for f in listed)

        for bad, message in ((f"data.train_dir=s3://{BUCKET}/nothing-here", "cannot be read as training Parquet"),
                             ("train.storage_path=s3://no-such-bucket/ray", "cannot be reached"),
                             ("train.storage_path=gs://elsewhere/ray", "local folder or an s3:// URI")):
            with pytest.raises(InputError, match=message):
                check_training_inputs(load_config("configs/demo.yaml", remote + [bad]))
    finally:
        ray.shutdown()
