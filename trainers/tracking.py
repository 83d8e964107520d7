"""MLflow bookkeeping. The driver creates (or, on a relaunch, finds) the run and hands its id
to the workers; rank 0 logs to it by id, so no worker depends on an active-run context."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from trainers.driver_watch import pid_alive

RUN_KEY_TAG = "cafe.run_key"
DRIVER_TAG = "cafe.driver"  # host:pid of the process that last launched the run
HEARTBEAT_TAG = "cafe.heartbeat"  # unix seconds, renewed while that process runs it
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 120  # a RUNNING run on another host without a heartbeat this long has lost its driver
STOPPED_TAG = "cafe.stopped"  # why the training loop stopped itself (a non-finite loss), set by rank 0
# JSON that Ray's job supervisor hands a submitted entrypoint; its metadata holds the submission id
RAY_JOB_CONFIG_JSON_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def provenance_tags() -> dict[str, str]:
    """Where a run came from: the code's git commit (and whether the tree had local changes)
    and the Ray job, by its submission id when it came through `ray job submit`."""
    tags = {}
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        commit = status = None
    if commit and commit.returncode == 0:
        tags["cafe.git_commit"] = commit.stdout.strip()
        tags["cafe.git_dirty"] = str(bool(status.stdout.strip())).lower()
    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    submission = job_config.get("metadata", {}).get("job_submission_id")
    if submission:
        tags["ray.job_submission_id"] = submission
    if ray.is_initialized():
        tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    return tags


def get_or_create_run(tracking_uri: str, experiment: str, run_key: str, *, run_name: str | None = None,
                      parent_run_id: str | None = None, params: dict | None = None,
                      tags: dict[str, str] | None = None) -> str:
    """The run whose `cafe.run_key` tag is `run_key`, created if absent. A relaunch of the same
    run continues it, and refuses params that differ from the first launch's."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    query = f"tags.`{RUN_KEY_TAG}` = {_filter_literal(run_key)}"
    existing = client.search_runs([experiment_id], filter_string=query, max_results=1)
    identity = {RUN_KEY_TAG: run_key}
    if parent_run_id:
        identity["mlflow.parentRunId"] = parent_run_id
    if existing:
        run_id = existing[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=run_name or run_key, tags=identity).info.run_id
    if existing and existing[0].info.status == "RUNNING":
        _take_over(existing[0])
    if params:  # a relaunch with other params is refused before its run is touched
        log_params(client, run_id, params)
    if existing:
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, DRIVER_TAG, f"{socket.gethostname()}:{os.getpid()}")
    client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
    for key, value in (tags or {}).items():  # this launch's provenance (a resumed run shows its latest)
        client.set_tag(run_id, key, value)
    return run_id


def _take_over(run) -> None:
    """A relaunch may continue a run left RUNNING only when the process that ran it is gone:
    its pid on this host, or its heartbeat on another."""
    host, _, pid = run.data.tags.get(DRIVER_TAG, ":").rpartition(":")
    beat = int(run.data.tags.get(HEARTBEAT_TAG, "0"))
    if pid and host == socket.gethostname():
        alive = int(pid) == os.getpid() or pid_alive(int(pid))
    else:
        alive = time.time() - beat < STALE_AFTER_SECONDS
    if alive:
        raise RunConflict(f"MLflow run {run.info.run_id} is being run by another process (pid {pid or '?'} on "
                          f"{host or '?'}, heartbeat {int(time.time() - beat)} s ago): wait for it or stop it")
    print(f"[cafe] MLflow run {run.info.run_id} was left RUNNING by a process that is gone (pid {pid or '?'} on "
          f"{host or '?'}); continuing it", flush=True)


@contextmanager
def heartbeat(tracking_uri: str, run_id: str):
    """Renew the run's heartbeat tag while the body runs, so a later launch can tell a live
    run from one whose driver was killed."""
    stop = threading.Event()

    def beat() -> None:
        client = MlflowClient(tracking_uri)
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:  # noqa: BLE001 - a tracking server hiccup must not end the run
                continue

    thread = threading.Thread(target=beat, name="cafe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _filter_literal(value: str) -> str:
    """`value` quoted for an MLflow search filter, which has no escape: double quotes where it holds a single one."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RunConflict(f"run key {value!r} holds both kinds of quote; MLflow cannot search for it")


class RunConflict(ValueError):
    """A launch under a run name whose MLflow run was launched with other params: the user's to
    fix (a new run name), reported as one line with exit code 2."""


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    logged = client.get_run(run_id).data.params
    fresh = []
    for key, value in params.items():
        text = str(value)[:MAX_PARAM_VAL_LENGTH]
        if key in logged:
            if logged[key] != text:
                raise RunConflict(f"MLflow run {run_id} was launched with {key}={logged[key]!r}; this launch has "
                                  f"{text!r}. Set a new `name` to change it.")
            continue
        fresh.append(Param(key, text))
    for start in range(0, len(fresh), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=fresh[start : start + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
    MlflowClient(tracking_uri).log_batch(run_id, metrics=batch)


class MetricLog:
    """Rank 0's training metrics, one point per step however often the run is resumed: steps up
    to the last one already in the run's history (logged before a crash, then trained again
    from an earlier checkpoint) are not logged twice."""

    def __init__(self, tracking_uri: str, run_id: str, *, key: str = "train/loss") -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        # read on every start: a run folder deleted to train again from step 1 keeps its MLflow run
        history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
        self.logged_until = max((m.step for m in history), default=0)

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        if step > self.logged_until:
            log_metrics(self.tracking_uri, self.run_id, metrics, step=step)


def record_stop(tracking_uri: str, run_id: str, reason: str) -> None:
    MlflowClient(tracking_uri).set_tag(run_id, STOPPED_TAG, reason)


def take_stop(tracking_uri: str, run_id: str) -> str | None:
    """Why the last launch's training loop stopped itself, if it did; cleared for the next launch."""
    client = MlflowClient(tracking_uri)
    reason = client.get_run(run_id).data.tags.get(STOPPED_TAG)
    if reason is not None:
        client.delete_tag(run_id, STOPPED_TAG)
    return reason


def ended_status(error: BaseException) -> str:
    """How a run that raised `error` ends: KILLED when stopped (Ctrl-C, SIGTERM), else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)
