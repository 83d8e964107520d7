"""POPE loading (both layouts), answer parsing and metrics against hand-worked confusion matrices."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.pope import (
    POPE_PROMPT_SUFFIX,
    PopeItem,
    load_pope,
    parse_answer,
    pope_metrics,
    pope_prompt,
)
from evaluation.scorecard import chance_notes

# Matrix A, 10 questions. yes questions: yes, yes, yes, no, "maybe" -> TP 3, FN 2 (one "other").
# no questions: no, no, no, yes, "I cannot tell" -> TN 3, FP 1, one "other" (a wrong answer, not a TN).
A_LABELS = ["yes"] * 5 + ["no"] * 5
A_ANSWERS = ["Yes.", "yes", "yes, there is", "No", "maybe", "no", "No.", "no", "yes", "I cannot tell"]
A_METRICS = {
    "accuracy": 6 / 10,  # (TP + TN) / n
    "precision": 3 / 4,  # TP / (TP + FP)
    "recall": 3 / 5,  # TP / (TP + FN)
    "f1": 2 * 0.75 * 0.6 / 1.35,
    "yes_ratio": 4 / 10,  # predicted yes: TP + FP
    "other_ratio": 2 / 10,
    "blind_accuracy": (4 * 5 + 4 * 5) / 100,  # says yes 4 and no 4 times in 10, blind to 5 yes and 5 no questions
    "count": 10.0,
}
# Matrix B, a model that says yes to everything, 4 yes and 2 no questions: TP 4, FP 2, TN 0, FN 0.
B_LABELS = ["yes", "no", "yes", "yes", "no", "yes"]
B_ANSWERS = ["yes"] * 6
B_METRICS = {
    "accuracy": 4 / 6, "precision": 4 / 6, "recall": 1.0, "f1": 0.8, "yes_ratio": 1.0, "other_ratio": 0.0, "count": 6.0,
    "blind_accuracy": 4 / 6,  # yes to everything needs no image: its accuracy is all blind
}


def test_prompt():
    assert POPE_PROMPT_SUFFIX == "\nAnswer the question using a single word or phrase."
    assert pope_prompt("Is there a cat in the image?") == (
        "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    )


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("yes", "yes"), ("Yes.", "yes"), ("  YES  ", "yes"), ("yes, there is a cat", "yes"), ("No!", "no"),
        ("no.\n", "no"), ('"No"', "no"), ("There is no cat.", "other"), ("Not at all", "other"),
        ("", "other"), ("yesterday", "other"), ("other", "other"),
    ],
)
def test_parse_answer(text, parsed):
    assert parse_answer(text) == parsed


def test_hand_worked_matrices():
    assert pope_metrics(A_LABELS, A_ANSWERS, [""] * 10) == pytest.approx(A_METRICS)
    assert pope_metrics(B_LABELS, B_ANSWERS, [""] * 6) == pytest.approx(B_METRICS)


def test_no_yes_predictions_give_zero_precision():
    # TP 0, FP 0, TN 1, FN 1 (answered "other"): precision and F1 are 0, not undefined
    metrics = pope_metrics(["yes", "no"], ["dunno", "no"], ["", ""])
    assert metrics == pytest.approx({
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "other_ratio": 0.5,
        "count": 2.0, "blind_accuracy": 1 / 4,
    })


def test_per_category_split():
    categories = ["random"] * 10 + ["adversarial"] * 6
    metrics = pope_metrics(A_LABELS + B_LABELS, A_ANSWERS + B_ANSWERS, categories)
    expected = {f"random/{k}": v for k, v in A_METRICS.items()} | {f"adversarial/{k}": v for k, v in B_METRICS.items()}
    # overall: TP 7, FP 3, TN 3, FN 3, 2 other, 16 questions
    expected |= {
        "accuracy": 10 / 16, "precision": 7 / 10, "recall": 7 / 9, "f1": 2 * 0.7 * (7 / 9) / (0.7 + 7 / 9),
        "yes_ratio": 10 / 16, "other_ratio": 2 / 16, "count": 16.0, "blind_accuracy": (10 * 9 + 4 * 7) / 16**2,
    }
    assert metrics == pytest.approx(expected)


def test_a_note_where_no_model_beats_an_image_blind_answerer():
    """The demo's base and CAFe model at chance (accuracy 0.502 and 0.503 over 2,604 probes while
    saying yes 80% and 92% of the time) get one note; a model 0.64 right at a 0.42 yes rate does
    not, and neither does the pair when it is one of them."""
    def card(accuracy, yes_ratio, count=2604.0, yes_labels=0.5):
        blind = yes_labels * yes_ratio + (1 - yes_labels) * (1 - yes_ratio)
        return {"eval/pope/scenes/accuracy": accuracy, "eval/pope/scenes/blind_accuracy": blind,
                "eval/pope/scenes/count": count, "eval/retrieval/scenes/i2t_r1": 0.3}

    at_chance = {"base": card(0.502, 0.795), "CAFe": card(0.503, 0.916)}
    (note,) = chance_notes(at_chance)
    assert note.startswith("POPE scenes:") and "base 0.502 vs 0.500, CAFe 0.503 vs 0.500" in note
    assert chance_notes({"base": card(0.64, 0.42)}) == []
    assert chance_notes(at_chance | {"deeper": card(0.64, 0.42)}) == []
    assert chance_notes({"base": card(0.52, 0.5, count=100.0)}) != []  # 2 points over 100 probes: within noise
    # 80% of the probes true: yes 90% of the time is 0.74 right blind, so 0.75 is no skill and 0.85 is
    (skewed,) = chance_notes({"base": card(0.75, 0.9, yes_labels=0.8)})
    assert "base 0.750 vs 0.740" in skewed
    assert chance_notes({"base": card(0.85, 0.9, yes_labels=0.8)}) == []
    # a column without POPE (not scored): nothing is claimed of "no model"
    assert chance_notes({"base": card(0.502, 0.795), "other": {"eval/retrieval/scenes/i2t_r1": 0.3}}) == []


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="1 labels, 2 answers"):
        pope_metrics(["yes"], ["yes", "no"], ["", ""])
    with pytest.raises(ValueError, match="not yes/no"):
        pope_metrics(["maybe"], ["yes"], [""])


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _lmms_row(qid: str, answer: str, image: dict | str, category: str = "random") -> dict:
    return {
        "question_id": qid, "question": f"Is there a cat? {qid}", "answer": answer, "image_source": "coco",
        "image": image, "category": category,
    }


def test_lmms_eval_layout(tmp_path):
    (tmp_path / "img" / "b.jpg").parent.mkdir()
    (tmp_path / "img" / "b.jpg").write_bytes(b"jpg")
    folder = tmp_path / "pope"
    second = _lmms_row("2", "no", {"bytes": None, "path": "b.jpg"}, "popular")
    _parquet(folder / "test-00001-of-00002.parquet", [second])
    _parquet(folder / "test-00000-of-00002.parquet", [_lmms_row("1", "yes", {"bytes": b"raw", "path": "a.jpg"})])
    items, skipped = load_pope(folder, tmp_path / "img")
    assert items == [
        PopeItem("1", "Is there a cat? 1", "yes", "random", b"raw", None),
        PopeItem("2", "Is there a cat? 2", "no", "popular", None, str(tmp_path / "img" / "b.jpg")),
    ] and skipped == []
    plain = _parquet(tmp_path / "plain.parquet", [_lmms_row("7", "Yes", "img/b.jpg", "adversarial")])
    assert load_pope(plain) == ([  # string paths; the image root defaults to the file's folder
        PopeItem("7", "Is there a cat? 7", "yes", "adversarial", None, str(tmp_path / "img" / "b.jpg"))
    ], [])


def test_original_json_lines_layout(tmp_path):
    (tmp_path / "COCO_val2014_000000000001.jpg").write_bytes(b"jpg")
    rows = [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a car?", "label": "no",
         "category": "random"},
    ]
    path = tmp_path / "coco_pope_adversarial.json"  # one category per original file, named in it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    image = str(tmp_path / "COCO_val2014_000000000001.jpg")
    assert load_pope(path, tmp_path) == ([
        PopeItem(1, "Is there a dog?", "yes", "adversarial", None, image),
        PopeItem(2, "Is there a car?", "no", "random", None, image),
    ], [])


def test_bad_label_and_missing_image_name_file_and_row(tmp_path):
    bad = _parquet(tmp_path / "bad.parquet", [_lmms_row("1", "yes", {"bytes": b"x", "path": ""}),
                                              _lmms_row("2", "maybe", {"bytes": b"x", "path": ""})])
    with pytest.raises(ValueError, match=r"'maybe' is not yes/no \(row 1 of .*bad\.parquet\)"):
        load_pope(bad)
    lines = tmp_path / "q.jsonl"
    lines.write_text(json.dumps({"question_id": 1, "image": "gone.jpg", "text": "Is there a dog?", "label": "no"}))
    with pytest.raises(ValueError, match=r"gone\.jpg not found \(line 1 of .*q\.jsonl\)"):
        load_pope(lines)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet files"):
        load_pope(tmp_path / "empty")
