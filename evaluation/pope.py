"""POPE (object hallucination, yes/no probes): load the questions, parse answers, score them.

Two layouts are read:

    lmms-eval `lmms-lab/POPE`  parquet (a file or a folder of them): question_id, question,
                               answer (yes/no), image_source, image ({bytes, path} or a path
                               under an image root), category (random / popular / adversarial)
    original POPE              json lines: question_id, image (file name under an image root),
                               text (the question), label (yes/no), optional category

Answer convention (`parse_answer`): the first word of the reply, lower-cased and stripped of
punctuation, must be "yes" or "no"; anything else is "other" and counts as a wrong answer.
This is stricter than the original POPE script, which reads any reply without "no"/"not" as
yes, and close to lmms-eval's exact match while accepting "Yes." and "yes, there is". The
share of "other" replies is reported next to the scores. Pure Python + pyarrow.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

POPE_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_CATEGORIES = ("random", "popular", "adversarial")
LABELS = ("yes", "no")


def pope_prompt(question: str) -> str:
    """The lmms-eval prompt: the question, then the short-answer instruction."""
    return question + POPE_PROMPT_SUFFIX


@dataclass(frozen=True, slots=True)
class PopeItem:
    question_id: int | str
    question: str
    label: str  # "yes" / "no"
    category: str  # "" when the file does not say
    image: bytes | None  # encoded image, when the file embeds it
    image_path: str | None  # otherwise the absolute path of the image file


def _label(value: object, where: str) -> str:
    label = str(value).strip().lower()
    if label not in LABELS:
        raise ValueError(f"label {value!r} is not yes/no ({where})")
    return label


def _image_file(name: str, image_root: Path, where: str) -> str:
    path = os.path.abspath(image_root / name)
    if not os.path.isfile(path):
        raise ValueError(f"image file {path} not found ({where})")
    return path


def _category_from_name(path: Path) -> str:
    """The original files hold one category each and name it (coco_pope_adversarial.json)."""
    return next((c for c in POPE_CATEGORIES if c in path.stem), "")


def _parquet_items(path: Path, image_root: Path) -> list[PopeItem]:
    items = []
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        where = f"row {i} of {path}"
        image, image_path = row["image"], None
        if isinstance(image, dict) and image.get("bytes") is not None:
            image = image["bytes"]
        else:
            name = image.get("path") if isinstance(image, dict) else image
            image, image_path = None, _image_file(name or "", image_root, where)
        label = _label(row["answer"], where)
        items.append(PopeItem(row["question_id"], row["question"], label, row.get("category") or "", image, image_path))
    return items


def _jsonl_items(path: Path, image_root: Path) -> list[PopeItem]:
    items = []
    default_category = _category_from_name(path)
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row, where = json.loads(line), f"line {i + 1} of {path}"
        label = _label(row["label"], where)
        category = row.get("category") or default_category
        image_path = _image_file(row["image"], image_root, where)
        items.append(PopeItem(row["question_id"], row["text"], label, category, None, image_path))
    return items


def load_pope(path: str | Path, image_root: str | Path | None = None) -> list[PopeItem]:
    """POPE questions from a parquet file, a folder of parquet files, or a json-lines file.

    Image paths are read under `image_root` (default: the folder of the data file)."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no parquet files in {path}")
    items = []
    for file in files:
        root = Path(image_root) if image_root is not None else file.parent
        items += _jsonl_items(file, root) if file.suffix in (".jsonl", ".json") else _parquet_items(file, root)
    return items


def parse_answer(text: str) -> str:
    """'yes', 'no' or 'other': the first word, lower-cased, without surrounding punctuation."""
    words = text.strip().lower().split(maxsplit=1)
    word = words[0].strip(string.punctuation) if words else ""
    return word if word in LABELS else "other"


def _scores(labels: list[str], answers: list[str]) -> dict[str, float]:
    tp = sum(lab == "yes" and ans == "yes" for lab, ans in zip(labels, answers))
    fp = sum(lab == "no" and ans == "yes" for lab, ans in zip(labels, answers))
    tn = sum(lab == "no" and ans == "no" for lab, ans in zip(labels, answers))
    predicted_yes, predicted_no, actual_yes, n = tp + fp, answers.count("no"), labels.count("yes"), len(labels)
    precision = tp / predicted_yes if predicted_yes else 0.0
    recall = tp / actual_yes if actual_yes else 0.0  # a yes question answered "other" is a miss
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": predicted_yes / n,
        "other_ratio": answers.count("other") / n,
        # an answerer that never looks at the image but says yes and no as often as this one
        "blind_accuracy": (predicted_yes * actual_yes + predicted_no * (n - actual_yes)) / n**2,
        "count": float(n),
    }


def pope_metrics(labels: list[str], answers: list[str], categories: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class: yes) overall and under `<category>/`.

    `answers` are replies or `parse_answer` outputs (parsing again changes nothing); an "other"
    answer is always wrong. `yes_ratio` is the share of PREDICTIONS that are yes, not of the
    ground truth (which lmms-eval reports): a model that says yes too often shows here.
    `blind_accuracy` is what answering yes and no at the model's rates, without the image,
    scores on average: accuracy above it is presence judgement, while F1 also rises with the
    yes rate alone."""
    if not len(labels) == len(answers) == len(categories):
        raise ValueError(f"{len(labels)} labels, {len(answers)} answers, {len(categories)} categories")
    if not labels:
        raise ValueError("no POPE answers to score")
    labels = [_label(lab, f"label {i}") for i, lab in enumerate(labels)]
    answers = [parse_answer(a) for a in answers]
    metrics = _scores(labels, answers)
    for category in sorted(set(categories) - {""}):
        keep = [i for i, c in enumerate(categories) if c == category]
        part = _scores([labels[i] for i in keep], [answers[i] for i in keep])
        metrics |= {f"{category}/{key}": value for key, value in part.items()}
    return metrics
