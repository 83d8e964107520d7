"""The four suites as (requests, scoring) pairs over one data set each.

`prepare_suite` loads a data set and returns a `SuiteTask`: the model requests it needs and a
function that turns their answers into metrics. Metric names are `eval/<suite>/<dataset>/<metric>`.
Rows that cannot be scored are returned as counted skips with reasons, never dropped silently.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cafe.config import EvalConfig
from evaluation import generation, mmeb, pope
from evaluation.requests import Answers, Request
from evaluation.retrieval import load_retrieval_set, modality_gap, recall_at_k
from pipelines.scenes import describes_scene

CAPTION_MAX_NEW_TOKENS = 64


@dataclass(slots=True)
class SuiteResult:
    metrics: dict[str, float]  # without the eval/<suite>/<dataset>/ prefix
    skipped: list[dict] = field(default_factory=list)  # rows left out, each with a reason
    samples: list[dict] = field(default_factory=list)  # a few model outputs for the report
    clouds: tuple[np.ndarray, np.ndarray] | None = None  # image and text embeddings (modality-gap plot)


@dataclass(slots=True)
class SuiteTask:
    suite: str
    dataset: str
    source: str
    requests: list[Request]
    score: Callable[[Answers], SuiteResult]

    @property
    def prefix(self) -> str:
        return f"eval/{self.suite}/{self.dataset}/"


def metric_name(suite: str, dataset: str, metric: str) -> str:
    return f"eval/{suite}/{dataset}/{metric}"


def retrieval_task(name: str, path: Path, _image_root: Path | None, cfg: EvalConfig) -> SuiteTask:
    data = load_retrieval_set(path)
    requests = [Request("embed", image=img) for img in data.images] + [Request("embed", text=c) for c in data.captions]
    num_images = len(data.images)

    def score(ans: Answers) -> SuiteResult:
        vectors = torch.from_numpy(ans.embeddings)
        image_ok = torch.tensor([not e for e in ans.errors[:num_images]])
        skipped = [{"img_id": data.img_ids[i], "reason": ans.errors[i]} for i in range(num_images) if not image_ok[i]]
        keep_text = image_ok[data.text_to_image]
        new_row = torch.cumsum(image_ok, 0) - 1  # image row after dropping the failed ones
        image_emb, text_emb = vectors[:num_images][image_ok], vectors[num_images:][keep_text]
        metrics = recall_at_k(image_emb, text_emb, new_row[data.text_to_image[keep_text]], cfg.recall_ks)
        metrics["modality_gap"] = modality_gap(image_emb, text_emb)
        metrics["failed_images"] = float(len(skipped))
        return SuiteResult(metrics, skipped, clouds=(image_emb.numpy(), text_emb.numpy()))

    return SuiteTask("retrieval", name, str(path), requests, score)


def mmeb_task(name: str, path: Path, image_root: Path | None, cfg: EvalConfig) -> SuiteTask:
    data = mmeb.load_mmeb(path, image_root or path, subsets=cfg.mmeb_subsets or None)
    requests = [Request("embed", text=item.text, image_path=item.image_path) for item in data.items]

    def score(ans: Answers) -> SuiteResult:
        failed = [bool(e) for e in ans.errors]
        metrics, skipped = mmeb.score_mmeb(data, ans.embeddings, failed, extra_meta=cfg.mmeb_meta_tasks)
        return SuiteResult(metrics, data.skipped + skipped)

    return SuiteTask("mmeb", name, str(path), requests, score)


def pope_task(name: str, path: Path, image_root: Path | None, cfg: EvalConfig) -> SuiteTask:
    items, refused = pope.load_pope(path, image_root)
    requests = [Request("generate", text=pope.pope_prompt(it.question), image=it.image, image_path=it.image_path,
                        max_new_tokens=cfg.max_new_tokens) for it in items]

    def score(ans: Answers) -> SuiteResult:
        skipped = refused + [{"question_id": it.question_id, "reason": err}
                             for it, err in zip(items, ans.errors) if err]
        kept = [(it, text) for it, text, err in zip(items, ans.texts, ans.errors) if not err]
        parsed = [pope.parse_answer(text) for _, text in kept]
        metrics = pope.pope_metrics([it.label for it, _ in kept], parsed, [it.category for it, _ in kept])
        metrics["skipped"] = float(len(skipped))
        # every answer that is neither yes nor no is shown, so a reader sees what the model said
        samples = [{"question_id": it.question_id, "question": it.question, "label": it.label, "answer": text}
                   for (it, text), p in zip(kept, parsed) if p == "other"]
        return SuiteResult(metrics, skipped, samples)

    return SuiteTask("pope", name, str(path), requests, score)


def generation_task(name: str, path: Path, _image_root: Path | None, cfg: EvalConfig) -> SuiteTask:
    exchanges, unread = generation.load_exchanges(path)
    short = [generation.is_short_answer(ex.answer, cfg.qa_max_words) for ex in exchanges]
    qa = [ex for ex, s in zip(exchanges, short) if s]
    captions = [ex for ex, s in zip(exchanges, short) if not s]
    # greedy captions: the first of every row with a scene graph (scene match), else a few to show
    first_of_row: dict[int, generation.Exchange] = {}
    for ex in captions:
        first_of_row.setdefault(ex.row, ex)
    graded = [ex for ex in first_of_row.values() if ex.scene is not None]
    generated = graded or captions[: cfg.caption_samples]
    requests = ([Request("nll", image=ex.image, messages=generation.messages_json(ex)) for ex in captions]
                + [Request("generate", text=ex.question, image=ex.image, max_new_tokens=cfg.max_new_tokens)
                   for ex in qa]
                + [Request("generate", text=ex.question, image=ex.image, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
                   for ex in generated])

    def score(ans: Answers) -> SuiteResult:
        skipped = list(unread)
        nll = tokens = hits = total = 0
        typed: list[tuple[str, str, bool]] = []
        for i, ex in enumerate(captions):
            if ans.errors[i]:
                skipped.append({"row": ex.row, "id": ex.row_id, "reason": ans.errors[i]})
            else:
                nll, tokens = nll + float(ans.nll[i]), tokens + int(ans.tokens[i])
        for j, ex in enumerate(qa, start=len(captions)):
            if ans.errors[j]:
                skipped.append({"row": ex.row, "id": ex.row_id, "reason": ans.errors[j]})
                continue
            hit = generation.normalise_answer(ans.texts[j]) == generation.normalise_answer(ex.answer)
            total, hits = total + 1, hits + hit
            if ex.question_type is not None:
                typed.append((ex.question_type, ex.answer, hit))
        start = len(captions) + len(qa)
        greedy = [(ex, ans.texts[start + k]) for k, ex in enumerate(generated) if not ans.errors[start + k]]
        samples = [{"id": ex.row_id, "prompt": ex.question, "truth": ex.answer, "greedy": text}
                   for ex, text in greedy[: cfg.caption_samples]]
        metrics = generation.generation_metrics(nll, tokens, hits, total) | generation.qa_by_type_metrics(typed)
        if graded:
            metrics |= generation.scene_match_metrics(
                [(describes_scene(text, ex.scene), len(ex.scene["shapes"])) for ex, text in greedy])
        metrics["skipped"] = float(len(skipped))
        return SuiteResult(metrics, skipped, samples)

    return SuiteTask("generation", name, str(path), requests, score)


PREPARE = {"retrieval": retrieval_task, "mmeb": mmeb_task, "pope": pope_task, "generation": generation_task}


def resolve(path: str, eval_dir: str) -> Path | None:
    """Relative evaluation paths live under `data.eval_dir`."""
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() else Path(eval_dir) / p


def prepare_tasks(cfg: EvalConfig, eval_dir: str, *, suites: list[str] | None = None) -> list[SuiteTask]:
    """Load every configured (suite, data set), or only `suites`; a data set that is missing
    or unreadable stops here, naming it, before any model is loaded."""
    known = [s.suite for s in cfg.suites]
    for name in suites or []:
        if name not in PREPARE:
            raise ValueError(f"unknown suite {name!r}; suites: {list(PREPARE)}")
        if name not in known:
            raise ValueError(f"suite {name!r} has no data set in eval.suites (configured: {known})")
    tasks = []
    for entry in cfg.suites:
        if suites and entry.suite not in suites:
            continue
        for ds in entry.datasets:
            path = resolve(ds.path, eval_dir)
            if path is None or not path.exists():
                raise FileNotFoundError(f"eval.suites {entry.suite}/{ds.name}: {path or '(no path)'} does not exist; "
                                        "for the embedded scenes run `cafe scenes` first")
            tasks.append(PREPARE[entry.suite](ds.name, path, resolve(ds.image_root, eval_dir), cfg))
    return tasks
