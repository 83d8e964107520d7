"""Driver side of training: build the TorchTrainer from the config and run it."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cafe.config import ExperimentConfig
from trainers.loop import HF_EXPORT_DIR, STATE_FILE, train_loop_per_worker


def planned_steps(num_rows: int, cfg: ExperimentConfig) -> int:
    """Steps every worker can take: shards are equal-sized and ragged batches are dropped."""
    per_worker = num_rows // cfg.train.num_workers
    per_epoch = per_worker // cfg.train.batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_rows} training rows cannot fill one batch of {cfg.train.batch_size} "
                         f"on each of {cfg.train.num_workers} workers")
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


def build_trainer(cfg: ExperimentConfig, run_id: str, *, callbacks: list | None = None,
                  storage_path: str | None = None) -> TorchTrainer:
    if cfg.model.compile_blocks and cfg.train.zero_stage == 3:
        raise ValueError("model.compile_blocks works with train.zero_stage 0-2: ZeRO-3 gathers each block's "
                         "weights in module hooks, which compiled blocks would trace")
    dataset = ray.data.read_parquet(cfg.data.train_dir)
    total_steps = planned_steps(dataset.count(), cfg)
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
            storage_path=storage_path or str(Path(cfg.output_dir, "ray_results").resolve()),
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
