"""POPE (object hallucination, yes/no probes): load the questions, parse answers, score them.

Two layouts are read:

    lmms-eval `lmms-lab/POPE`  parquet (a file or a folder of them): question_id, question,
                               answer (yes/no), image_source, image ({bytes, path} or a path
                               under an image root), category (random / popular / adversarial)
    original POPE              json lines: question_id, image (file name under an image root),
                               text (the question), label (yes/no), optional category

Image paths are read only inside the image root, and only regular files under the byte cap
(`cafe.files`); a question whose image is refused is a counted skip, its reason
`<refusal>: <detail>` (e.g. `path_outside_root: ...`). A missing image file is a broken data set
and fails the load.

Answer convention (`parse_answer`): the first word of the reply, lower-cased and stripped of
punctuation, must be "yes" or "no"; anything else is "other" and counts as a wrong answer.
This is stricter than the original POPE script, which reads any reply without "no"/"not" as
yes, and close to lmms-eval's exact match while accepting "Yes." and "yes, there is". The
share of "other" replies is reported next to the scores. Pure Python + pyarrow.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cafe.files import RefusedFile, check_image_file

POPE_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_CATEGORIES = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
PARQUET_COLUMNS = ("question_id", "question", "answer", "image")  # lmms-eval's, read here
JSONL_KEYS = ("question_id", "image", "text", "label")  # the original files'


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
    """The checked path of an image under `image_root`; RefusedFile when it may not be read."""
    if not name:
        raise ValueError(f"no image named ({where})")
    try:
        return check_image_file(name, str(image_root))
    except FileNotFoundError:
        raise ValueError(f"image file {image_root / name} not found ({where})") from None


def _require(names: list[str] | dict, required: tuple[str, ...], where: str, layout: str) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}; a POPE {layout} has {', '.join(required)}")


def _category_from_name(path: Path) -> str:
    """The original files hold one category each and name it (coco_pope_adversarial.json)."""
    return next((c for c in POPE_CATEGORIES if c in path.stem), "")


def _parquet_item(row: dict, image_root: Path, where: str) -> PopeItem:
    image, image_path = row["image"], None
    if isinstance(image, dict) and image.get("bytes") is not None:
        image = image["bytes"]
    else:
        name = image.get("path") if isinstance(image, dict) else image
        image, image_path = None, _image_file(name, image_root, where)
    label = _label(row["answer"], where)
    return PopeItem(row["question_id"], row["question"], label, row.get("category") or "", image, image_path)


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    table = pq.read_table(path)
    _require(table.column_names, PARQUET_COLUMNS, str(path), "parquet file")
    return [(f"row {i} of {path}", row) for i, row in enumerate(table.to_pylist())]


def _jsonl_item(row: dict, image_root: Path, where: str) -> PopeItem:
    label = _label(row["label"], where)
    image_path = _image_file(row["image"], image_root, where)
    return PopeItem(row["question_id"], row["text"], label, row["category"], None, image_path)


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    default_category = _category_from_name(path)
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row, where = json.loads(line), f"line {i + 1} of {path}"
            _require(row, JSONL_KEYS, where, "json-lines file")
            rows.append((where, row | {"category": row.get("category") or default_category}))
    return rows


def _file_items(file: Path, image_root: Path) -> tuple[list[PopeItem], list[dict]]:
    """The file's questions, and those skipped because their image may not be read."""
    jsonl = file.suffix in (".jsonl", ".json")
    read_rows, make_item = (_jsonl_rows, _jsonl_item) if jsonl else (_parquet_rows, _parquet_item)
    items, skipped = [], []
    for where, row in read_rows(file):
        try:
            items.append(make_item(row, image_root, where))
        except RefusedFile as err:
            skipped.append({"question_id": row["question_id"], "file": str(file), "reason": str(err)})
    return items, skipped


def load_pope(path: str | Path, image_root: str | Path | None = None) -> tuple[list[PopeItem], list[dict]]:
    """POPE questions from a parquet file, a folder of parquet files, or a json-lines file, and
    the questions skipped (with a reason) because their image may not be read.

    Image paths are read under `image_root` (default: the folder of the data file)."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no parquet files in {path}")
    items, skipped = [], []
    for file in files:
        root = Path(image_root) if image_root is not None else file.parent
        file_items, file_skipped = _file_items(file, root)
        items += file_items
        skipped += file_skipped
    return items, skipped


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
