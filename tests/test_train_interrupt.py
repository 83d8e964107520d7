"""Stopping `cafe train` (Ctrl-C at a terminal, SIGTERM from `ray job stop`) ends its MLflow run
KILLED, not RUNNING; the same command then resumes from the last checkpoint, in the same run.
Each launch is its own `cafe` process with its own in-process Ray, as a user runs it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 120, 10


def cafe(command: str, overrides: list[str], log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "cluster.cli", command, "--config", "configs/demo.yaml"]
    args += [part for item in overrides for part in ("--set", item)]
    # its own process group, as a terminal's foreground job: a signal reaches Ray's processes too;
    # and Ctrl-C's default action, which a suite started in the background inherits as "ignore"
    return subprocess.Popen(args, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def logged_steps(tracking_uri: str, run_key: str = "interrupted") -> tuple[str | None, list[int]]:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`cafe.run_key` = '{run_key}'")
    if not runs:
        return None, []
    return runs[0].info.run_id, [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]


def wait_for_step(tracking_uri: str, step: int, proc: subprocess.Popen, timeout: float = 300,
                  run_key: str = "interrupted") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be stopped"
        if max(logged_steps(tracking_uri, run_key)[1], default=0) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_stopped_run_is_killed_and_the_same_command_resumes_it(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        "name=interrupted", f"output_dir={tmp_path}/out", f"model.checkpoint={tmp_path}/base", "model.pretrain_config=",
        f"data.raw_dir={tmp_path}/raw", f"data.train_dir={tmp_path}/train", f"data.quarantine_dir={tmp_path}/q",
        f"data.eval_dir={tmp_path}/raw/eval", "data.scenes.train_images=64", "data.scenes.eval_images=8",
        f"tracking.tracking_uri={tracking_uri}", "train.batch_size=4", f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1", "eval.every_steps=0",
    ]
    log = tmp_path / "console.log"
    for command in ("scenes", "data"):
        assert cafe(command, overrides, log).wait(timeout=300) == 0, log.read_text()[-3000:]

    client = MlflowClient(tracking_uri)
    stopped_at = 0
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, then what `ray job stop` sends
        proc = cafe("train", overrides, log)
        wait_for_step(tracking_uri, stopped_at + 2 * CHECKPOINT_EVERY + 2, proc)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        run_id, steps = logged_steps(tracking_uri)
        assert client.get_run(run_id).info.status == "KILLED"
        stopped_at = max(steps)
    assert "its MLflow run is marked KILLED" in log.read_text()

    assert cafe("train", overrides, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    run_id, steps = logged_steps(tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(steps) == list(range(1, STEPS + 1))  # steps trained again after a resume are logged once
    text = log.read_text()
    resumed = [int(line.split("step ")[1].split("/")[0]) for line in text.splitlines()
               if "resumed from the checkpoint of step" in line]
    # each relaunch continued from the last checkpoint before its stop, not from the start
    assert len(resumed) == 2 and all(r > 0 and r % CHECKPOINT_EVERY == 0 for r in resumed), resumed
    assert resumed[1] > resumed[0]
    assert (Path(tmp_path) / "out" / "model" / "config.json").exists()
