"""MMEB-eval (VLM2Vec layout): load the subsets into distinct items to embed, then score.

    <root>/<Subset>/test-*.parquet   qry_text, qry_img_path, tgt_text[], tgt_img_path[]
                                     (+ qry_inst, tgt_inst in the newer layout)

Each row ranks its own candidates against its query; the first candidate is the positive.
Queries and candidates are pooled into distinct (text, image) items, so whatever repeats
across rows or subsets is embedded once (as VLM2Vec does). A row that cannot be scored is
skipped with a reason and counted, never dropped silently: among them, rows with an image that
may not be read (`cafe.files`: outside the image root, not a regular file, over the byte cap).
A missing image file is a broken data set and fails the load. Pure numpy + pyarrow: the
embeddings come from elsewhere.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cafe.files import RefusedFile, check_image_file
from cafe.prompts import IMAGE_TOKEN

MMEB_META_TASKS: dict[str, str] = {
    **dict.fromkeys(
        ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A", "ImageNet-R",
         "ObjectNet", "Country211"),
        "classification",
    ),
    **dict.fromkeys(
        ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
         "TextVQA"),
        "vqa",
    ),
    **dict.fromkeys(
        ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
         "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
        "retrieval",
    ),
    **dict.fromkeys(("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"), "grounding"),
}
PLACEHOLDER = re.compile(r"<\|image_\d+\|>")  # the older layout's image slot (Phi-3-V style)
REQUIRED_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
SCORE_BUDGET = 1 << 24  # float64 elements gathered at once while scoring (128 MiB)


@dataclass(frozen=True, slots=True)
class EmbedItem:
    """One thing to embed: text (with IMAGE_TOKEN where the image goes) and/or an absolute image path."""

    text: str | None
    image_path: str | None


@dataclass(slots=True)
class MmebRow:
    subset: str
    file: str
    row: int  # index within `file`
    query: int  # index into MmebSet.items
    candidates: list[int]  # indices into MmebSet.items, positive first


@dataclass(slots=True)
class MmebSet:
    items: list[EmbedItem]
    rows: list[MmebRow]
    skipped: list[dict] = field(default_factory=list)  # {"subset", "row", "file", "reason"}


def meta_task_of(subset: str, extra: dict[str, str] | None = None) -> str | None:
    """The public meta task of a subset, else the caller's mapping (for subsets of its own)."""
    return MMEB_META_TASKS.get(subset) or (extra or {}).get(subset)


def _subset_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("test-*.parquet"))


def list_subsets(root: str | Path) -> list[str]:
    """The folders under `root` that hold test-*.parquet, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"MMEB root {root} is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _subset_files(p))


def _embed_text(inst: str | None, text: str | None) -> str | None:
    """Instruction first, as the newer loaders read it; placeholders become our image token."""
    joined = f"{inst} {text or ''}".strip() if inst is not None else (text or "")
    joined = PLACEHOLDER.sub(IMAGE_TOKEN, joined)
    return joined or None


def _targets_inst(tgt_inst: list[str] | str | None, count: int) -> list[str | None] | None:
    """Per-candidate instructions, or None when a list of the wrong length makes the row unusable."""
    if tgt_inst is None or isinstance(tgt_inst, str):
        return [tgt_inst] * count
    return list(tgt_inst) if len(tgt_inst) == count else None


class _Builder:
    """Pools items across rows and subsets; checks each distinct image path once."""

    def __init__(self, image_root: Path) -> None:
        self.image_root = image_root
        self.index: dict[EmbedItem, int] = {}
        self.checked: dict[str, str | RefusedFile] = {}

    def image(self, path: str | None, where: str) -> str | RefusedFile | None:
        """The checked path of an image (None for no image), or why it may not be read."""
        if not path:
            return None
        if path not in self.checked:
            self.checked[path] = self._check(path, where)
        return self.checked[path]

    def _check(self, path: str, where: str) -> str | RefusedFile:
        try:
            return check_image_file(path, str(self.image_root))
        except RefusedFile as refused:
            return refused
        except FileNotFoundError:
            raise ValueError(f"image file {os.path.abspath(self.image_root / path)} not found ({where})") from None

    def item(self, inst: str | None, text: str | None, image: str | None) -> int:
        key = EmbedItem(_embed_text(inst, text), image)
        return self.index.setdefault(key, len(self.index))


def _read_rows(path: Path) -> list[dict]:
    names = pq.read_schema(path).names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: missing MMEB columns {missing}")
    columns = [*REQUIRED_COLUMNS, *(c for c in ("qry_inst", "tgt_inst") if c in names)]
    return pq.read_table(path, columns=columns).to_pylist()


def _shape_problem(texts: list, images: list, tgt_inst: list[str] | str | None, inst: list | None) -> str | None:
    if not texts:
        return "no candidates"
    if len(images) != len(texts) or inst is None:
        lengths = f"tgt_text {len(texts)}, tgt_img_path {len(images)}"
        lengths += f", tgt_inst {len(tgt_inst)}" if isinstance(tgt_inst, list) else ""
        return f"candidate lists differ in length ({lengths})"
    return None


def _add_row(builder: _Builder, data: MmebSet, subset: str, path: Path, i: int, row: dict) -> None:
    where = f"subset {subset}, row {i} of {path}"
    texts, images, tgt_inst = row["tgt_text"] or [], row["tgt_img_path"] or [], row.get("tgt_inst")
    inst = _targets_inst(tgt_inst, len(texts))
    reason = _shape_problem(texts, images, tgt_inst, inst)
    checked = [] if reason else [builder.image(p, where) for p in (row["qry_img_path"], *images)]
    reason = reason or next((str(c) for c in checked if isinstance(c, RefusedFile)), None)
    if reason is not None:
        data.skipped.append({"subset": subset, "row": i, "file": str(path), "reason": reason})
        return
    query = builder.item(row.get("qry_inst"), row["qry_text"], checked[0])
    candidates = [builder.item(n, t, image) for n, t, image in zip(inst, texts, checked[1:])]
    data.rows.append(MmebRow(subset, str(path), i, query, candidates))


def load_mmeb(root: str | Path, image_root: str | Path, *, subsets: list[str] | None = None) -> MmebSet:
    """Rows of the chosen subsets (all by default); image paths resolved under `image_root`."""
    available = list_subsets(root)
    if not available:
        raise ValueError(f"no <Subset>/test-*.parquet under {root}")
    unknown = [s for s in subsets or [] if s not in available]
    if unknown:
        raise ValueError(f"unknown MMEB subsets {unknown}; available: {available}")
    builder = _Builder(Path(image_root))
    data = MmebSet(items=[], rows=[])
    for subset in subsets if subsets is not None else available:
        for path in _subset_files(Path(root) / subset):
            for i, row in enumerate(_read_rows(path)):
                _add_row(builder, data, subset, path, i, row)
    data.items = list(builder.index)
    return data


def _hits(rows: list[MmebRow], vectors: np.ndarray) -> np.ndarray:
    """1.0 where the positive scores strictly above every other candidate; ties count as misses."""
    by_count: dict[int, list[int]] = defaultdict(list)
    for r, row in enumerate(rows):
        by_count[len(row.candidates)].append(r)
    hits = np.zeros(len(rows))
    dim = vectors.shape[1]
    for count, members in by_count.items():
        step = max(1, SCORE_BUDGET // (count * max(dim, 1)))  # bounds the (rows, count, dim) gather
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            queries = vectors[[rows[r].query for r in chunk]].astype(np.float64)
            candidates = vectors[np.array([rows[r].candidates for r in chunk])].astype(np.float64)
            scores = np.einsum("nd,nkd->nk", queries, candidates)
            hits[chunk] = np.all(scores[:, :1] > scores[:, 1:], axis=1)
    return hits


def _usable(data: MmebSet, failed: np.ndarray) -> tuple[dict[str, list[MmebRow]], list[dict]]:
    """Rows grouped by subset, minus those that use an item that could not be embedded."""
    by_subset: dict[str, list[MmebRow]] = defaultdict(list)
    skipped: list[dict] = []
    for row in data.rows:
        bad = [i for i in (row.query, *row.candidates) if failed[i]]
        if bad:
            reason = f"{len(bad)} item(s) could not be embedded, e.g. {data.items[bad[0]]}"
            skipped.append({"subset": row.subset, "row": row.row, "file": row.file, "reason": reason})
        else:
            by_subset[row.subset].append(row)
    return by_subset, skipped


def score_mmeb(
    data: MmebSet, vectors: np.ndarray, failed: np.ndarray | list[bool], *, extra_meta: dict[str, str] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Precision@1 per subset, per meta task (mean of its subsets) and overall (mean of subsets).

    `vectors[i]` is the L2-normalised embedding of `data.items[i]`; `failed[i]` marks items that
    could not be embedded. Returns the metrics and the rows skipped here for a failed item;
    `skipped_rows` counts those and the load's `data.skipped` together. A subset left with no
    scored row gets no score.
    """
    vectors, failed = np.asarray(vectors), np.asarray(failed, dtype=bool)
    if vectors.ndim != 2 or vectors.shape[0] != len(data.items) or failed.shape != (len(data.items),):
        raise ValueError(f"expected {len(data.items)} vectors and flags, got {vectors.shape} and {failed.shape}")
    by_subset, skipped = _usable(data, failed)
    scores = {subset: float(_hits(rows, vectors).mean()) for subset, rows in sorted(by_subset.items())}
    metrics = {f"subset/{subset}": score for subset, score in scores.items()}
    tasks: dict[str, list[float]] = defaultdict(list)
    for subset, score in scores.items():
        if (task := meta_task_of(subset, extra_meta)) is not None:
            tasks[task].append(score)
    metrics |= {f"meta/{task}": float(np.mean(values)) for task, values in sorted(tasks.items())}
    if scores:
        metrics["overall"] = float(np.mean(list(scores.values())))
    metrics["skipped_rows"] = float(len(data.skipped) + len(skipped))
    return metrics, skipped
