"""Embedding many inputs with a pool of warm Ray Data actors, plus the one-process reference.

Input rows (an Arrow table, `ROW_SCHEMA`): `key` (int64, unique), `image` (encoded bytes or
null), `text` (string or null); a row with both is a multimodal query. Output, in key order:
an `Embeddings` with float32 (N, D) L2-normalised rows and an error per row. A row whose image
cannot be decoded gets a zero embedding and its error message; it never fails the job.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from PIL import Image, UnidentifiedImageError

from cafe.embed import EmbedInput, Embedder

ROW_SCHEMA = pa.schema([pa.field("key", pa.int64()), pa.field("image", pa.binary()), pa.field("text", pa.string())])


@dataclass(slots=True)
class Embeddings:
    keys: np.ndarray  # (N,) int64, ascending
    vectors: np.ndarray  # (N, D) float32; zeros where `errors` is set
    errors: list[str]  # "" for rows that embedded


def _decode(data: bytes | None) -> Image.Image:
    if data is None:
        raise ValueError("image bytes are null")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:  # its own message names a BytesIO address: not reproducible
        raise ValueError(f"not an image format PIL can read ({len(data)} bytes)") from None


def embed_batch(embedder: Embedder, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode and embed one batch of rows (numpy batch format); the per-actor work."""
    inputs: list[EmbedInput] = []
    ok, errors = [], []
    for data, text in zip(batch["image"], batch["text"]):
        try:
            images = [] if data is None and text is not None else [_decode(data)]  # text-only rows: no image
        except Exception as err:  # any undecodable image becomes a row error, whatever the cause
            errors.append(f"{type(err).__name__}: {err}")
            continue
        errors.append("")
        ok.append(len(errors) - 1)
        inputs.append((text, images))
    vectors = np.zeros((len(errors), embedder.model.vlm.config.text_config.hidden_size), dtype=np.float32)
    if inputs:
        vectors[ok] = embedder.embed(inputs).numpy()
    return {"key": batch["key"], "embedding": vectors, "error": np.array(errors, dtype=object)}


class EmbedActor:
    """Ray Data callable class: loads the model once per actor, then embeds batch after batch."""

    def __init__(self, checkpoint: str, *, device: str = "cpu", emb_type: str = "last", batch_size: int = 32) -> None:
        self.embedder = Embedder(checkpoint, device=device, emb_type=emb_type, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return embed_batch(self.embedder, batch)


def _sorted_by_cost(rows: pa.Table) -> pa.Table:
    """Texts by length, then images: each Ray batch then holds prompts of similar length
    (the `Embedder` sorts within a batch the same way)."""
    cost = [len(t or "") + (1000 if b else 0) for t, b in zip(rows["text"].to_pylist(), rows["image"].is_valid().to_pylist())]
    return rows.take(np.argsort(cost, kind="stable"))


def _collect(batches: list[dict[str, np.ndarray]]) -> Embeddings:
    keys = np.concatenate([b["key"] for b in batches])
    vectors = np.concatenate([b["embedding"] for b in batches])
    errors = [e for b in batches for e in b["error"]]
    order = np.argsort(keys, kind="stable")
    return Embeddings(keys=keys[order], vectors=vectors[order], errors=[errors[i] for i in order])


def _check(rows: pa.Table) -> pa.Table:
    rows = rows.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    if rows.num_rows == 0:
        raise ValueError("nothing to embed")
    if len(set(rows["key"].to_pylist())) != rows.num_rows:
        raise ValueError("row keys must be unique")
    return rows


def embed_with_actor_pool(rows: pa.Table, checkpoint: str, *, num_actors: int = 1, cpus_per_actor: float = 1.0,
                          batch_size: int = 32, use_gpu: bool = False, emb_type: str = "last") -> Embeddings:
    """Embed `rows` with `num_actors` warm actors (one GPU each when `use_gpu`)."""
    rows = _sorted_by_cost(_check(rows))
    # one block per batch, so every actor gets work (a single block would go to one actor)
    blocks = [rows.slice(start, batch_size) for start in range(0, rows.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        EmbedActor,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": "cuda" if use_gpu else "cpu",
                               "emb_type": emb_type, "batch_size": batch_size},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        udf_modifying_row_count=False,
    )
    return _collect(list(ds.iter_batches(batch_format="numpy", batch_size=None)))


def embed_in_process(rows: pa.Table, embedder: Embedder) -> Embeddings:
    """The same rows through one `Embedder` in this process: the reference for the pool."""
    rows = _check(rows)
    out = embed_batch(embedder, {name: rows[name].to_numpy(zero_copy_only=False) for name in ROW_SCHEMA.names})
    return _collect([out])
