"""Library chatter off the console, in every process that loads a model: what a healthy run
prints is its own progress. (Ray keeps each worker's full output in its session log files.)"""
from __future__ import annotations

import logging
import os
import warnings


def clock(seconds: float) -> str:
    """A duration as the console shows it: m:ss, or h:mm:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    # accelerate imports DeepSpeed when the driver saves a model; left to detect its device, DeepSpeed warns
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    # the CPU build of DeepSpeed's ops says, each time, that it found no CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    # DeepSpeed's ZeRO calls torch's old name for the same all-gather
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)


def quiet_deepspeed() -> None:
    """DeepSpeed prints (not logs) a line each time it loads its CPU shared-memory op: send it to
    DeepSpeed's logger, at debug level. Call after `import deepspeed`."""
    import importlib

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its per-engine INFO lines would bury the progress line
    # by module path: the package attribute `deepspeed.comm.torch` is PyTorch itself
    comm_module = importlib.import_module("deepspeed.comm.torch")
    comm_module.print = lambda *parts, **_: logger.debug(" ".join(map(str, parts)))


def quiet_ray_train_reports() -> None:
    """Ray Train logs each report (every metric, every rank) at INFO under a logger named by its
    file path, which its LoggingConfig does not reach. Call in a Train worker."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
