"""Job entrypoints: each stage alone, and the whole flow (`demo`)."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from cafe.config import ExperimentConfig, to_flat_dict, to_yaml
from cafe.tiny import build_tiny_checkpoint
from evaluation.run import RunRef, evaluate_checkpoint
from evaluation.scorecard import comparison_markdown
from evaluation.suites import SuiteTask, prepare_tasks
from pipelines.ingest import run_from_config
from pipelines.scenes import scene_corpus, write_scene_dataset
from trainers.run import train
from trainers.tracking import finish_run, get_or_create_run


def prepare_scenes(cfg: ExperimentConfig) -> dict:
    """Draw the embedded data set (OneVision layout + evaluation files) into raw_dir."""
    s = cfg.data.scenes
    return write_scene_dataset(cfg.data.raw_dir, train_images=s.train_images, eval_images=s.eval_images,
                               image_size=s.image_size, seed=s.seed)


def ensure_checkpoint(cfg: ExperimentConfig) -> Path:
    path = Path(cfg.model.checkpoint)
    if (path / "config.json").is_file():
        return path
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(f"model.checkpoint={path} has no config.json; point it at a LLaVA-OneVision "
                                "directory or set model.build_tiny_if_missing=true")
    return build_tiny_checkpoint(path, scene_corpus(seed=cfg.data.scenes.seed))


def open_run(cfg: ExperimentConfig) -> str:
    return get_or_create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_key=cfg.name,
                             run_name=cfg.tracking.run_name, params=to_flat_dict(cfg))


@contextmanager
def tracked_run(cfg: ExperimentConfig) -> Iterator[str]:
    """The run's MLflow id; the run ends FINISHED, or FAILED if the body raises."""
    run_id = open_run(cfg)
    try:
        yield run_id
    except BaseException:
        finish_run(cfg.tracking.tracking_uri, run_id, status="FAILED")
        raise
    finish_run(cfg.tracking.tracking_uri, run_id)


def ensure_training_data(cfg: ExperimentConfig) -> None:
    """Training Parquet for a run or sweep; the embedded scenes are drawn and converted when
    `data.train_dir` has none and `data.raw_dir` has no input either."""
    if any(Path(cfg.data.train_dir).glob("**/*.parquet")) or "://" in cfg.data.train_dir:
        return
    if not any(Path(cfg.data.raw_dir).glob("**/*.parquet")):
        prepare_scenes(cfg)
    run_data(cfg)


def sweep(cfg: ExperimentConfig, *, resume: bool = False):
    """The sweep's inputs (base checkpoint, training data) once, then the Tune run."""
    from tuning.sweep import run_sweep

    ensure_checkpoint(cfg)
    ensure_training_data(cfg)
    if not Path(cfg.data.eval_dir).exists():
        prepare_scenes(cfg)
    return run_sweep(cfg, resume=resume)


def run_train(cfg: ExperimentConfig) -> Path:
    ensure_checkpoint(cfg)
    with tracked_run(cfg) as run_id:
        return train(cfg, run_id)[0]


def run_data(cfg: ExperimentConfig, run_id: str | None = None):
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    if run_id is None:
        return run_from_config(cfg.data)
    with mlflow.start_run(run_id=run_id):  # the pipeline logs its counts to the active run
        return run_from_config(cfg.data)


def run_eval(cfg: ExperimentConfig, checkpoint: Path, *, tasks: list[SuiteTask] | None = None, step: int = 0,
             label: str = "scorecard", run_id: str | None = None) -> dict[str, float]:
    """Score a checkpoint on `tasks` (default: every configured suite); with no `run_id`, in an
    new MLflow run of its own (each evaluation is its own record; nothing resumes it)."""
    if run_id is not None:
        return _score(cfg, checkpoint, tasks, step, label, run_id)
    eval_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-eval-{checkpoint.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tracking=dataclasses.replace(cfg.tracking, run_name=f"eval {checkpoint.name}"))
    with tracked_run(eval_cfg) as own_run:
        return _score(cfg, checkpoint, tasks, step, label, own_run)


def _score(cfg: ExperimentConfig, checkpoint: Path, tasks: list[SuiteTask] | None, step: int, label: str,
           run_id: str) -> dict[str, float]:
    card = evaluate_checkpoint(cfg, checkpoint, tasks=tasks, tracking=RunRef(cfg.tracking.tracking_uri, run_id),
                               step=step, label=label)
    return card.metrics


def demo(cfg: ExperimentConfig) -> dict:
    """Scenes -> training Parquet -> CAFe training on Ray + DeepSpeed -> the scorecard, all in
    one MLflow run; the untrained checkpoint is scored first as the baseline (step 0), the
    trained one at its last training step."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    prepare_scenes(cfg)
    base = ensure_checkpoint(cfg)
    tasks = prepare_tasks(cfg.eval, cfg.data.eval_dir)
    with tracked_run(cfg) as run_id:
        summary = run_data(cfg, run_id)
        before = run_eval(cfg, base, tasks=tasks, step=0, label="untrained", run_id=run_id)
        model_dir, steps = train(cfg, run_id)
        after = run_eval(cfg, model_dir, tasks=tasks, step=steps, label="trained", run_id=run_id)
        comparison = comparison_markdown({"untrained": before, "trained": after})
        (out / "comparison.md").write_text(comparison + "\n")
        MlflowClient(cfg.tracking.tracking_uri).log_artifact(run_id, str(out / "comparison.md"), "scorecards")
    result = {
        "run_id": run_id,
        "tracking_uri": cfg.tracking.tracking_uri,
        "model": str(model_dir),
        "steps": steps,
        "reports": {"untrained": str(out / "untrained"), "trained": str(out / "trained")},
        "data": {"read": summary.read, "written": summary.written, "quarantined": summary.quarantined},
        "untrained": before,
        "trained": after,
        "comparison": comparison,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    return result
