"""`cafe sweep`: a Ray Tune run whose trials each run the CAFe TorchTrainer (the Train v2
pattern: a function trainable builds the trainer and passes a Tune report callback).

MLflow: one parent run per sweep, one child run per trial (parent tag, the trial's resolved
config as params, the same metric names as a single run, plus `objective`). Trials report the
in-training scorecard (`eval.every_steps`), so ASHA stops clearly worse ones early. An
interrupted sweep resumes with `Tuner.restore`: finished trials are kept, not rerun.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from cafe.config import ConfigError, ExperimentConfig, config_from_dict, to_flat_dict
from trainers.run import build_trainer, data_order, planned_steps
from trainers.tracking import (
    RUN_KEY_TAG,
    ended_status,
    finish_run,
    get_or_create_run,
    log_metrics,
    provenance_tags,
    take_stop,
)
from tuning.report import SweepSummary, Trial, best_trial, write_sweep_report
from tuning.space import ARM, Dimension, search_space, trial_values, with_values

OBJECTIVE = "objective"
# A trial's function only launches its TorchTrainer, whose workers hold the CPUs. A placement
# group bundle may not be all zeros, so the function asks for a little memory instead of a CPU
# share, and a trial of N one-CPU workers fits a node of N CPUs.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}
SWEEP_TAG = "cafe.sweep"
ARM_TAG = "cafe.arm"
TRIAL_DIR = re.compile(r"_([0-9a-f]{5}_\d{5})_")  # Tune's trial directory: <trainable>_<trial id>_<index>_...


def sweep_name(cfg: ExperimentConfig) -> str:
    return cfg.tune.name or f"{cfg.name}-sweep"


def check_sweep(cfg: ExperimentConfig) -> list[Dimension]:
    """Everything that would make a trial fail or a scheduler blind, before any trial starts."""
    dims = search_space(cfg)
    if not cfg.tune.objective:
        raise ConfigError("tune.objective is empty: give at least one metric and its weight")
    if cfg.eval.every_steps <= 0:
        raise ConfigError("a sweep needs eval.every_steps > 0: trials report the scorecard the objective is built from")
    every = cfg.train.checkpoint_every
    if every and every % cfg.eval.every_steps:
        raise ConfigError(f"train.checkpoint_every ({every}) must be a multiple of eval.every_steps "
                          f"({cfg.eval.every_steps}): every report a trial makes must carry the objective")
    configured = {f"eval/{s.suite}/{d.name}/" for s in cfg.eval.suites for d in s.datasets}
    for metric in cfg.tune.objective:
        if metric.startswith("eval/") and not any(metric.startswith(prefix) for prefix in configured):
            raise ConfigError(f"tune.objective metric {metric!r} comes from no configured suite; "
                              f"eval.suites give {sorted(configured)}")
    return dims


class ObjectiveReport(TuneReportCallback):
    """Adds the weighted objective to every report (rank 0's metrics) before Tune sees it,
    and logs it to the trial's MLflow run at that step."""

    def __init__(self, weights: dict[str, float], tracking_uri: str, run_id: str) -> None:
        super().__init__()
        self.weights, self.tracking_uri, self.run_id = weights, tracking_uri, run_id

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = metrics[0]
        if all(k in first for k in self.weights):
            first[OBJECTIVE] = sum(w * first[k] for k, w in self.weights.items())
            log_metrics(self.tracking_uri, self.run_id, {OBJECTIVE: first[OBJECTIVE]}, step=int(first.get("step", 0)))
        super().after_report(run_context, metrics, checkpoint)


def join(base: str, *parts: str) -> str:
    """A path under a local directory or a URI (s3://...), which Path would mangle."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts).resolve())


def trial_config(base: ExperimentConfig, sampled: dict, trial_id: str, name: str) -> ExperimentConfig:
    cfg = with_values(base, trial_values(base, sampled))
    label = " ".join(filter(None, [name, sampled.get(ARM), trial_id]))
    return dataclasses.replace(cfg, name=f"{name}-{trial_id}",
                               output_dir=join(base.output_dir, "sweeps", name, trial_id),
                               tracking=dataclasses.replace(cfg.tracking, run_name=label))


def run_trial(values: dict, *, base: dict, name: str, parent_run_id: str, storage_path: str,
              tags: dict[str, str]) -> None:
    """One trial: the sampled values set into the base config, its own child MLflow run, and a
    TorchTrainer whose reports reach Tune through `ObjectiveReport`."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config_from_dict(base), values, trial_id, name)
    run_id = get_or_create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_key=cfg.name,
                               run_name=cfg.tracking.run_name, parent_run_id=parent_run_id, params=to_flat_dict(cfg),
                               tags=tags)
    client = MlflowClient(cfg.tracking.tracking_uri)
    client.set_tag(run_id, SWEEP_TAG, name)
    if ARM in values:
        client.set_tag(run_id, ARM_TAG, values[ARM])
    callback = ObjectiveReport(cfg.tune.objective, cfg.tracking.tracking_uri, run_id)
    take_stop(cfg.tracking.tracking_uri, run_id)  # a stop recorded by an earlier attempt is not this one's
    result = build_trainer(cfg, run_id, callbacks=[callback], storage_path=storage_path).fit()
    stopped = take_stop(cfg.tracking.tracking_uri, run_id) is not None  # a non-finite loss ends the trial FAILED
    finish_run(cfg.tracking.tracking_uri, run_id, status="FAILED" if result.error or stopped else "FINISHED")


@dataclass(slots=True)
class SweepResult:
    name: str
    parent_run_id: str
    summary: SweepSummary
    files: list[Path]


def _scheduler(cfg: ExperimentConfig, max_steps: int):
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=max(1, cfg.tune.grace_period),
                         reduction_factor=cfg.tune.reduction_factor)


def run_sweep(cfg: ExperimentConfig, *, resume: bool = False) -> SweepResult:
    dims = check_sweep(cfg)
    name = sweep_name(cfg)
    tracking_uri = cfg.tracking.tracking_uri
    params = {f"tune.{k}": v for k, v in to_flat_dict(cfg.tune).items()}
    tags = provenance_tags()  # the driver's: a trial's process has no job submission of its own
    parent = get_or_create_run(tracking_uri, cfg.tracking.experiment, run_key=name, run_name=name, params=params,
                               tags=tags)
    MlflowClient(tracking_uri).set_tag(parent, SWEEP_TAG, name)
    storage = join(cfg.output_dir, "sweeps")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=dataclasses.asdict(cfg), name=name, parent_run_id=parent,
                             storage_path=join(storage, name, "train"), tags=tags),
        TRIAL_RESOURCES)
    path = f"{storage}/{name}"
    max_steps = planned_steps(data_order(cfg), cfg)
    try:
        if resume:
            if not tune.Tuner.can_restore(path):
                raise ConfigError(f"--resume: no sweep to resume at {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={d.key: d.to_tune() for d in dims},
                tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=cfg.tune.mode, scheduler=_scheduler(cfg, max_steps),
                                            num_samples=cfg.tune.num_samples,
                                            max_concurrent_trials=cfg.tune.max_concurrent_trials or None),
                run_config=tune.RunConfig(name=name, storage_path=storage),
            )
        grid = tuner.fit()
        summary = summarise(cfg, name, dims, grid, max_steps)
        files = _write_report(cfg, summary, parent)
    except BaseException as err:
        finish_run(tracking_uri, parent, status=ended_status(err))
        raise
    finish_run(tracking_uri, parent)
    return SweepResult(name, parent, summary, files)


def summarise(cfg: ExperimentConfig, name: str, dims: list[Dimension], grid, max_steps: int) -> SweepSummary:
    """Trials from Tune (config, last reported step, status) and from their MLflow child runs
    (every metric's last value). A trial whose last report to Tune came before `max_steps` was
    stopped early by the scheduler: its child run ends KILLED with that reason as a tag. One
    that reached it is complete, even when Tune stopped it before its function returned."""
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    children = {r.data.tags.get(RUN_KEY_TAG): r for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'", max_results=10_000)}
    trials = []
    for result in grid:
        trial_id = TRIAL_DIR.search(Path(result.path).name).group(1)
        run = children.get(f"{name}-{trial_id}")
        metrics = dict(run.data.metrics) if run else {}
        total = int(result.metrics.get("step", 0)) if result.metrics else 0  # what Tune saw last
        status = "ERROR" if result.error else "TERMINATED" if total >= max_steps else "STOPPED_EARLY"
        if status == "STOPPED_EARLY" and run:
            client.set_tag(run.info.run_id, "cafe.trial_status", "stopped early by the scheduler")
            finish_run(cfg.tracking.tracking_uri, run.info.run_id, status="KILLED")
        elif status == "TERMINATED" and run and run.info.status == "RUNNING":
            finish_run(cfg.tracking.tracking_uri, run.info.run_id)
        objective = metrics.get(OBJECTIVE)
        params = {d.key: result.config.get(d.key) for d in dims} | trial_values(cfg, result.config)
        trials.append(Trial(trial_id=trial_id, status=status, params=params,
                            metrics=metrics,
                            objective=None if objective is None or math.isnan(objective) else objective,
                            run_id=run.info.run_id if run else None, iterations=total))
    arm_keys = [k for values in cfg.tune.arms.values() for k in values]
    swept = list(dict.fromkeys([d.key for d in dims] + arm_keys))
    return SweepSummary(name=name, objective_name=OBJECTIVE, mode=cfg.tune.mode, trials=trials, swept=swept)


def _write_report(cfg: ExperimentConfig, summary: SweepSummary, parent: str) -> list[Path]:
    retrieval = next((k for k in cfg.tune.objective if "/retrieval/" in k), "eval/retrieval/scenes/i2t_r1")
    caption = next((k for k in cfg.tune.objective if k.endswith("caption_loss")), "eval/generation/scenes/caption_loss")
    out = Path(join(cfg.output_dir, "sweeps", summary.name, "report")) if "://" not in cfg.output_dir else \
        Path(tempfile.mkdtemp(prefix="sweep-report-"))
    files = write_sweep_report(summary, dataclasses.asdict(cfg), out, retrieval_metric=retrieval,
                               caption_metric=caption)
    client = MlflowClient(cfg.tracking.tracking_uri)
    for path in files:
        client.log_artifact(parent, str(path), artifact_path="sweep")
    best = best_trial(summary)
    if best is not None:
        log_metrics(cfg.tracking.tracking_uri, parent, {"best_objective": best.objective,
                                                        "trials": float(len(summary.trials))})
        client.set_tag(parent, "cafe.best_trial", best.trial_id)
    return files
