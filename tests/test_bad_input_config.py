"""A user's mistake in a config or on the command line: one line naming the key (and for YAML
the file, line and column), exit code 2, before Ray or MLflow start."""
from pathlib import Path

import pytest
import ray

from cafe.config import BOUNDS, UNBOUNDED, ExperimentConfig, numeric_leaves
from cluster.cli import main


def test_every_numeric_key_has_a_range():
    assert set(numeric_leaves(ExperimentConfig())) - UNBOUNDED == set(BOUNDS)


def cafe(tmp_path, *args):
    return main([*args, "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 "--set", f"output_dir={tmp_path}/out"])


@pytest.mark.parametrize("sets, message", [
    (["loss.con_weight=.nan"], "loss.con_weight: nan is not a finite number"),
    (["loss.temperature=.inf"], "loss.temperature: inf is not a finite number"),
    (["train.batch_size=0"], "train.batch_size: 0 is out of range; it must be >= 1"),
    (["train.num_workers=0"], "train.num_workers: 0 is out of range; it must be >= 1"),
    (["train.batch_size=-4"], "train.batch_size: -4 is out of range; it must be >= 1"),
    (["loss.temperature=0"], "loss.temperature: 0 is out of range; it must be > 0"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio: 1.5 is out of range; it must be within [0, 1]"),
    (["data.scenes.question_first=-0.1"], "data.scenes.question_first: -0.1 is out of range; it must be within [0, 1]"),
    (["data.max_turns=-1"], "data.max_turns: -1 is out of range; it must be >= 0"),
    (["loss.compute_language_loss=false", "loss.compute_contrastive_loss=false"], "turn at least one loss on"),
    (["name=it's"], "name: \"it's\" must start with a letter or digit"),
    (["name=../elsewhere"], "name: '../elsewhere' must start with a letter or digit"),
    (["x=[1"], "--set x=[1, line 1, column 3: not valid YAML"),
    (["loss.con_weight=!!python/object:os.system x"], "not valid YAML (could not determine a constructor"),
])
@pytest.mark.parametrize("command", ["train", "demo", "sweep", "eval"])
def test_bad_values_are_one_line_before_anything_starts(tmp_path, capsys, command, sets, message):
    args = [part for s in sets for part in ("--set", s)]
    assert cafe(tmp_path, command, "--config", "configs/demo.yaml", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cafe: config error: ") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert not ray.is_initialized()
    assert not Path(tmp_path, "mlflow.db").exists() and not Path(tmp_path, "out").exists()


@pytest.mark.parametrize("text, message", [
    ("name: x\noutput_dir: [1\n", "line 3, column 1: not valid YAML (expected ',' or ']'"),
    ("name: x\n  bad indent: 1\n", "line 2, column 13: not valid YAML (mapping values are not allowed here)"),
    ("name: !!python/object/apply:os.system [echo owned]\n", "line 1, column 7: not valid YAML (could not determine"),
])
def test_broken_yaml_names_file_line_and_column(tmp_path, capsys, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert cafe(tmp_path, "train", "--config", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cafe: config error: {path}, ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not ray.is_initialized()


def test_truncated_weights_are_one_line_for_eval(tmp_path, tiny_checkpoint, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cafe(tmp_path, "eval", "--checkpoint", str(model)) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors is" in err and "the file is truncated or damaged" in err, err
    assert len(err.splitlines()) == 1
    assert not ray.is_initialized() and not Path(tmp_path, "mlflow.db").exists()

