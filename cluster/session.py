"""Connecting to Ray: an existing cluster when one is named, else an in-process one on 127.0.0.1."""
from __future__ import annotations

import logging
import os
import socket

from cafe.config import ExperimentConfig

# Ray picks a loopback node address, on which its servers (GCS, raylet, every worker) listen
# instead of on all interfaces, only where it thinks clusters unsupported; it reads this at import.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback(address: str | None) -> None:
    """Call before Ray is imported: an in-process Ray (no cluster address) is a one-node cluster
    that nothing else has to reach, so all of its servers bind 127.0.0.1."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(LOOPBACK_ONLY, "0")


def init_ray(cfg: ExperimentConfig, address: str | None = None) -> None:
    """`address` (or RAY_ADDRESS, as set by `ray job submit`) joins a running cluster; otherwise
    Ray starts in this process (`address="local"`: never silently joins a head that happens to
    run on this machine). Locally, logical CPUs cover every train worker plus the data
    and evaluation tasks, so on a 2-core laptop neither side waits forever for the other."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    dashboard_port = _free_port()
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.eval.num_actors * cfg.eval.cpus_per_actor + 1
    # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's controller queries
    # to see whether a run's actors are alive and to free a finished run's placement group;
    # without it every query times out and a sweep's next trial waits for CPUs that are never freed.
    # Ray's own helpers that find the cluster through the state API (Train's placement-group
    # cleaner, which frees a finished run's CPUs) would otherwise look it up through the "latest
    # cluster" file, which names whichever Ray on this machine started last: with two `cafe`
    # commands running, one cleaner then finds its controller "dead" and removes its run's workers.
    # token authentication stays on; the notice that it is on need not open every run's console
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    api_server = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    # Ray Train's preemption watcher polls for nodes being drained (spot instances) so workers can
    # checkpoint first; this in-process Ray is one node that nothing drains, and the watcher's
    # actor would only print a core-worker error line into every training run's console.
    single_node = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                       include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                       logging_level=logging.WARNING,  # Ray's start-up chatter stays in its session logs
                       runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu",
                                                 **api_server, **single_node}})
    print(f"[cafe] Ray started in this process; dashboard: http://{context.dashboard_url}", flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
