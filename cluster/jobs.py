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

from cafe.config import ExperimentConfig, load_config, to_flat_dict, to_yaml, with_absolute_paths
from cafe.logs import clock
from cafe.tiny import build_tiny_checkpoint
from evaluation.run import RunRef, evaluate_checkpoint
from evaluation.scorecard import Scorecard, comparison_markdown
from evaluation.suites import SuiteTask, prepare_tasks
from pipelines.ingest import run_from_config
from pipelines.scenes import scene_corpus, write_scene_dataset
from trainers.checkpoints import publish_model, recover_published
from trainers.run import train
from trainers.tracking import ended_status, finish_run, get_or_create_run, heartbeat, provenance_tags


@contextmanager
def stage(what: str) -> Iterator[None]:
    """One console line as a stage starts, and one with its wall time as it ends."""
    print(f"[cafe] {what} ...", flush=True)
    started = time.perf_counter()
    yield
    print(f"[cafe] {what}: done in {clock(time.perf_counter() - started)}", flush=True)


def prepare_scenes(cfg: ExperimentConfig) -> dict:
    """Draw the embedded data set (OneVision layout + evaluation files) into raw_dir."""
    s = cfg.data.scenes
    return write_scene_dataset(cfg.data.raw_dir, train_images=s.train_images, eval_images=s.eval_images,
                               image_size=s.image_size, seed=s.seed, question_first=s.question_first)


def ensure_checkpoint(cfg: ExperimentConfig) -> Path:
    """`model.checkpoint`, made when missing: by the pretraining stage where one is configured,
    else as the random-init tiny model."""
    path = Path(cfg.model.checkpoint)
    recover_published(path)
    if (path / "config.json").is_file():
        return path
    if cfg.model.pretrain_config:
        return pretrain(cfg)
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(f"model.checkpoint={path} has no config.json; point it at a LLaVA-OneVision "
                                "directory or set model.build_tiny_if_missing=true")
    return build_tiny_checkpoint(path, scene_corpus(seed=cfg.data.scenes.seed), cfg.model.tiny)


def pretrain_stage_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return with_absolute_paths(load_config(cfg.model.pretrain_config, []))


def pretrain(cfg: ExperimentConfig) -> Path:
    """The LM-only stage of `model.pretrain_config` (its own data, init and MLflow run), cached:
    its trained model is copied to `model.checkpoint`, which later runs find and reuse."""
    target = Path(cfg.model.checkpoint)
    if (target / "config.json").is_file():
        return target
    base = pretrain_stage_config(cfg)
    print(f"[cafe] no base at {target}: the LM-only stage {cfg.model.pretrain_config} trains it once", flush=True)
    ensure_checkpoint(base)
    with tracked_run(base) as run_id:
        ensure_training_data(base, run_id)
        with stage(f"pretraining the base, LM loss only, {base.train.max_steps} steps on "
                   f"{base.train.num_workers} Ray Train workers"):
            model_dir, _ = train(base, run_id)
    if model_dir.resolve() != target.resolve():
        publish_model(model_dir, target)
    return target


def open_run(cfg: ExperimentConfig) -> str:
    return get_or_create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, run_key=cfg.name,
                             run_name=cfg.tracking.run_name, params=to_flat_dict(cfg), tags=provenance_tags())


@contextmanager
def tracked_run(cfg: ExperimentConfig) -> Iterator[str]:
    """The run's MLflow id; the run ends FINISHED, KILLED when stopped (Ctrl-C, `ray job stop`),
    or FAILED if the body raises. Launching the same config again continues the same run."""
    run_id = open_run(cfg)
    try:
        with heartbeat(cfg.tracking.tracking_uri, run_id):
            yield run_id
    except BaseException as err:
        finish_run(cfg.tracking.tracking_uri, run_id, status=ended_status(err))
        raise
    finish_run(cfg.tracking.tracking_uri, run_id)


def ensure_training_data(cfg: ExperimentConfig, run_id: str | None = None) -> None:
    """Training Parquet for a run or sweep, made once: the embedded scenes (training input and
    evaluation files) are drawn when `data.train_dir` has no Parquet and `data.raw_dir` has no
    input either, then converted."""
    if any(Path(cfg.data.train_dir).glob("**/*.parquet")) or "://" in cfg.data.train_dir:
        return
    if not any(Path(cfg.data.raw_dir).glob("**/*.parquet")):
        with stage(f"drawing {cfg.data.scenes.train_images:,} training and {cfg.data.scenes.eval_images} held-out "
                   f"scenes into {cfg.data.raw_dir}"):
            prepare_scenes(cfg)
    with stage(f"converting them with Ray Data into training Parquet in {cfg.data.train_dir}"):
        run_data(cfg, run_id)


def sweep(cfg: ExperimentConfig, *, resume: bool = False):
    """The sweep's inputs (base checkpoint, training data) once, then the Tune run."""
    from tuning.sweep import run_sweep

    ensure_checkpoint(cfg)
    ensure_training_data(cfg)
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
        return _score(cfg, checkpoint, tasks, step, label, run_id).metrics
    eval_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-eval-{checkpoint.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tracking=dataclasses.replace(cfg.tracking, run_name=f"eval {checkpoint.name}"))
    with tracked_run(eval_cfg) as own_run:
        return _score(cfg, checkpoint, tasks, step, label, own_run).metrics


def _score(cfg: ExperimentConfig, checkpoint: Path, tasks: list[SuiteTask] | None, step: int, label: str,
           run_id: str) -> Scorecard:
    return evaluate_checkpoint(cfg, checkpoint, tasks=tasks, tracking=RunRef(cfg.tracking.tracking_uri, run_id),
                               step=step, label=label)


def demo(cfg: ExperimentConfig) -> dict:
    """The CAFe question on the embedded default: the base (pretrained LM-only on first use,
    then cached) is scored, fine-tuned with CAFe on Ray + DeepSpeed and scored again, in one
    MLflow run; the two scorecards and a few greedy captions are set side by side."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    base = ensure_checkpoint(cfg)
    ensure_training_data(cfg)
    tasks = prepare_tasks(cfg.eval, cfg.data.eval_dir)
    with tracked_run(cfg) as run_id:
        with stage("scoring the base: retrieval, MMEB, POPE, generation"):
            before = _score(cfg, base, tasks, 0, "base", run_id)
        with stage(f"fine-tuning the base with CAFe (con_weight {cfg.loss.con_weight}) on {cfg.train.num_workers} "
                   "Ray Train workers"):
            model_dir, steps = train(cfg, run_id)
        with stage("scoring the fine-tuned model"):
            after = _score(cfg, model_dir, tasks, steps, "cafe", run_id)
        comparison = comparison_markdown({"base": before.metrics, "CAFe": after.metrics})
        captions = caption_comparison(before, after, limit=3)
        (out / "comparison.md").write_text(f"{comparison}\n\n{captions}\n")
        MlflowClient(cfg.tracking.tracking_uri).log_artifact(run_id, str(out / "comparison.md"), "scorecards")
    result = {
        "run_id": run_id,
        "tracking_uri": cfg.tracking.tracking_uri,
        "base": str(base),
        "model": str(model_dir),
        "steps": steps,
        "train_dir": cfg.data.train_dir,
        "reports": {"base": str(out / "base"), "cafe": str(out / "cafe")},
        "base_metrics": before.metrics,
        "cafe_metrics": after.metrics,
        "comparison": comparison,
        "captions": captions,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    return result


def caption_comparison(before: Scorecard, after: Scorecard, *, limit: int) -> str:
    """Greedy captions of the first held-out scenes by both models, beside the truth."""
    def samples(card: Scorecard) -> list[dict]:
        return next((r.samples for t, r in card.results if t.suite == "generation"), [])

    lines = ["| scene | truth | base | CAFe |", "|---|---|---|---|"]
    for b, a in list(zip(samples(before), samples(after)))[:limit]:
        lines.append(f"| {b['id']} | {b['truth']} | {b['greedy']} | {a['greedy']} |")
    return "\n".join(lines)
