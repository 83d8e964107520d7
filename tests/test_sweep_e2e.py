"""`cafe sweep` as a user runs it (a subprocess, in-process Ray, SQLite MLflow): four trials on
2 CPUs, one MLflow child run per trial under the parent, ASHA stopping the trials that cannot
learn (learning rate 2.0) at their first in-training evaluation, and an interrupted sweep
resumed without rerunning its finished trials."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NAME = "sweep-test"


def sweep_command(root: Path, *extra: str) -> list[str]:
    overrides = [
        f"output_dir={root}/out", f"model.checkpoint={root}/base", "model.pretrain_config=", f"data.raw_dir={root}/raw",
        f"data.train_dir={root}/train", f"data.quarantine_dir={root}/q", f"data.eval_dir={root}/raw/eval",
        "data.scenes.train_images=48", "data.scenes.eval_images=8", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        "train.batch_size=4", "train.max_steps=4", "eval.every_steps=2", f"tune.name={NAME}",
        "tune.search_space={train.lr: 'grid(0.002, 2.0)', loss.con_weight: 'grid(0.25, 1.0)'}",
        "tune.grace_period=2", "tune.reduction_factor=2", "tune.max_concurrent_trials=1",
        # the caption loss alone: a model trained at lr 2.0 is clearly worse at step 2
        "tune.objective={eval/generation/scenes/caption_loss: -1.0}",
    ]
    args = [sys.executable, "-m", "cluster.cli", "sweep", "--config", "configs/sweep-demo.yaml", *extra]
    for o in overrides:
        args += ["--set", o]
    return args


def children(client: MlflowClient, parent):
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    return client.search_runs([parent.info.experiment_id], filter_string=query)


def parent_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("cafe-sweeps")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`cafe.run_key` = '{NAME}'")[0]


def loss_steps(client: MlflowClient, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]


def test_sweep_children_asha_and_resume(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # first launch, interrupted (Ctrl-C) once the third trial has started: one trial at a time,
    # so the first two are done (finished, or stopped by ASHA) by then
    log = open(tmp_path / "first-launch.log", "w")  # a file, not a pipe: nobody reads a pipe until the end
    proc = subprocess.Popen(sweep_command(tmp_path), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    started = []
    while time.time() < deadline and proc.poll() is None and len(started) < 3:
        time.sleep(3)
        try:
            started = children(client, parent_run(client))
        except Exception:  # the store is created by the sweep itself
            continue
    assert len(started) >= 3, (tmp_path / "first-launch.log").read_text()[-4000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and exits
    proc.wait(timeout=300)
    log.close()
    done_before = {r.data.tags["cafe.run_key"]: loss_steps(client, r) for r in started
                   if r.data.params["train.lr"] == "0.002"}  # the first two trials in grid order
    assert len(done_before) == 2

    done = subprocess.run(sweep_command(tmp_path, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Trial status" in done.stdout + done.stderr  # Tune's trial table in the log

    parent = parent_run(client)
    assert parent.info.status == "FINISHED"
    runs = children(client, parent)
    assert len(runs) == 4
    assert {(r.data.params["train.lr"], r.data.params["loss.con_weight"]) for r in runs} == \
        {(lr, cw) for lr in ("0.002", "2.0") for cw in ("0.25", "1.0")}
    for run in runs:
        assert run.data.params["train.max_steps"] == "4"
        assert "eval/retrieval/scenes/i2t_r1" in run.data.metrics and "objective" in run.data.metrics
        assert run.info.status in ("FINISHED", "KILLED")
        key = run.data.tags["cafe.run_key"]
        if key in done_before:  # done before the interruption: the resumed sweep did not run it again
            assert loss_steps(client, run) == done_before[key]
    # lr 2.0 wrecks the model: ASHA stops such a trial at its first evaluation (step 2 of 4).
    # Known gap: Tune's stop ends the trial, not its TorchTrainer, whose workers still train to
    # the last step (and may race the run's final status), so only the decision is asserted.
    bad = [r for r in runs if r.data.params["train.lr"] == "2.0"]
    assert any(r.data.tags.get("cafe.trial_status") == "stopped early by the scheduler" for r in bad)
    first_trial = next(r for r in runs if r.data.tags["cafe.run_key"].endswith("_00000"))
    assert first_trial.info.status == "FINISHED" and max(loss_steps(client, first_trial)) == 4
    finished = [r for r in runs if r.info.status == "FINISHED"]

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/sweep.html", "sweep/pareto.png"} <= artifacts
    assert parent.data.metrics["trials"] == 4
    assert parent.data.tags["cafe.best_trial"] in {r.data.tags["cafe.run_key"].rsplit("-", 1)[1] for r in finished}
