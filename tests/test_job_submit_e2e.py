"""The cluster path a user takes: a Ray head started by cluster/start_head.sh, an MLflow
server started by cluster/mlflow_server.sh (both on 127.0.0.1), and `ray job submit` of
`cafe demo` with token authentication. The run must land in the MLflow server."""
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(REPO / ".venv" / "bin" / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture
def services(tmp_path):
    env = {**os.environ, "RAY_NUM_CPUS": "4", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_PORT": str(free_port()),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts")}
    env.pop("RAY_ADDRESS", None)
    mlflow_server = subprocess.Popen(["bash", "cluster/mlflow_server.sh"], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        subprocess.run(["bash", "cluster/start_head.sh"], cwd=REPO, env=env, check=True, capture_output=True,
                       timeout=180)
        tracking_uri = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        wait_http(tracking_uri + "/health")
        yield env, tracking_uri
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        os.killpg(mlflow_server.pid, 15)
        mlflow_server.wait(timeout=30)


def test_ray_job_submit_demo_logs_to_mlflow_server(services, tmp_path):
    env, tracking_uri = services
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    sets = [
        f"output_dir={tmp_path}/out", f"model.checkpoint={tmp_path}/base", "model.pretrain_config=",
        f"data.raw_dir={tmp_path}/raw",
        f"data.train_dir={tmp_path}/train", f"data.quarantine_dir={tmp_path}/quarantine",
        f"data.eval_dir={tmp_path}/raw/eval", "data.scenes.train_images=48", "data.scenes.eval_images=12",
        f"tracking.tracking_uri={tracking_uri}", "train.batch_size=4", "train.max_steps=2",
    ]
    command = [RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
               "cafe", "demo", "--config", "configs/demo.yaml"]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("cafe-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert {"train/loss", "data/written", "eval/retrieval/scenes/t2i_r1"} <= metrics.keys()
