"""The sweep's pages rendered in headless Chromium as a user opens them: the self-contained sweep.html
and MLflow's compare page of a sweep's child runs. Skipped only where no chromium binary exists."""
from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.browser import assert_compare_page_shows, assert_page_shows, find_chromium
from tuning.report import SweepSummary, Trial, write_sweep_report

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium or chromium-browser on PATH; "
                                "`make chromium` installs Debian's (root and apt-get): here it was not run or failed")
R1, CAPTION = "eval/retrieval/scenes/i2t_r1", "eval/generation/scenes/caption_loss"
PNG = b"\x89PNG\r\n\x1a\n"
GRID = [(0.25, 0.03), (0.5, 0.07), (1.0, 0.11), (2.0, 0.13)]  # (loss.con_weight, loss.temperature) per trial


def test_sweep_html_renders_trials_best_config_and_plots(tmp_path: Path) -> None:
    objectives = [0.31, 0.47, 0.62, 0.38]
    trials = [Trial(f"t{i}", "TERMINATED", {"loss.con_weight": cw, "loss.temperature": t},
                    {R1: objectives[i], CAPTION: 3.0 - i / 4}, objectives[i], f"run{i}", 5)
              for i, (cw, t) in enumerate(GRID)]
    trials[3].status, trials[3].iterations = "STOPPED_EARLY", 2
    summary = SweepSummary("grid", "objective", "max", trials, ["loss.con_weight", "loss.temperature"])
    base = {"loss": {"con_weight": 1.0, "temperature": 0.05}}
    write_sweep_report(summary, base, tmp_path, retrieval_metric=R1, caption_metric=CAPTION)

    page = assert_page_shows(tmp_path / "sweep.html", [
        "Sweep grid",
        # the best trial's table, then every trial's row best first: id, status, iterations, params,
        # objective, R@1, caption loss, run id
        "trial t2 objective 0.62 status TERMINATED iterations 5 MLflow run run2 loss.con_weight 1 "
        "loss.temperature 0.11",
        "trial_id status iterations loss.con_weight loss.temperature objective " + R1 + " " + CAPTION + " run_id",
        "★ t2 TERMINATED 5 1 0.11 0.62 0.62 2.5 run2 t1 TERMINATED 5 0.5 0.07 0.47 0.47 2.75 run1 "
        "t3 STOPPED_EARLY 2 2 0.13 0.38 0.38 2.25 run3 t0 TERMINATED 5 0.25 0.03 0.31 0.31 3 run0",
        "heatmap_cw_t.png", "pareto.png",
    ], screenshot=tmp_path / "sweep.png", budget_ms=2_000, timeout_s=120)
    prefix = "data:image/png;base64,"
    assert len(page.images) == 2 and all(src.startswith(prefix) for src in page.images)
    assert all(base64.b64decode(src[len(prefix):])[:8] == PNG for src in page.images)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """An MLflow tracking server on 127.0.0.1 (SQLite store in tmp_path), killed with its workers after."""
    uri = f"http://127.0.0.1:{_free_port()}"
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no telemetry (nothing outside answers) and no job runner (7 huey processes the UI pages do not use)
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 300  # first start creates the database: minutes on a busy 2-core box
        while True:
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                if requests.get(uri + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"MLflow server at {uri} did not answer /health in 300 s"
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow  # the server's first start (a new database) and the render: 30-45 s on 2 busy CPUs
def test_mlflow_compare_page_shows_child_runs_params(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("browser-sweep")
    parent = client.create_run(experiment, run_name="grid", tags={"cafe.sweep": "grid"}).info.run_id
    runs = {}
    for i, (cw, t) in enumerate(GRID):
        run_id = client.create_run(experiment, run_name=f"trial-{i}",
                                   tags={"mlflow.parentRunId": parent, "cafe.sweep": "grid"}).info.run_id
        client.log_param(run_id, "loss.con_weight", cw)
        client.log_param(run_id, "loss.temperature", t)
        client.log_metric(run_id, "objective", 0.3 + i / 10)
        client.log_metric(run_id, "train/loss", 2.0 - i / 4)
        client.set_terminated(run_id)
        runs[run_id] = {"loss.con_weight": cw, "loss.temperature": t}
    client.set_terminated(parent)

    page = assert_compare_page_shows(mlflow_server, runs, screenshot=tmp_path / "compare.png")
    # the header, the run names and the metrics (their table shows the names apart from the values), run by
    # run; the parent is not compared
    for text in ["Comparing 4 Runs from 1 Experiment", "trial-0 trial-1 trial-2 trial-3", "objective train/loss",
                 "0.3 0.4 0.5 0.6 2 1.75 1.5 1.25"]:
        assert text in page.text, f"{text!r} not on {page.url}; screenshot: {page.screenshot}"
    assert parent not in page.text
