"""Scoring a checkpoint directory on the configured suites (after training, or any HF
checkpoint), with the Ray actor pool or in this process, into an MLflow run and a report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from mlflow import MlflowClient
from mlflow.entities import Metric

from cafe.config import ExperimentConfig
from cafe.inference import InferenceModel
from evaluation.backends import ActorPool, in_process
from evaluation.scorecard import Scorecard, score_tasks, write_report
from evaluation.suites import SuiteTask, prepare_tasks


class RunRef(NamedTuple):
    """An MLflow run that already exists; evaluation logs into it and never creates one."""

    tracking_uri: str
    run_id: str


def log_scorecard(run: RunRef, metrics: dict[str, float], *, step: int, files: list[Path] = (),
                  artifact_path: str | None = None) -> None:
    """Log a scorecard at `step`, leaving out metrics the run already has at that step (a
    relaunch of a finished run scores it again): one point per metric and step."""
    client = MlflowClient(run.tracking_uri)
    now = int(time.time() * 1000)
    known = client.get_run(run.run_id).data.metrics  # a fresh run: nothing to look up
    batch = [Metric(k, v, now, step) for k, v in metrics.items()
             if k not in known or not _logged_at(client, run.run_id, k, step)]
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(run.run_id, metrics=batch[start : start + 1000])
    for path in files:
        client.log_artifact(run.run_id, str(path), artifact_path=artifact_path)


def _logged_at(client: MlflowClient, run_id: str, key: str, step: int) -> bool:
    return any(m.step == step for m in client.get_metric_history(run_id, key))


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, *, tasks: list[SuiteTask] | None = None,
                        suites: list[str] | None = None, use_ray: bool = True, tracking: RunRef | None = None,
                        step: int = 0, report_dir: Path | None = None, label: str = "scorecard") -> Scorecard:
    """Score `checkpoint` on `tasks` (default: every configured suite, or only `suites`).

    Args:
        use_ray: answer on a pool of `eval.num_actors` Ray actors, warm for every suite of this
            call (each loads the model once); False: in this process.
        tracking: an existing MLflow run to log metrics (at `step`) and the report files to.
        report_dir: where the report goes (default `<output_dir>/<label>`).
        label: names the report folder and its MLflow artifact folder, e.g. `base`, `cafe`.
    """
    tasks = tasks if tasks is not None else prepare_tasks(cfg.eval, cfg.data.eval_dir, suites=suites)
    if use_ray:
        pool = ActorPool(num_actors=cfg.eval.num_actors, cpus_per_actor=cfg.eval.cpus_per_actor,
                         use_gpu=cfg.train.use_gpu)
        try:
            card = score_tasks(tasks, pool.backend(str(checkpoint), batch_size=cfg.eval.batch_size,
                                                   emb_type=cfg.loss.emb_type))
        finally:
            pool.close()  # its CPUs go back to the cluster (training, or the next job)
    else:
        card = score_tasks(tasks, in_process(InferenceModel.load(
            checkpoint, device="cuda" if cfg.train.use_gpu else "cpu", emb_type=cfg.loss.emb_type,
            batch_size=cfg.eval.batch_size)))
    files = write_report(card, report_dir or Path(cfg.output_dir) / label, title=f"{cfg.name}: {label} (step {step})",
                         checkpoint=str(checkpoint), step=step)
    if tracking is not None:
        log_scorecard(tracking, card.metrics, step=step, files=files, artifact_path=f"scorecards/{label}")
    return card
