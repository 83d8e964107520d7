"""User errors on the command line: one line naming the problem, exit code 2, before Ray or
MLflow start (no Ray session, no MLflow store created)."""
from pathlib import Path

import pytest
import ray

from cluster.cli import main
from pipelines.scenes import write_scene_dataset


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scene_dataset(root, train_images=2, eval_images=4, image_size=64, seed=0)
    return root / "eval"


def run(tmp_path, *args):
    return main(["eval", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *args])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/model"], "--checkpoint /no/such/model is not a model directory"),
    (["--suite", "retrieval,mmbe"], "unknown suite 'mmbe'"),
    (["--subset", "ImageNet-1K"], "ImageNet-1K"),
])
def test_eval_user_errors_are_one_line(tmp_path, tiny_checkpoint, eval_dir, capsys, args, message):
    if args[0] != "--checkpoint":
        args = ["--checkpoint", str(tiny_checkpoint), *args]
    assert run(tmp_path, "--set", f"data.eval_dir={eval_dir}", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized()
    assert not Path(tmp_path, "mlflow.db").exists()


def test_eval_without_scenes_says_what_to_run(tmp_path, tiny_checkpoint, capsys):
    assert run(tmp_path, "--checkpoint", str(tiny_checkpoint), "--set", f"data.eval_dir={tmp_path}/none") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "cafe scenes" in err


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """Ten training rows, as `cafe data` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("train")
    pq.write_table(pa.table({"id": [str(i) for i in range(10)]}), root / "part-0.parquet")
    (root / "summary.json").write_text("{}")  # the pipeline's summary sits beside the shards
    return root


def train(tmp_path, *sets):
    args = ["train", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "model.pretrain_config=", "--set", f"output_dir={tmp_path}/out"]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("sets, message", [
    (["data.train_dir={tmp}/no/such/dir"], "data.train_dir {tmp}/no/such/dir cannot be read as training Parquet"),
    (["data.train_dir={tmp}"], "holds no training rows; convert input first: `cafe data"),
    (["data.train_dir={train}", "train.batch_size=8"], "10 training rows cannot fill one batch of 8 on each of 2"),
    (["data.train_dir={train}", "model.checkpoint={tmp}/none", "model.build_tiny_if_missing=false"],
     "model.checkpoint {tmp}/none is not a model directory"),
    (["data.train_dir={train}", "train.batch_size=1", "train.storage_path=s4://bucket/ckpt"],
     "train.storage_path s4://bucket/ckpt: use a local folder or an s3:// URI"),
    (["data.train_dir={train}", "train.batch_size=3", "train.grad_accum_steps=2"],
     "train.batch_size 3 must split into train.grad_accum_steps 2 equal micro-batches"),
    (["data.train_dir={train}", "train.batch_size=2", "train.grad_accum_steps=2", "train.gradcache_chunk=1"],
     "train.grad_accum_steps and train.gradcache_chunk both split the batch"),
    (["data.train_dir={train}", "train.batch_size=2", "train.offload_optimizer=true", "train.zero_stage=0"],
     "train.offload_optimizer needs train.zero_stage 1, 2 or 3"),
])
def test_train_user_errors_are_one_line(tmp_path, train_dir, capsys, sets, message):
    fill = {"tmp": tmp_path, "train": train_dir}
    assert train(tmp_path, *(s.format(**fill) for s in sets)) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**fill) in err and len(err.splitlines()) == 1, err
    assert err.startswith("cafe train: ")
    assert not ray.is_initialized()
    assert not Path(tmp_path, "mlflow.db").exists()


def test_train_under_a_used_name_with_other_settings_is_one_line(tmp_path, train_dir, tiny_checkpoint, capsys,
                                                                 monkeypatch):
    """A run name already launched with other params: one line naming the param, exit code 2,
    and the earlier run is left as it was (not flipped back to RUNNING)."""
    import signal

    from mlflow import MlflowClient

    import cluster.session
    from trainers.tracking import finish_run, get_or_create_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    earlier = get_or_create_run(uri, "cafe", run_key="taken", params={"output_dir": "/somewhere/else"})
    finish_run(uri, earlier)
    capsys.readouterr()  # MLflow's own lines while creating the store
    monkeypatch.setattr(cluster.session, "init_ray", lambda cfg, address: None)  # refused before any Ray work
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    code = train(tmp_path, "name=taken", "tracking.experiment=cafe", f"data.train_dir={train_dir}",
                 "train.batch_size=1", f"model.checkpoint={tiny_checkpoint}")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cafe train: MLflow run {earlier} was launched with output_dir='/somewhere/else'"), err
    assert len(err.splitlines()) == 1 and "Set a new `name`" in err
    run = MlflowClient(uri).get_run(earlier)
    assert run.info.status == "FINISHED" and run.data.params == {"output_dir": "/somewhere/else"}
