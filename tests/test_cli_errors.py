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
