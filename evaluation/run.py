"""Image-text retrieval evaluation of one checkpoint.

    <eval_dir>/retrieval/<name>/test.parquet  (nlphuji flickr_1k layout: image, caption list, img_id)
      -> one row per image and per caption -> embeddings (Ray Data actor pool, or one process)
      -> recall@k both ways + modality gap -> `eval/retrieval/<name>/<metric>`
      -> report.json, and both onto an existing MLflow run when one is given.

Images that fail to decode are left out with their captions, counted in `failed_images` and
listed in the report, so a damaged file shows up in the numbers instead of stopping the run.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from cafe.config import EvalConfig
from cafe.embed import Embedder
from evaluation.embedding_pool import Embeddings, embed_in_process, embed_with_actor_pool
from evaluation.retrieval import modality_gap, recall_at_k


class RunRef(NamedTuple):
    """An MLflow run that already exists; evaluation logs into it and never creates one."""

    tracking_uri: str
    run_id: str


@dataclass(slots=True)
class RetrievalSet:
    img_ids: list[str]
    images: list[bytes | None]  # encoded
    captions: list[str]  # flattened over images
    text_to_image: torch.Tensor  # (captions,) int64 row of `images` each caption describes


def metric_prefix(name: str) -> str:
    return f"eval/retrieval/{name}/"


def retrieval_path(eval_dir: str | Path, name: str) -> Path:
    return Path(eval_dir) / "retrieval" / name / "test.parquet"


def load_retrieval_set(path: str | Path) -> RetrievalSet:
    table = pq.read_table(path, columns=["image", "caption", "img_id"])
    captions, owners = [], []
    for row, caps in enumerate(table["caption"].to_pylist()):
        if not caps:
            raise ValueError(f"{path}: image {table['img_id'][row]} has no captions")
        captions += caps
        owners += [row] * len(caps)
    return RetrievalSet(
        img_ids=[str(i) for i in table["img_id"].to_pylist()],
        images=[img and img["bytes"] for img in table["image"].to_pylist()],
        captions=captions,
        text_to_image=torch.tensor(owners, dtype=torch.long),
    )


def embedding_rows(data: RetrievalSet) -> pa.Table:
    """Keys 0..I-1 are the images, I..I+T-1 the captions."""
    num_images = len(data.images)
    return pa.table({
        "key": pa.array(range(num_images + len(data.captions)), pa.int64()),
        "image": pa.array(data.images + [None] * len(data.captions), pa.binary()),
        "text": pa.array([None] * num_images + data.captions, pa.string()),
    })


def score(data: RetrievalSet, emb: Embeddings, ks: list[int]) -> tuple[dict[str, float], list[dict]]:
    """Metrics over the images that embedded (and their captions), plus the failures."""
    num_images = len(data.images)
    vectors = torch.from_numpy(emb.vectors)
    image_ok = torch.tensor([not e for e in emb.errors[:num_images]])
    failures = [{"img_id": data.img_ids[i], "error": emb.errors[i]} for i in range(num_images) if not image_ok[i]]
    keep_text = image_ok[data.text_to_image]
    new_row = torch.cumsum(image_ok, 0) - 1  # image row after dropping the failed ones
    image_emb, text_emb = vectors[:num_images][image_ok], vectors[num_images:][keep_text]
    metrics = recall_at_k(image_emb, text_emb, new_row[data.text_to_image[keep_text]], ks)
    metrics["modality_gap"] = modality_gap(image_emb, text_emb)
    metrics["failed_images"] = float(len(failures))
    return metrics, failures


def log_to_run(run: RunRef, metrics: dict[str, float], *, step: int, report_path: Path, artifact_path: str) -> None:
    client = MlflowClient(run.tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    client.log_artifact(run.run_id, str(report_path), artifact_path=artifact_path)


def evaluate_retrieval(checkpoint: str | Path, eval_dir: str | Path, *, config: EvalConfig, name: str = "scenes",
                       tracking: RunRef | tuple[str, str] | None = None, report_path: str | Path | None = None,
                       use_ray: bool = True, use_gpu: bool = False, step: int = 0) -> dict[str, float]:
    """Recall@k (`config.recall_ks`) both ways, `mean_recall`, `modality_gap`, `failed_images`,
    keyed `eval/retrieval/<name>/...`. `use_ray=False` embeds in this process (the reference).

    Args:
        tracking: (tracking_uri, run_id) of an existing MLflow run to log metrics and the report to.
        report_path: where report.json goes; a temporary file when only `tracking` is given.
        step: the MLflow step (e.g. the training step of the checkpoint).
    """
    path = retrieval_path(eval_dir, name)
    data = load_retrieval_set(path)
    rows = embedding_rows(data)
    start = time.perf_counter()
    if use_ray:
        emb = embed_with_actor_pool(rows, str(checkpoint), num_actors=config.num_actors,
                                    cpus_per_actor=config.cpus_per_actor, batch_size=config.batch_size, use_gpu=use_gpu)
    else:
        embedder = Embedder(checkpoint, device="cuda" if use_gpu else "cpu", batch_size=config.batch_size)
        emb = embed_in_process(rows, embedder)
    embed_seconds = time.perf_counter() - start
    scores, failures = score(data, emb, config.recall_ks)
    metrics = {metric_prefix(name) + k: v for k, v in scores.items()}

    report = {
        "name": name,
        "checkpoint": str(checkpoint),
        "data": str(path),
        "metrics": metrics,
        "counts": {"images": len(data.images), "captions": len(data.captions), "failed_images": len(failures)},
        "failures": failures,
        "timing": {
            "backend": "ray_actor_pool" if use_ray else "in_process",
            "num_actors": config.num_actors if use_ray else 1,
            "batch_size": config.batch_size,
            "embed_seconds": embed_seconds,  # includes actor start-up and model loading
            "embeddings_per_s": rows.num_rows / embed_seconds,
        },
    }
    if tracking is None and report_path is None:
        return metrics
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(report_path) if report_path is not None else Path(tmp) / "report.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        if tracking is not None:
            log_to_run(RunRef(*tracking), metrics, step=step, report_path=out, artifact_path=metric_prefix(name).rstrip("/"))
    return metrics
