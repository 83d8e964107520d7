"""`cafe demo` end to end as a user runs it (a subprocess, in-process Ray, SQLite MLflow),
shrunk to a minute: every stage runs and lands in one MLflow run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_into_one_mlflow_run(tmp_path):
    overrides = [
        f"output_dir={tmp_path}/out", f"model.checkpoint={tmp_path}/base", f"data.raw_dir={tmp_path}/raw",
        f"data.train_dir={tmp_path}/train", f"data.quarantine_dir={tmp_path}/quarantine",
        f"data.eval_dir={tmp_path}/raw/eval", "data.scenes.train_images=48", "data.scenes.eval_images=12",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.batch_size=4", "train.max_steps=2",
    ]
    args = [sys.executable, "-m", "cluster.cli", "demo", "--config", "configs/demo.yaml"]
    for o in overrides:
        args += ["--set", o]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| `eval/retrieval/scenes/i2t_r1` |" in done.stdout  # the side-by-side scorecard

    summary = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    assert summary["data"] == {"read": 48, "written": 48, "quarantined": 0}
    assert summary["steps"] == 2
    for label in ("untrained", "trained"):
        report = json.loads((Path(summary["reports"][label]) / "scorecard.json").read_text())
        assert report["step"] == (0 if label == "untrained" else 2)
        assert {s["suite"] for s in report["suites"]} == {"retrieval", "mmeb", "pope", "generation"}
        for direction in ("i2t", "t2i"):
            for k in (1, 5, 10):
                assert 0.0 <= report["metrics"][f"eval/retrieval/scenes/{direction}_r{k}"] <= 1.0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/written"] == 48
    for name in ("eval/retrieval/scenes/i2t_r1", "eval/mmeb/scenes/overall", "eval/pope/scenes/f1",
                 "eval/generation/scenes/caption_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0, 2]  # untrained, trained
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert (Path(summary["model"]) / "config.json").is_file()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "scorecards")}
    assert {"scorecards/untrained", "scorecards/trained", "scorecards/comparison.md"} <= artifacts
