"""Connecting to Ray: an existing cluster when one is named, else an in-process one on 127.0.0.1."""
from __future__ import annotations

import logging
import os

import ray
from ray._private.utils import write_ray_address

from cafe.config import ExperimentConfig


def init_ray(cfg: ExperimentConfig, address: str | None = None) -> None:
    """`address` (or RAY_ADDRESS, as set by `ray job submit`) joins a running cluster; otherwise
    Ray starts in this process (`address="local"`: never silently joins a head that happens to
    run on this machine). Locally, logical CPUs cover every train worker plus the data
    and evaluation tasks, so on a 2-core laptop neither side waits forever for the other."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.eval.num_actors * cfg.eval.cpus_per_actor + 1
    # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's controller queries
    # to see whether a run's actors are alive and to free a finished run's placement group;
    # without it every query times out and a sweep's next trial waits for CPUs that are never freed.
    context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                       include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                       logging_level=logging.WARNING,  # Ray's start-up chatter stays in its session logs
                       runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu"}})
    print(f"[cafe] Ray started in this process; dashboard: http://{context.dashboard_url}", flush=True)
    # Ray's own helpers that look the cluster up by address (Train's placement-group cleaner,
    # which frees a finished trial's CPUs for the next) read the "latest cluster" file, which
    # only `ray start` writes: left alone it names a stale or foreign head.
    write_ray_address(ray.get_runtime_context().gcs_address)
