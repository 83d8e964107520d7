"""cluster/local.sh: one command for a local Ray head and MLflow server. Each test owns its
CAFE_HOME, HOME (so the Ray token is generated for it), ports and Ray temp dir, so it never
touches another Ray cluster on the machine."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    (tmp_path / "home").mkdir()
    return {**env, "HOME": str(tmp_path / "home"), "CAFE_HOME": str(tmp_path / "cafe"),
            "RAY_DASHBOARD_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
            "RAY_GCS_PORT": str(free_port()), "RAY_NUM_CPUS": "2", "RAY_USAGE_STATS_ENABLED": "0",
            "CAFE_UP_TIMEOUT": "300"}


def test_bad_subcommand_prints_usage(env):
    for args in ([], ["restart"], ["status", "extra"]):
        done = local(env, *args)
        assert done.returncode == 2 and "usage:" in done.stderr


def test_nothing_running(env):
    status = local(env, "status")
    assert status.returncode == 3
    assert "Ray head: down" in status.stdout and "MLflow:   down" in status.stdout
    down = local(env, "down")
    assert down.returncode == 0 and "nothing running" in down.stdout


def test_up_refuses_a_port_another_service_answers(env, tmp_path):
    server = HTTPServer(("127.0.0.1", int(env["RAY_DASHBOARD_PORT"])), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = local(env, "up")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1 and "already answers" in done.stderr and "RAY_DASHBOARD_PORT" in done.stderr
    assert not list((tmp_path / "cafe" / "local").glob("*.pid"))


@pytest.mark.slow
def test_failed_start_points_at_the_log_and_stops_the_rest(env, tmp_path):
    done = local(env, "up", "--no-such-flag", timeout=300)
    state = tmp_path / "cafe" / "local"
    assert done.returncode == 1
    assert f"Ray head exited while starting; see {state}/logs/ray.log" in done.stderr
    assert "no such option" in (state / "logs" / "ray.log").read_text().lower()
    assert not list(state.glob("*.pid")) and refused(int(env["MLFLOW_PORT"]))


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_up_status_submit_down(env):
    state = Path(env["CAFE_HOME"]) / "local"
    ray_url = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
    mlflow_url = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    # Ports of their own and a temp dir of their own keep this head apart from any other on the machine.
    temp_dir = tempfile.mkdtemp(prefix="cafe-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray_flags = [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--temp-dir={temp_dir}"]
    groups = []
    try:
        up = local(env, "up", *ray_flags, timeout=420)
        groups = [int(p.read_text()) for p in state.glob("*.pid")]
        assert up.returncode == 0, up.stdout + up.stderr
        token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()

        status = local(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert ray_url in status.stdout and mlflow_url in status.stdout
        assert 'RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"' in status.stdout
        assert token not in up.stdout + up.stderr + status.stdout + status.stderr
        assert requests.get(ray_url, timeout=10).status_code == 200
        assert requests.get(f"{mlflow_url}/health", timeout=10).status_code == 200
        assert (state / "mlflow.db").is_file() and (state / "logs" / "ray.log").is_file()

        # token authentication is on, and the printed recipe passes it
        assert requests.get(f"{ray_url}/api/jobs/", timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{ray_url}/api/jobs/", headers=headers, timeout=10).status_code == 200
        submit_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        job = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "job", "submit", "--address", ray_url, "--",
                              "which", "cafe"], cwd=REPO, env=submit_env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert str(REPO / ".venv" / "bin" / "cafe") in job.stdout  # the project's environment is first on PATH

        pids = {p.name: p.read_text() for p in state.glob("*.pid")}
        again = local(env, "up", *ray_flags)
        assert again.returncode == 0 and "nothing to start" in again.stdout
        assert {p.name: p.read_text() for p in state.glob("*.pid")} == pids

        down = local(env, "down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        assert refused(int(env["RAY_DASHBOARD_PORT"])) and refused(int(env["MLFLOW_PORT"]))
        assert refused(int(env["RAY_GCS_PORT"]))
        assert not list(state.glob("*.pid"))
        assert local(env, "status").returncode == 3
    finally:
        local(env, "down", timeout=180)
        for pgid in groups:  # only what this test started, should `down` have failed
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
