"""The per-worker training loop: read this rank's batches (trainers.shards), run the CAFe step under DeepSpeed,
log from rank 0, report checkpoints to Ray Train (HF export + DeepSpeed state for resume)."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from cafe.accumulation import accumulated_step
from cafe.batch import Collator, PackedBatch
from cafe.compile import compile_blocks
from cafe.config import ExperimentConfig, config_from_dict
from cafe.gradcache import chunked, gradcache_step
from cafe.inference import InferenceModel
from cafe.logs import quiet_deepspeed, quiet_libraries, quiet_ray_train_reports
from cafe.losses import CafeLoss, ContrastiveLoss
from cafe.model import CafeModel, claim_cpus, load_vlm, set_tunable_parts
from cafe.records import example_from_row
from evaluation.backends import training_workers
from evaluation.run import RunRef, log_scorecard
from evaluation.scorecard import score_tasks, write_report
from evaluation.suites import prepare_tasks
from trainers.checkpoints import HF_EXPORT_DIR, STATE_FILE, verify_manifests, write_manifest
from trainers.deepspeed_config import deepspeed_config
from trainers.driver_watch import stop_with_driver
from trainers.prefetch import prefetched
from trainers.progress import Progress
from trainers.shards import DataOrder
from trainers.tracking import MetricLog, record_stop

PROGRESS_LOG = logging.getLogger("cafe.train")
DEEPSPEED_DIR = "deepspeed"  # engine + optimizer state, for resuming
RNG_FILE = "rng_rank{rank}.pt"  # each rank's random state (dropout), so a resumed step draws what it would have


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_model(cfg: ExperimentConfig, dtype: torch.dtype) -> tuple[CafeModel, object]:
    vlm, processor = load_vlm(cfg.model.checkpoint, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    if cfg.model.gradient_checkpointing:
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    set_tunable_parts(vlm, cfg.model.mm_tunable_parts)
    if cfg.model.compile_blocks:
        compile_blocks(vlm)
    loss = cfg.loss
    contrastive = ContrastiveLoss(kind=loss.contrastive, temperature=loss.temperature,
                                  learnable=loss.learnable_temperature)
    cafe_loss = CafeLoss(compute_language_loss=loss.compute_language_loss,
                         compute_contrastive_loss=loss.compute_contrastive_loss,
                         alpha_lm=loss.alpha_lm, con_weight=loss.con_weight, contrastive=contrastive)
    return CafeModel(vlm, cafe_loss, emb_type=loss.emb_type, lockstep_vision=cfg.train.zero_stage == 3), processor


def param_groups(model: CafeModel, cfg: ExperimentConfig) -> list[dict]:
    """Trainable parameters only: the temperature at its own rate, the vision tower at
    `train.vision_lr` when set, the rest at `train.lr`."""
    temperature = {id(p) for p in model.loss.parameters()}
    vision = {id(p) for p in model.vlm.model.vision_tower.parameters()} if cfg.train.vision_lr else set()
    groups = {"temperature": [], "vision": [], "rest": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["temperature" if id(p) in temperature else "vision" if id(p) in vision else "rest"].append(p)
    rates = {"temperature": (cfg.train.temperature_lr, 0.0), "vision": (cfg.train.vision_lr, cfg.train.weight_decay),
             "rest": (cfg.train.lr, cfg.train.weight_decay)}
    return [{"params": params, "lr": rates[name][0], "weight_decay": rates[name][1]}
            for name, params in groups.items() if params]


def warmup_steps(cfg: ExperimentConfig, total_steps: int) -> int:
    return math.ceil(cfg.train.warmup_ratio * total_steps) if cfg.train.warmup_ratio > 0 else cfg.train.warmup_steps


def export_hf(engine, model: CafeModel, processor, out_dir: Path, zero_stage: int, rank: int) -> None:
    """Write a from_pretrained-ready copy. Under ZeRO-3 every rank must join the gather."""
    import deepspeed

    params = list(model.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with context:
        if rank == 0:
            model.vlm.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
            (out_dir / STATE_FILE).write_text(json.dumps({"temperature": model.loss.contrastive.temperature}))


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.use_gpu else "cpu")
    quiet_libraries()
    quiet_ray_train_reports()
    import deepspeed  # on workers only, after DS_ACCELERATOR is set: it picks its accelerator at import

    quiet_deepspeed()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not cfg.train.use_gpu:
        claim_cpus(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed + rank)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.train.use_gpu else torch.float32
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")  # joins Ray's process group
    ds_config = deepspeed_config(cfg.train, world)
    if cfg.train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - partitions weights during from_pretrained
    model, processor = build_model(cfg, dtype)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr)
    total_steps = loop_config["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps(cfg, total_steps), total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    step = 0
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as ckpt:
            verify_manifests(Path(ckpt))
            engine.load_checkpoint(str(Path(ckpt) / DEEPSPEED_DIR))
            step = json.loads((Path(ckpt) / STATE_FILE).read_text())["step"]
            _restore_rng(Path(ckpt) / RNG_FILE.format(rank=rank), device)
        if rank == 0:
            PROGRESS_LOG.info(f"[train] resumed from the checkpoint of step {step}/{total_steps}")

    collator = Collator(processor, compute_language_loss=cfg.loss.compute_language_loss,
                        compute_contrastive_loss=cfg.loss.compute_contrastive_loss,
                        max_text_tokens=cfg.data.max_text_tokens, max_turns=cfg.data.max_turns)
    order = DataOrder.for_training(cfg.data.train_dir, world, cfg.train.batch_size, cfg.train.seed)
    tracking_uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    metric_log = MetricLog(tracking_uri, run_id) if rank == 0 else None
    stop_with_driver(loop_config["driver"])
    last_metrics: dict[str, float] = {}
    checkpoint_every = loop_config["checkpoint_every"]
    evaluate = _in_training_evaluation(cfg, engine.module, processor, rank, world, RunRef(tracking_uri, run_id))
    progress = Progress(total_steps, samples_per_step=cfg.train.batch_size * world)
    split = cfg.train.gradcache_chunk or (cfg.train.batch_size // cfg.train.grad_accum_steps)
    step_fn = partial(accumulated_step if cfg.train.grad_accum_steps > 1 else gradcache_step, engine, rank=rank,
                      world_size=world, backward=partial(_backward_part, engine))

    def prepare(rows) -> tuple[list[PackedBatch], int, int]:  # on the prefetch thread: decoding, templating, packing
        examples = [example_from_row(r, multimodal_input=cfg.loss.multimodal_input) for r in rows.to_pylist()]
        before = collator.truncated
        parts = [collator(part) for part in chunked(examples, split)]
        tokens = sum(int((part.unit >= 0).sum()) for part in parts)  # counted here: no device sync
        return parts, tokens, collator.truncated - before

    failure_hook = _failure_hook(loop_config, rank)
    batches = order.batches(rank, start_step=step) if step < total_steps else iter(())  # resumed at the end
    for (packed, tokens, truncated), waited in prefetched(batches, prepare):
        started = time.perf_counter()
        parts = [part.to(device, dtype) for part in packed]
        if len(parts) > 1:  # micro-batches, or GradCache chunks of a contrastive batch beyond memory
            terms = step_fn(parts)
        else:
            terms = engine(parts[0], rank=rank, world_size=world)
            engine.backward(terms.objective)
        stop = _non_finite(terms, step + 1, world)  # before the optimizer step: the weights stay finite
        if stop:  # every rank returns, without a final checkpoint; the driver reads why (Ray retries errors)
            if rank == 0:
                record_stop(tracking_uri, run_id, stop)
            return
        logging_step = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps
        norm = _unclipped_grad_norm(engine) if logging_step else None
        engine.step()
        step += 1
        progress.add(waited=waited, busy=time.perf_counter() - started, tokens=tokens, truncated=truncated)
        if logging_step:
            last_metrics = {**_loss_metrics(terms, engine, model, world, norm), **progress.interval_metrics(world)}
            if rank == 0:
                metric_log.log(last_metrics, step=step)
                # a log record, not print: Ray Train turns a worker's print into a record too,
                # and the console shows a print twice (stdout and the record)
                level = logging.WARNING if last_metrics.get("train/truncated_in_interval") else logging.INFO
                PROGRESS_LOG.log(level, progress.line(step, last_metrics))
        if evaluate and (step % cfg.eval.every_steps == 0 or step == total_steps):
            last_metrics = {**last_metrics, **evaluate(step)}
            progress.skip_interval()  # scoring time is not training throughput
            if step < total_steps:  # the final scores travel with the final checkpoint's report
                ray.train.report({**last_metrics, "step": step})
        if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            _report_checkpoint(engine, model, processor, cfg, rank, step, last_metrics, export=False)
            progress.skip_interval()
        failure_hook(step)
        if step >= total_steps:
            break
    _report_checkpoint(engine, model, processor, cfg, rank, step, last_metrics, export=True)


def _non_finite(terms, step: int, world: int) -> str | None:
    """Why training must stop here when any rank's loss is NaN or infinite, else None. Every rank
    gets the same answer (one tiny all-reduce), so all stop at the same step."""
    named = {name: value.detach().float() for name, value in
             (("loss", terms.loss), ("lm_loss", terms.lm_loss), ("con_loss", terms.con_loss)) if value is not None}
    bad = (~torch.isfinite(torch.stack(list(named.values())))).float().max().reshape(1)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return None
    shown = ", ".join(f"{name} {value.item():.4g}" for name, value in named.items())
    rank = dist.get_rank() if world > 1 else 0
    return (f"the loss is not finite at step {step} ({shown} on rank {rank}); training stopped before that step "
            "changed the weights")


def _backward_part(engine, objective: torch.Tensor, last: bool) -> None:
    """One micro-batch's or GradCache chunk's backward: the engine reduces and steps only after the last."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(objective)


def _unclipped_grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm before clipping, where DeepSpeed does not keep it (ZeRO-0 in
    float32: the gradients are already averaged across ranks here, so the local norm is global)."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
        return None  # DeepSpeed's optimizer records it during engine.step()
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None


def _failure_hook(loop_config: dict, rank: int):
    """For fault-tolerance tests: `fail_at_step` ends this worker's process abruptly once, on
    the last rank, right after that step (a marker file keeps the restarted attempt alive)."""
    fail_at, marker = loop_config.get("fail_at_step"), loop_config.get("fail_marker")

    def check(step: int) -> None:
        if fail_at and step == fail_at and rank == ray.train.get_context().get_world_size() - 1 \
                and not Path(marker).exists():
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(f"worker {rank} ended at step {step}\n")
            os._exit(1)

    return check


def _in_training_evaluation(cfg: ExperimentConfig, model: CafeModel, processor, rank: int, world: int, run: RunRef):
    """With `eval.every_steps`, a function that scores the configured suites on the live
    weights, every rank answering a share, and logs them from rank 0 at that step."""
    if not cfg.eval.every_steps:
        return None
    tasks = prepare_tasks(cfg.eval, cfg.data.eval_dir)  # loaded once; the same requests on every rank
    gather = None
    if cfg.train.zero_stage == 3:
        import deepspeed

        gather = partial(deepspeed.zero.GatheredParameters, modifier_rank=None)
    inference = InferenceModel(model, processor, batch_size=cfg.eval.batch_size, gather_sharded=gather)
    backend = training_workers(inference, rank, world)

    def evaluate(step: int) -> dict[str, float]:
        card = score_tasks(tasks, backend)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                files = write_report(card, Path(tmp), title=f"{cfg.name}: step {step}", checkpoint="(live weights)",
                                     step=step)
                log_scorecard(run, card.metrics, step=step, files=files, artifact_path=f"scorecards/step_{step:07d}")
        return card.metrics

    return evaluate


def _loss_metrics(terms, engine, model: CafeModel, world: int, grad_norm: torch.Tensor | None) -> dict[str, float]:
    share = terms.pair_share if terms.pair_share is not None else float("nan")
    values = torch.stack([t.detach().float().cpu() if t is not None else torch.tensor(float("nan"))
                          for t in (terms.loss, terms.lm_loss, terms.con_loss)] + [torch.tensor(share)])
    if world > 1:  # the LM loss and the pair share are per-rank means of equal batches: average them
        dist.all_reduce(values)
        values /= world
    metrics = {"train/loss": values[0].item(), "train/lr": engine.get_lr()[0],
               "train/temperature": model.loss.contrastive.temperature}
    norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
    if terms.lm_loss is not None:
        metrics["train/lm_loss"] = values[1].item()
    if terms.con_loss is not None:
        metrics["train/con_loss"] = values[2].item()
        metrics["train/pair_share"] = values[3].item()  # the rows whose pair text entered the contrastive term
    return metrics


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(path: Path, device: torch.device) -> None:
    if not path.exists():  # a checkpoint from another world size: this rank's stream starts afresh
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _report_checkpoint(engine, model, processor, cfg: ExperimentConfig, rank: int, step: int, metrics: dict,
                       *, export: bool) -> None:
    """Every rank saves its DeepSpeed shard into its own folder and reports it; Ray Train merges
    them into one checkpoint. The final one also carries the HF export (rank 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state")
        torch.save(_rng_state(engine.device), tmp / RNG_FILE.format(rank=rank))
        if export:
            export_hf(engine, model, processor, tmp / HF_EXPORT_DIR, cfg.train.zero_stage, rank)
        if rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "temperature": model.loss.contrastive.temperature}))
        write_manifest(tmp, rank)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")
