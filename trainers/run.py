"""Driver side of training: build the TorchTrainer from the config and run it."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow
import pyarrow.dataset
import pyarrow.fs
import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cafe.config import ExperimentConfig
from trainers.loop import HF_EXPORT_DIR, STATE_FILE, train_loop_per_worker


class InputError(ValueError):
    """A training input the user can fix (a path, a size): reported as one line, exit code 2."""


def planned_steps(num_rows: int, cfg: ExperimentConfig) -> int:
    """Steps every worker can take: shards are equal-sized and ragged batches are dropped."""
    per_worker = num_rows // cfg.train.num_workers
    per_epoch = per_worker // cfg.train.batch_size
    if per_epoch == 0:
        raise InputError(f"{num_rows} training rows cannot fill one batch of {cfg.train.batch_size} "
                         f"on each of {cfg.train.num_workers} workers")
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


def training_rows(train_dir: str) -> int:
    """Rows of the training Parquet under `train_dir` (a folder or URI), from the files' footers;
    a missing or empty location is a user error naming what to run first."""
    hint = "convert input first: `cafe data --config ...` (the demo draws and converts the scenes itself)"
    try:
        # other files beside the shards (the pipeline's summary.json) are not training data
        rows = pyarrow.dataset.dataset(train_dir, format="parquet", exclude_invalid_files=True).count_rows()
    except (FileNotFoundError, OSError, pyarrow.ArrowInvalid) as err:
        raise InputError(f"data.train_dir {train_dir} cannot be read as training Parquet ({err}); {hint}") from None
    if rows == 0:
        raise InputError(f"data.train_dir {train_dir} holds no training rows; {hint}")
    return rows


def check_storage(uri: str) -> None:
    if "://" in uri:
        try:
            pyarrow.fs.FileSystem.from_uri(uri)
        except (pyarrow.ArrowInvalid, OSError, ValueError) as err:
            raise InputError(f"train.storage_path {uri} is not a storage location pyarrow can open: {err}") from None


def check_training_inputs(cfg: ExperimentConfig) -> int:
    """Everything about a training run's inputs that can be checked before Ray or MLflow start;
    returns the planned optimizer steps. Raises InputError with one line naming the problem."""
    if cfg.model.compile_blocks and cfg.train.zero_stage == 3:
        raise InputError("model.compile_blocks works with train.zero_stage 0-2: ZeRO-3 gathers each block's "
                         "weights in module hooks, which compiled blocks would trace")
    checkpoint = Path(cfg.model.checkpoint)
    if not (checkpoint / "config.json").is_file() and not cfg.model.pretrain_config \
            and not cfg.model.build_tiny_if_missing:
        raise InputError(f"model.checkpoint {checkpoint} is not a model directory (no config.json); point it at a "
                         "LLaVA-OneVision HF directory, or set model.pretrain_config / model.build_tiny_if_missing")
    check_storage(cfg.train.storage_path)
    return planned_steps(training_rows(cfg.data.train_dir), cfg)


def build_trainer(cfg: ExperimentConfig, run_id: str, *, callbacks: list | None = None,
                  storage_path: str | None = None) -> TorchTrainer:
    total_steps = check_training_inputs(cfg)
    dataset = ray.data.read_parquet(cfg.data.train_dir)
    dataset.context.enable_progress_bars = False  # the loop's own progress line says how training goes
    loop_config = {
        "config": dataclasses.asdict(cfg),
        "total_steps": total_steps,
        "tracking_uri": cfg.tracking.tracking_uri,
        "run_id": run_id,
        "checkpoint_every": cfg.train.checkpoint_every,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,  # stable: relaunching the same name resumes from its last checkpoint
            storage_path=storage_path or cfg.train.storage_path or str(Path(cfg.output_dir, "ray_results").resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
    )


def train(cfg: ExperimentConfig, run_id: str) -> tuple[Path, int]:
    """Run training; returns the trained model directory (HF format) under output_dir and the
    number of optimizer steps it took."""
    result = build_trainer(cfg, run_id).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    out = Path(cfg.output_dir, "model")
    with result.checkpoint.as_directory() as ckpt:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(ckpt) / HF_EXPORT_DIR, out)
        steps = json.loads((Path(ckpt) / STATE_FILE).read_text())["step"]
    return out, steps
