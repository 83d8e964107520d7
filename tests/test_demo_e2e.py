"""`cafe demo` end to end as a user runs it (a subprocess, in-process Ray, SQLite MLflow),
shrunk to a few minutes: the LM-only base stage, then CAFe, each stage in its MLflow run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cafe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)})


def test_demo_pretrains_the_base_once_then_fine_tunes_it(tmp_path):
    data = {"raw_dir": f"{tmp_path}/raw", "train_dir": f"{tmp_path}/train", "quarantine_dir": f"{tmp_path}/q",
            "eval_dir": f"{tmp_path}/raw/eval", "dataset_yaml": str(REPO / "configs/datasets/scenes.yaml"),
            "scenes": {"train_images": 48, "eval_images": 12, "image_size": 64}}
    stage = yaml.safe_load((REPO / "configs/base.yaml").read_text())
    stage.update(output_dir=f"{tmp_path}/base", data=data, tracking={**stage["tracking"],
                 "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    stage["model"]["checkpoint"] = f"{tmp_path}/base/init"
    stage["train"].update(batch_size=4, max_steps=3, log_every=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(stage))
    overrides = [f"output_dir={tmp_path}/out", f"model.checkpoint={tmp_path}/base/model",
                 f"model.pretrain_config={tmp_path}/base.yaml", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 "train.batch_size=4", "train.max_steps=2", "train.log_every=1",
                 *(f"data.{k}={v}" for k, v in data.items() if k != "scenes")]
    args = ["demo", "--config", str(REPO / "configs/demo.yaml")]
    for o in overrides:
        args += ["--set", o]
    done = cafe(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| `eval/retrieval/scenes/i2t_r1` |" in done.stdout  # the side-by-side scorecard
    assert "| metric | base | CAFe |" in done.stdout
    assert "| `eval/generation/scenes/qa_exact_match_by_type/where` |" in done.stdout  # QA broken down by question type
    assert "Greedy captions of held-out scenes" in done.stdout
    assert not re.findall(r".*\.cc:\d+.*", done.stdout + done.stderr)  # no Ray core (C++) log line on the console
    assert "Running Dataset" not in done.stdout + done.stderr  # nor Ray Data's logged progress blocks

    summary = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["base"] == f"{tmp_path}/base/model"
    for label in ("base", "cafe"):
        report = json.loads((Path(summary["reports"][label]) / "scorecard.json").read_text())
        assert report["step"] == (0 if label == "base" else 2)
        assert {s["suite"] for s in report["suites"]} == {"retrieval", "mmeb", "pope", "generation"}
        assert report["metrics"]["eval/generation/scenes/scene_match_count"] == 12
    assert len(summary["captions"].splitlines()) == 2 + 3  # header, rule, three scenes

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("cafe-demo").experiment_id])}
    assert set(runs) == {"base (LM-only pretraining)", "demo"}
    base_run, demo_run = runs["base (LM-only pretraining)"], runs["demo"]
    assert base_run.info.status == demo_run.info.status == "FINISHED"
    assert base_run.data.params["loss.compute_contrastive_loss"] == "False"
    assert base_run.data.metrics["data/written"] == 48
    assert len(client.get_metric_history(base_run.info.run_id, "train/lm_loss")) == 3
    assert "train/con_loss" not in base_run.data.metrics
    for name in ("eval/retrieval/scenes/i2t_r1", "eval/mmeb/scenes/overall", "eval/pope/scenes/f1",
                 "eval/generation/scenes/caption_loss", "eval/generation/scenes/scene_match"):
        assert [m.step for m in client.get_metric_history(demo_run.info.run_id, name)] == [0, 2]  # base, CAFe
    assert len(client.get_metric_history(demo_run.info.run_id, "train/con_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(demo_run.info.run_id, "scorecards")}
    assert {"scorecards/base", "scorecards/cafe", "scorecards/comparison.md"} <= artifacts

    # the base is cached: pretraining again finds it and trains nothing
    again = cafe("pretrain", "--config", str(REPO / "configs/demo.yaml"), *sum((["--set", o] for o in overrides), []),
                 cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == f"{tmp_path}/base/model"
    assert len(client.search_runs([client.get_experiment_by_name("cafe-demo").experiment_id])) == 2

    # launched again, the finished demo is scored, not retrained: the third launch prints the
    # first's table, and its checkpoint, its model and its metric history are as they were
    table = done.stdout[done.stdout.index("| metric | base | CAFe |"):done.stdout.index("Greedy captions")]
    for _ in range(2):
        relaunch = cafe(*args, cwd=tmp_path)
        assert relaunch.returncode == 0, relaunch.stderr[-2000:]
        assert "demo: finished already" in relaunch.stdout
    assert table in relaunch.stdout
    checkpoint = tmp_path / "out" / "ray_results" / "demo" / "checkpoint_0000002"
    assert (checkpoint / "hf" / "config.json").is_file() and (tmp_path / "out" / "model" / "config.json").is_file()
    for name in ("eval/retrieval/scenes/i2t_r1", "train/con_loss"):
        assert len(client.get_metric_history(demo_run.info.run_id, name)) == 2

    # the finished base stage, launched again towards new base folders, keeps its own checkpoint and export
    for folder in ("base-a", "base-b"):
        moved = cafe("pretrain", "--config", str(REPO / "configs/demo.yaml"),
                     *sum((["--set", o] for o in overrides), []), "--set", f"model.checkpoint={tmp_path}/{folder}",
                     cwd=tmp_path)
        assert moved.returncode == 0, moved.stderr[-2000:]
        assert moved.stdout.strip().splitlines()[-1] == f"{tmp_path}/{folder}"
        assert (tmp_path / folder / "config.json").is_file()
    assert (tmp_path / "base" / "ray_results" / "base" / "checkpoint_0000003" / "hf" / "config.json").is_file()
    assert (tmp_path / "base" / "model" / "config.json").is_file()
    assert len(client.get_metric_history(base_run.info.run_id, "train/lm_loss")) == 3
