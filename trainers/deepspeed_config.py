"""DeepSpeed config for a run, derived from the typed TrainConfig (one source of truth)."""
from __future__ import annotations

from cafe.config import TrainConfig


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """Batching is done by the collator (packed rows), and micro-batches and GradCache chunks
    mark DeepSpeed's accumulation boundary themselves (trainers.loop), so DeepSpeed sees one
    batch of `batch_size` rows per rank and step; its batch fields must still agree with the
    world size or it refuses to start."""
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.batch_size * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.use_gpu},
        "steps_per_print": 10**9,  # progress goes to MLflow, not stdout
        "wall_clock_breakdown": False,
    }
    if train.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        config["zero_force_ds_cpu_optimizer"] = False  # the loop's torch AdamW steps the offloaded state
    if train.zero_stage == 3:
        # small tensors (norms, the temperature) stay whole on every rank (DeepSpeed's default
        # persistence threshold), so logging the temperature needs no gather
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config
