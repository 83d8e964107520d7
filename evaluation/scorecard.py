"""The whole scorecard of one checkpoint: every suite's requests answered in one backend call
(identical requests across suites answered once), then scored; written as JSON, Markdown and
a modality-gap plot, and logged onto an MLflow run at the checkpoint's training step."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.backends import Backend
from evaluation.requests import Request
from evaluation.suites import SuiteResult, SuiteTask

# the numbers a person compares first, in this order (others stay in the JSON and in MLflow)
HEADLINE = ("i2t_r1", "t2i_r1", "modality_gap", "overall", "meta/", "f1", "accuracy", "blind_accuracy", "yes_ratio",
            "caption_loss", "qa_exact_match", "qa_exact_match_by_type/", "scene_match", "scene_match_single")


@dataclass(slots=True)
class Scorecard:
    metrics: dict[str, float]  # eval/<suite>/<dataset>/<metric>
    results: list[tuple[SuiteTask, SuiteResult]]
    timing: dict[str, float]


def score_tasks(tasks: list[SuiteTask], backend: Backend) -> Scorecard:
    unique: dict[Request, int] = {}
    positions = [[unique.setdefault(r, len(unique)) for r in task.requests] for task in tasks]
    requests = list(unique)
    start = time.perf_counter()
    answers = backend(requests)
    seconds = time.perf_counter() - start
    results = [(task, task.score(answers.take(index))) for task, index in zip(tasks, positions)]
    metrics = {task.prefix + key: float(value) for task, result in results for key, value in result.metrics.items()}
    timing = {"model_seconds": seconds, "requests": float(len(requests)), "requests_per_s": len(requests) / seconds}
    return Scorecard(metrics, results, timing)


def headline(metrics: dict[str, float]) -> list[str]:
    """Headline metric names present in `metrics`, grouped by suite and data set."""
    def rank(name: str) -> tuple:
        metric = name.split("/", 3)[3]
        hits = [i for i, h in enumerate(HEADLINE) if metric == h or (h.endswith("/") and metric.startswith(h))]
        return (name.split("/")[1:3], hits[0]) if hits else None
    return sorted((n for n in metrics if rank(n) is not None), key=rank)


def _no_skill(columns: dict[str, dict[str, float]], rate: str, baseline: str,
              count: str) -> list[tuple[str, float, float, float]] | None:
    """(label, rate, baseline, two standard errors of the rate) per column, when every column
    has the three metrics and none beats its baseline by two standard errors; else None."""
    if not all(key in m for m in columns.values() for key in (rate, baseline, count)):
        return None  # a column not scored: nothing may be said of "no model"
    rows = [(label, m[rate], m[baseline], 2 * math.sqrt(m[rate] * (1 - m[rate]) / m[count]))
            for label, m in columns.items()]
    return rows if all(value - base <= margin for _, value, base, margin in rows) else None


def chance_notes(columns: dict[str, dict[str, float]]) -> list[str]:
    """A line per POPE data set on which no column's accuracy beats its `blind_accuracy`: there
    F1 differences follow the yes rate, not hallucination."""
    notes = []
    for dataset in sorted({k.split("/")[2] for c in columns.values() for k in c if k.startswith("eval/pope/")}):
        prefix = f"eval/pope/{dataset}/"
        if rows := _no_skill(columns, prefix + "accuracy", prefix + "blind_accuracy", prefix + "count"):
            shown = ", ".join(f"{label} {value:.3f} vs {base:.3f}" for label, value, base, _ in rows)
            notes.append(f"POPE {dataset}: no model answers better than an image-blind answerer with its yes rate "
                         f"(accuracy vs blind accuracy: {shown}; two standard errors at most "
                         f"{max(r[3] for r in rows):.3f}), so F1 here follows how often a model says yes, not "
                         "whether it hallucinates.")
    return notes


def majority_notes(columns: dict[str, dict[str, float]]) -> list[str]:
    """A line per data set naming the question types on which no column's exact match beats
    always giving the commonest answer: a skill not learnt, whatever the QA mean says."""
    found: dict[str, list[str]] = {}
    for name in sorted({k for c in columns.values() for k in c
                        if k.startswith("eval/generation/") and k.split("/")[3:4] == ["qa_majority_by_type"]}):
        _, _, dataset, _, question_type = name.split("/", 4)
        prefix = f"eval/generation/{dataset}/"
        rows = _no_skill(columns, f"{prefix}qa_exact_match_by_type/{question_type}", name,
                         f"{prefix}qa_count_by_type/{question_type}")
        if rows:
            shown = ", ".join(f"{label} {value:.3f}" for label, value, _, _ in rows)
            found.setdefault(dataset, []).append(f"{question_type} ({shown} vs {rows[0][2]:.3f})")
    return [f"QA {dataset}: no model answers these question types better than always giving their commonest "
            f"answer (exact match vs that answer's share): {'; '.join(types)}." for dataset, types in found.items()]


def comparison_markdown(columns: dict[str, dict[str, float]]) -> str:
    """Headline metrics of several scorecards side by side (e.g. base | CAFe), with notes under
    the table where every one of them is at chance on POPE or on a question type."""
    names = headline(next(iter(columns.values())))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        values = [f"{c[name]:.3f}" if name in c else "-" for c in columns.values()]
        lines.append(f"| `{name}` | " + " | ".join(values) + " |")
    notes = chance_notes(columns) + majority_notes(columns)  # a number that measures no skill says so
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in notes] if notes else []))


def _markdown(card: Scorecard, title: str) -> str:
    parts = [f"# {title}", "", comparison_markdown({"value": card.metrics}), ""]
    for task, result in card.results:
        parts.append(f"## {task.suite} / {task.dataset}\n\n`{task.source}`\n")
        parts += [f"- `{k}`: {v:.4f}" for k, v in sorted(result.metrics.items())]
        if result.skipped:
            parts.append(f"\n{len(result.skipped)} rows skipped, e.g.:")
            parts += [f"- {json.dumps(s)}" for s in result.skipped[:10]]
        if result.samples:
            parts.append("\nSamples:")
            parts += [f"- {json.dumps(s)}" for s in result.samples[:20]]
        parts.append("")
    parts.append(f"Model time: {card.timing['model_seconds']:.1f} s for {int(card.timing['requests'])} requests.")
    return "\n".join(parts) + "\n"


def plot_modality_gap(image_emb: np.ndarray, text_emb: np.ndarray, gap: float, path: Path, title: str) -> None:
    """Both embedding clouds on their first two principal axes (shared by both clouds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = np.concatenate([image_emb, text_emb]).astype(np.float64)
    centred = both - both.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ axes[:2].T
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(*xy[: len(image_emb)].T, s=8, alpha=0.6, label=f"images ({len(image_emb)})")
    ax.scatter(*xy[len(image_emb) :].T, s=8, alpha=0.6, label=f"captions ({len(text_emb)})")
    ax.set_title(f"{title}\nmodality gap {gap:.3f}", fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(card: Scorecard, out_dir: Path, *, title: str, checkpoint: str, step: int) -> list[Path]:
    """scorecard.json, scorecard.md and one modality_gap_<dataset>.png per retrieval set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "title": title,
        "checkpoint": checkpoint,
        "step": step,
        "metrics": card.metrics,
        "timing": card.timing,
        "suites": [{"suite": t.suite, "dataset": t.dataset, "source": t.source, "metrics": r.metrics,
                    "skipped": r.skipped, "samples": r.samples} for t, r in card.results],
    }
    paths = [out_dir / "scorecard.json", out_dir / "scorecard.md"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(_markdown(card, title))
    for task, result in card.results:
        if result.clouds is not None:
            paths.append(out_dir / f"modality_gap_{task.dataset}.png")
            plot_modality_gap(*result.clouds, result.metrics["modality_gap"], paths[-1], f"{title}: {task.dataset}")
    return paths
