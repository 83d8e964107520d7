"""Driver side of training: build the TorchTrainer from the config and run it."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pyarrow
import pyarrow.fs
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cafe.config import ExperimentConfig
from pipelines.storage import Storage, StorageError, is_s3
from trainers.checkpoints import HF_EXPORT_DIR, STATE_FILE, RunFolder, publish_model
from trainers.driver_watch import driver_identity
from trainers.loop import train_loop_per_worker
from trainers.shards import DataOrder
from trainers.tracking import take_stop

FAIL_AT_STEP_ENV = "CAFE_FAIL_AT_STEP"


class InputError(ValueError):
    """A training input the user can fix (a path, a size): reported as one line, exit code 2."""


class TrainingStopped(RuntimeError):
    """Training stopped itself (a non-finite loss): one line for the user, exit code 1; its last
    finite checkpoint stays and nothing is exported."""


def planned_steps(order: DataOrder, cfg: ExperimentConfig) -> int:
    """Optimizer steps of the run: `train.max_steps`, or the epochs' (every rank takes the same
    number of full batches each epoch)."""
    if order.epoch_steps(0) == 0:
        rows = sum(p.rows for p in order.pieces)
        raise InputError(f"{rows} training rows cannot fill one batch of {cfg.train.batch_size} "
                         f"on each of {cfg.train.num_workers} workers")
    return cfg.train.max_steps or order.total_steps(cfg.train.epochs)


def data_order(cfg: ExperimentConfig) -> DataOrder:
    """The run's training order, from the footers of the Parquet under `data.train_dir` (a folder
    or URI); a missing or empty location is a user error naming what to run first."""
    hint = "convert input first: `cafe data --config ...` (the demo draws and converts the scenes itself)"
    try:
        order = DataOrder.for_training(cfg.data.train_dir, cfg.train.num_workers, cfg.train.batch_size,
                                       cfg.train.seed)
    except (FileNotFoundError, OSError, pyarrow.ArrowInvalid) as err:
        raise InputError(f"data.train_dir {cfg.data.train_dir} cannot be read as training Parquet ({err}); "
                         f"{hint}") from None
    if not order.pieces:
        raise InputError(f"data.train_dir {cfg.data.train_dir} holds no training rows; {hint}")
    return order


def check_storage(uri: str) -> None:
    """An s3:// storage path must name a bucket the AWS_* settings can reach (a local folder is
    made when needed); any other scheme is refused."""
    if not uri or "://" not in uri:
        return
    if not is_s3(uri):
        raise InputError(f"train.storage_path {uri}: use a local folder or an s3:// URI")
    try:
        filesystem, path = Storage.for_uris([uri]).resolve(uri)
        bucket = filesystem.get_file_info(path.split("/", 1)[0])  # a request that needs access
    except (StorageError, pyarrow.ArrowInvalid, OSError) as err:
        raise InputError(f"train.storage_path {uri} cannot be reached with the AWS_* settings: {err}") from None
    if bucket.type == pyarrow.fs.FileType.NotFound:
        raise InputError(f"train.storage_path {uri} cannot be reached: no bucket {bucket.path!r} with the AWS_* "
                         "settings (create it first)")


def ray_storage(cfg: ExperimentConfig, storage_path: str | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Where Ray Train keeps the run's checkpoints, and the filesystem for an s3:// location
    (configured from AWS_* settings, endpoint included, as the pipelines read S3)."""
    storage = storage_path or cfg.train.storage_path or str(Path(cfg.output_dir, "ray_results").resolve())
    if is_s3(storage):
        return tuple(reversed(Storage.for_uris([storage]).resolve(storage)))
    return storage, None


def run_folder(cfg: ExperimentConfig, storage_path: str | None = None) -> RunFolder:
    """Ray Train's folder of this run, on whichever filesystem holds it."""
    storage, filesystem = ray_storage(cfg, storage_path)
    return RunFolder(f"{storage.rstrip('/')}/{cfg.name}", filesystem or pyarrow.fs.LocalFileSystem())


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
    train = cfg.train
    if train.batch_size % train.grad_accum_steps:
        raise InputError(f"train.batch_size {train.batch_size} must split into train.grad_accum_steps "
                         f"{train.grad_accum_steps} equal micro-batches")
    if train.grad_accum_steps > 1 and train.gradcache_chunk:
        raise InputError("train.grad_accum_steps and train.gradcache_chunk both split the batch: GradCache already "
                         "gives the full batch's gradient in chunks, so set one of them")
    if train.offload_optimizer and train.zero_stage == 0:
        raise InputError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (DeepSpeed offloads ZeRO's state)")
    check_storage(train.storage_path)
    return planned_steps(data_order(cfg), cfg)


def build_trainer(cfg: ExperimentConfig, run_id: str, *, callbacks: list | None = None,
                  storage_path: str | None = None, total_steps: int | None = None) -> TorchTrainer:
    total_steps = total_steps or check_training_inputs(cfg)
    storage, filesystem = ray_storage(cfg, storage_path)
    loop_config = {
        "config": dataclasses.asdict(cfg),
        "total_steps": total_steps,
        "tracking_uri": cfg.tracking.tracking_uri,
        "run_id": run_id,
        "checkpoint_every": cfg.train.checkpoint_every,
        "driver": driver_identity(),
        **_failure_test_hook(cfg),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,  # stable: relaunching the same name resumes from its last checkpoint
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Train's own INFO lines (worker group started, each checkpoint reported) stay in its
            # log files; the console shows the loop's progress line
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _failure_test_hook(cfg: ExperimentConfig) -> dict:
    """CAFE_FAIL_AT_STEP=k (tests of fault tolerance): the last worker's process dies once, right
    after step k; the marker file beside the run's output says it has happened."""
    step = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
    if not step:
        return {}
    return {"fail_at_step": step, "fail_marker": str(Path(cfg.output_dir, f"failed_at_step_{step}").resolve())}


def fit_interruptibly(trainer: TorchTrainer):
    """`trainer.fit()` on a helper thread, so that Ctrl-C and SIGTERM reach the caller at once as
    KeyboardInterrupt (and its MLflow run can be marked KILLED). On the main thread Ray Train
    installs its own SIGINT handler, which waits for the workers to abort and then exits the
    process, leaving the run RUNNING. The checkpoints already reported stay for the resume."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="cafe-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a signal interrupts the wait, not the fit
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train(cfg: ExperimentConfig, run_id: str) -> tuple[Path, int]:
    """Run training; returns the trained model directory (HF format) under output_dir and the
    number of optimizer steps it took. A run whose last checkpoint is already taken is not
    launched again: its checkpoint is exported as it is."""
    total_steps = check_training_inputs(cfg)
    folder = run_folder(cfg)
    checkpoint = _finished_checkpoint(folder, cfg.name, total_steps)
    if checkpoint is None:
        folder.remove_orphans()
        trainer = build_trainer(cfg, run_id, total_steps=total_steps)
        checkpoint = _fit(trainer, cfg.tracking.tracking_uri, run_id).checkpoint
    out = Path(cfg.output_dir, "model")
    with checkpoint.as_directory() as ckpt:
        publish_model(Path(ckpt) / HF_EXPORT_DIR, out)
        steps = json.loads((Path(ckpt) / STATE_FILE).read_text())["step"]
    return out, steps


def _finished_checkpoint(folder: RunFolder, name: str, total_steps: int) -> Checkpoint | None:
    try:
        path = folder.finished_checkpoint(total_steps)
    except ValueError as err:  # CheckpointError: a run folder the user must repair or remove
        raise InputError(str(err)) from None
    if path is None:
        return None
    print(f"[cafe] {name}: finished already (checkpoint {path}); using it as it is", flush=True)
    return Checkpoint(path, filesystem=folder.filesystem)


def _fit(trainer: TorchTrainer, tracking_uri: str, run_id: str):
    """`fit`, with the loop's own stop (a non-finite loss) raised as TrainingStopped."""
    take_stop(tracking_uri, run_id)  # a stop recorded by an earlier launch is not this one's
    result = fit_interruptibly(trainer)
    stop = take_stop(tracking_uri, run_id)
    if stop is not None:
        raise TrainingStopped(stop)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    return result
