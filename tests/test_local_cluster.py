"""cluster/local.sh: one command for a local Ray head and MLflow server. Each test owns its
CAFE_HOME, HOME (so the Ray token is generated for it), ports and Ray temp dir, so it never
touches another Ray cluster on the machine."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psutil
import pytest
import requests
from mlflow import MlflowClient

from tests.browser import assert_compare_page_shows, assert_page_shows, find_chromium

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def tcp_listeners(root_pids: list[int]) -> list[tuple[str, str]]:
    """(process name, address) of every TCP socket listening in the given process trees."""
    found = []
    for root in root_pids:
        try:
            tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                sockets = proc.net_connections("tcp")
            except psutil.NoSuchProcess:
                continue
            found += [(proc.name(), c.laddr.ip) for c in sockets if c.status == psutil.CONN_LISTEN]
    return found


IN_PROCESS_RAY = """
import json, os
from cluster.session import keep_local_ray_on_loopback
keep_local_ray_on_loopback(None)
from cafe.config import load_config
from cluster.session import init_ray
init_ray(load_config(None, ["train.num_workers=1", "eval.num_actors=1"]))
import ray
ray.get(ray.remote(lambda: 0).remote())  # a worker process too
from tests.test_local_cluster import tcp_listeners
print(json.dumps(tcp_listeners([os.getpid()])))
"""


def test_in_process_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", IN_PROCESS_RAY], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**env, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(name == "gcs_server" for name, _ in listeners), listeners
    assert all(ip in LOOPBACK for _, ip in listeners), listeners


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    (tmp_path / "home").mkdir()
    return {**env, "HOME": str(tmp_path / "home"), "CAFE_HOME": str(tmp_path / "cafe"),
            "RAY_DASHBOARD_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
            "RAY_GCS_PORT": str(free_port()), "RAY_USAGE_STATS_ENABLED": "0",
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


def sweep_command(root: Path, tracking_uri: str) -> list[str]:
    """`cafe sweep` shrunk to two 4-step trials on the embedded scenes, logging to the server."""
    sets = [f"output_dir={root}/out", f"model.checkpoint={root}/base", "model.pretrain_config=",
            f"data.raw_dir={root}/raw", f"data.train_dir={root}/train", f"data.quarantine_dir={root}/q",
            f"data.eval_dir={root}/raw/eval", "data.scenes.train_images=32", "data.scenes.eval_images=8",
            f"tracking.tracking_uri={tracking_uri}", "train.batch_size=4", "train.max_steps=4", "eval.every_steps=2",
            "tune.search_space={loss.con_weight: 'grid(0.25, 1.0)'}", "tune.scheduler=fifo"]
    return ["cafe", "sweep", "--config", "configs/sweep-demo.yaml", *(a for s in sets for a in ("--set", s))]


def check_sweep_over_rest(mlflow_url: str) -> tuple[dict, list[dict]]:
    """The sweep's parent and child runs as the MLflow REST API returns them."""
    api = f"{mlflow_url}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "cafe-sweeps"},
                              timeout=30).json()["experiment"]
    found = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                          timeout=30).json()["runs"]
    runs = [{"id": r["info"]["run_id"], "status": r["info"]["status"],
             "params": {p["key"]: p["value"] for p in r["data"].get("params", [])},
             "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])},
             "metrics": {m["key"]: m["value"] for m in r["data"].get("metrics", [])}} for r in found]
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["id"]]
    assert len(children) == 2 and {r["status"] for r in runs} == {"FINISHED"}
    assert sorted(float(r["params"]["loss.con_weight"]) for r in children) == [0.25, 1.0]
    for child in children:
        assert {"objective", "eval/retrieval/scenes/i2t_r1", "eval/generation/scenes/caption_loss",
                "train/loss"} <= child["metrics"].keys()
        assert child["tags"]["ray.job_submission_id"].startswith("raysubmit_")
    assert parent["metrics"]["trials"] == 2
    return parent, children


def render_sweep_pages(mlflow_url: str, parent: dict, children: list[dict], tmp_path: Path) -> None:
    """The MLflow compare page of the trials and the sweep's own page, in headless Chromium."""
    assert_compare_page_shows(mlflow_url, {r["id"]: {"loss.con_weight": r["params"]["loss.con_weight"]}
                                           for r in children}, screenshot=tmp_path / "compare.png")
    page = Path(MlflowClient(mlflow_url).download_artifacts(parent["id"], "sweep/sweep.html", str(tmp_path)))
    assert_page_shows(page, [*(r["id"] for r in children), "loss.con_weight"], screenshot=tmp_path / "sweep.png",
                      budget_ms=2000)


@pytest.mark.slow
def test_up_status_submit_down(env, tmp_path):
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
        listeners = tcp_listeners(groups)
        assert any(name == "gcs_server" for name, _ in listeners), listeners
        assert all(ip in LOOPBACK for _, ip in listeners), listeners  # Ray's and MLflow's servers alike
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
                              *sweep_command(tmp_path, mlflow_url)], cwd=REPO, env=submit_env, capture_output=True,
                             text=True, timeout=900)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        assert "Trial status:" in job.stdout  # Tune's trial table, as the job's log shows it
        parent, children = check_sweep_over_rest(mlflow_url)
        browser = find_chromium()
        if browser:
            render_sweep_pages(mlflow_url, parent, children, tmp_path)

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
        if browser is None:  # everything else above was checked; only the pages were not rendered
            pytest.skip("no chromium on PATH: `make chromium` installs Debian's (needs root and apt-get)")
    finally:
        local(env, "down", timeout=180)
        for pgid in groups:  # only what this test started, should `down` have failed
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.slow
def test_state_is_owner_only_and_an_exposed_mlflow_asks_for_a_login(env, tmp_path):
    """Off 127.0.0.1 (here 127.0.0.2, still loopback so nothing leaves the machine) the MLflow
    server runs MLflow's basic-auth app; the token goes where RAY_AUTH_TOKEN_PATH says; every
    state file is its owner's alone, also where an earlier version left them open."""
    state = Path(env["CAFE_HOME"]) / "local"
    state.mkdir(parents=True, mode=0o755)
    (state / "mlflow.db").touch(mode=0o644)  # as left by an earlier version, before the umask
    token_path = tmp_path / "secrets" / "ray_token"
    env = {**env, "CAFE_BIND_HOST": "127.0.0.2", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    temp_dir = tempfile.mkdtemp(prefix="cafe-ray-", dir="/tmp")
    ray_flags = [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--temp-dir={temp_dir}"]
    try:
        up = local(env, "up", *ray_flags, timeout=420)
        assert up.returncode == 0, up.stdout + up.stderr
        assert mode(token_path) == 0o600 and len(token_path.read_text()) == 64
        assert not (Path(env["HOME"]) / ".ray" / "auth_token").exists()
        assert mode(state) == 0o700 and mode(state / "logs") == 0o700
        files = [p for p in state.iterdir() if p.is_file()]
        assert {"mlflow.db", "mlflow.pid", "ray.pid", "mlflow-auth.ini"} <= {p.name for p in files}
        assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}

        mlflow_url = f"http://127.0.0.2:{env['MLFLOW_PORT']}"
        api = f"{mlflow_url}/api/2.0/mlflow/experiments/search"
        assert requests.get(f"{mlflow_url}/health", timeout=10).status_code == 200
        anonymous = requests.get(api, params={"max_results": 1}, timeout=10)
        assert anonymous.status_code == 401, anonymous.text
        password = next(line.split(" = ", 1)[1] for line in (state / "mlflow-auth.ini").read_text().splitlines()
                        if line.startswith("admin_password = "))
        assert password not in up.stdout + up.stderr
        login = requests.get(api, params={"max_results": 1}, auth=("admin", password), timeout=10)
        assert login.status_code == 200, login.text
        assert "MLFLOW_TRACKING_USERNAME=admin" in local(env, "status").stdout
        # a job submitted to the head can log in too
        token = token_path.read_text()
        job = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "job", "submit", "--address",
                              f"http://127.0.0.2:{env['RAY_DASHBOARD_PORT']}", "--", "python", "-c",
                              "import os; print('login', os.environ.get('MLFLOW_TRACKING_PASSWORD') == "
                              f"{password!r})"],
                             cwd=REPO, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                             capture_output=True, text=True, timeout=300)
        assert "login True" in job.stdout, (job.stdout + job.stderr)[-2000:]
    finally:
        local(env, "down", timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)
