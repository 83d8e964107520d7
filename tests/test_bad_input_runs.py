"""Runs that end badly or are launched again: nothing a user trained is lost, nothing is logged
twice, nothing non-finite is exported. Each launch is its own `cafe` process, as a user runs it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.test_train_interrupt import cafe, logged_steps, wait_for_step

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 60, 10


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Drawn and converted once: the overrides every run of this module shares."""
    root = tmp_path_factory.mktemp("runs")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    shared = [f"model.checkpoint={root}/init", "model.pretrain_config=", f"data.raw_dir={root}/raw",
              f"data.train_dir={root}/train", f"data.quarantine_dir={root}/q", f"data.eval_dir={root}/raw/eval",
              "data.scenes.train_images=64", "data.scenes.eval_images=8", f"tracking.tracking_uri={tracking_uri}",
              "train.batch_size=4", "train.log_every=1", "eval.every_steps=0"]
    log = root / "setup.log"
    for command in ("scenes", "data"):
        assert cafe(command, shared, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    return root, shared, tracking_uri


def run_overrides(root: Path, shared: list[str], name: str, *extra: str) -> list[str]:
    return [*shared, f"name={name}", f"output_dir={root}/{name}", f"train.max_steps={STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", *extra]


def session_workers(session: int) -> list[psutil.Process]:
    """Ray Train workers started under a driver's session (its process group's leader pid)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == session and "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def test_killed_driver_then_relaunches_leave_one_finished_run(scenes):
    root, shared, tracking_uri = scenes
    overrides = run_overrides(root, shared, "killed")
    log = root / "killed.log"
    proc = cafe("train", overrides, log)
    wait_for_step(tracking_uri, 15, proc, run_key="killed")
    assert session_workers(proc.pid), "no training workers found under the driver's session"
    proc.send_signal(signal.SIGKILL)  # the driver alone, as the kernel's OOM killer would
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while session_workers(proc.pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not session_workers(proc.pid), "training workers outlived their driver by 60 s"
    client = MlflowClient(tracking_uri)
    run_id, _ = logged_steps(tracking_uri, "killed")
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could mark it

    for _ in range(2):
        assert cafe("train", overrides, log).wait(timeout=600) == 0, log.read_text()[-3000:]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted(logged_steps(tracking_uri, "killed")[1]) == list(range(1, STEPS + 1))
    text = log.read_text()
    assert f"MLflow run {run_id} was left RUNNING by a process that is gone" in text
    assert text.count("killed: finished already") == 1
    folder = root / "killed" / "ray_results" / "killed"
    snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
    registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    assert registered == [f"checkpoint_{STEPS - CHECKPOINT_EVERY:07d}", f"checkpoint_{STEPS:07d}"]
    on_disk = sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
    assert on_disk == registered  # orphans of the killed launch removed, nothing of the finished run deleted
    assert (root / "killed" / "model" / "config.json").is_file()

    # a registered checkpoint that was deleted by hand: one line saying what to do, nothing else touched
    shutil.rmtree(folder / registered[-1])
    assert cafe("train", overrides, log).wait(timeout=300) == 2
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"cafe train: the run folder {folder} lists checkpoint {registered[-1]}, which no longer "
                           "exists; restore it, or delete"), last
    assert (root / "killed" / "model" / "config.json").is_file()


def test_non_finite_loss_fails_the_run_and_exports_nothing(scenes):
    root, shared, tracking_uri = scenes
    log = root / "nan.log"
    # worker failures may be retried: a deliberate stop must not be (it would fail the same way each time)
    overrides = run_overrides(root, shared, "exploding", "train.lr=1.0e+12", "train.checkpoint_every=1",
                              "train.max_failures=2")
    assert cafe("train", overrides, log).wait(timeout=300) == 1
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("cafe train:")]
    assert len(lines) == 1 and "the loss is not finite at step 2 (loss nan" in lines[0], text[-2000:]
    assert "Traceback" not in text
    run_id, steps = logged_steps(tracking_uri, "exploding")
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"
    assert steps == [1]
    assert not (root / "exploding" / "model").exists()
    folder = root / "exploding" / "ray_results" / "exploding"
    checkpoints = sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_0000001"]  # the last finite one stays
