"""Image-text retrieval metrics (CLIP protocol) on precomputed, L2-normalised embeddings.

Similarity is the dot product (= cosine). Image->text: an image is a hit at k when its best
caption ranks within the top k texts. Text->image: a caption is a hit at k when its image ranks
within the top k images. Ties are counted against the query: a positive's rank is the number
of *negatives* scoring at least as high, so equal scores never help and results do not depend
on the order of the gallery. Pure torch; memory is bounded by scoring in chunks of queries.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

CHUNK = 1024  # queries scored at once: a (CHUNK, gallery) similarity block


@dataclass(slots=True)
class RetrievalSet:
    """A test set in the flickr_1k / coco_5k layout: one row per image with its caption list."""

    img_ids: list[str]
    images: list[bytes | None]  # encoded
    captions: list[str]  # flattened over images
    text_to_image: torch.Tensor  # (captions,) int64 row of `images` each caption describes


def load_retrieval_set(path: str | Path) -> RetrievalSet:
    table = pq.read_table(path, columns=["image", "caption", "img_id"])
    captions, owners = [], []
    for row, caps in enumerate(table["caption"].to_pylist()):
        if not caps:
            raise ValueError(f"{path}: image {table['img_id'][row]} (row {row}) has no captions")
        captions += caps
        owners += [row] * len(caps)
    return RetrievalSet(
        img_ids=[str(i) for i in table["img_id"].to_pylist()],
        images=[img and img["bytes"] for img in table["image"].to_pylist()],
        captions=captions,
        text_to_image=torch.tensor(owners, dtype=torch.long),
    )


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor,
                    text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the best positive: (i2t ranks (I,), t2i ranks (T,)).

    `text_to_image[t]` is the row of `image_emb` that caption t describes."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    num_images = image_emb.shape[0]
    if num_images == 0:
        raise ValueError("no images to score")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({text_emb.shape[0]},)")
    if text_to_image.numel() and not 0 <= int(text_to_image.min()) <= int(text_to_image.max()) < num_images:
        raise ValueError(f"text_to_image points outside the {num_images} images")
    captions = torch.bincount(text_to_image, minlength=num_images)
    if (captions == 0).any():
        # an image without captions can never be a hit; its recall would mean nothing
        missing = torch.nonzero(captions == 0).flatten()[:5].tolist()
        raise ValueError(f"images without captions, e.g. rows {missing}")

    i2t = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, CHUNK):
        sim = image_emb[start : start + CHUNK] @ text_emb.T  # (c, T)
        rows = torch.arange(start, start + sim.shape[0])
        positive = text_to_image[None, :] == rows[:, None]
        best = sim.masked_fill(~positive, float("-inf")).amax(dim=1)
        i2t[start : start + sim.shape[0]] = ((sim >= best[:, None]) & ~positive).sum(dim=1)

    t2i = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, text_emb.shape[0], CHUNK):
        sim = text_emb[start : start + CHUNK] @ image_emb.T  # (c, I)
        target = text_to_image[start : start + sim.shape[0]]
        score = sim.gather(1, target[:, None])
        t2i[start : start + sim.shape[0]] = (sim >= score).sum(dim=1) - 1  # minus the positive itself
    return i2t, t2i


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in [0, 1] both ways (`i2t_r1`, ..., `t2i_r10`) and `mean_recall`, their mean
    (the literature's RSUM / 600 for ks = 1, 5, 10)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"recall ks must be >= 1, got {list(ks)}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image)
    metrics = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{direction}_r{k}"] = (ranks < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """L2 distance between the image centroid and the text centroid (Liang et al., 2022):
    a cheap diagnostic of how far apart the two modalities sit on the sphere."""
    return torch.linalg.vector_norm(image_emb.float().mean(0) - text_emb.float().mean(0)).item()
