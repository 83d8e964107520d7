"""cluster/cluster.yaml passes Ray's own cluster-launcher validation, and cluster/rayjob.yaml is a
KubeRay RayJob whose entrypoint is a `cafe sweep` the project's config accepts."""
import copy
import shlex
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cafe.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_cluster_yaml_validates():
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    validate_config(config)  # the file as written: ray-schema.json plus the launcher's own checks
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, merged with the AWS defaults
    head = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # else no GPU worker ever starts
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] > 0


def test_rayjob_runs_the_sweep_with_valid_overrides():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("cafe sweep --config configs/sweep-demo.yaml")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(group["template"]["spec"]["containers"] for group in cluster["workerGroupSpecs"])

    words = shlex.split(spec["entrypoint"])
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert {"train.use_gpu=true", "tracking.tracking_uri=http://mlflow.mlflow.svc:5000"} <= set(sets)
    assert any(s.startswith("output_dir=s3://") for s in sets)
    # the tune section is checked by `cafe sweep` itself
    cfg = load_config(None, [s for s in sets if not s.startswith("tune.")])
    assert cfg.train.use_gpu and cfg.output_dir.startswith("s3://")
