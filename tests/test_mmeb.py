"""MMEB-eval loading (layouts, dedupe, broken rows) and precision@1 scoring."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import mmeb
from evaluation.mmeb import (
    MMEB_META_TASKS,
    EmbedItem,
    MmebRow,
    MmebSet,
    list_subsets,
    load_mmeb,
    meta_task_of,
    score_mmeb,
)


def _row(qry_text: str, tgt_text: list[str], qry_img: str = "", tgt_img: list[str] | None = None, **extra) -> dict:
    return {
        "qry_text": qry_text,
        "qry_img_path": qry_img,
        "tgt_text": tgt_text,
        "tgt_img_path": tgt_img if tgt_img is not None else [""] * len(tgt_text),
        **extra,
    }


def _subset(root: Path, name: str, rows: list[dict], file: str = "test-00000-of-00001.parquet") -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / name / file)


def _vectors(data: MmebSet, table: dict[str, list[float]]) -> np.ndarray:
    """Each item's vector looked up by its text, L2-normalised."""
    vectors = np.array([table[item.text] for item in data.items], dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _no_failures(data: MmebSet) -> list[bool]:
    return [False] * len(data.items)


def test_public_subsets_and_meta_tasks():
    tasks = list(MMEB_META_TASKS.values())
    assert len(MMEB_META_TASKS) == 36
    assert [tasks.count(t) for t in ("classification", "vqa", "retrieval", "grounding")] == [10, 10, 12, 4]
    assert meta_task_of("Wiki-SS-NQ") == "retrieval" and meta_task_of("Visual7W-Pointing") == "grounding"
    assert meta_task_of("MSCOCO", {"MSCOCO": "vqa"}) == "grounding"  # the public map wins
    assert meta_task_of("Mine", {"Mine": "vqa"}) == "vqa" and meta_task_of("Mine") is None


def test_hand_worked_subset(tmp_path):
    _subset(tmp_path, "Toy", [_row("q0", ["a", "b"]), _row("q1", ["b", "a", "c"]), _row("q2", ["c", "a"])])
    data = load_mmeb(tmp_path, tmp_path)
    table = {"a": [1, 0], "b": [0, 1], "c": [0.6, 0.8], "q0": [1, 0], "q1": [0.8, 0.6], "q2": [0, 1]}
    # q0: a 1.0 > b 0.0 hit | q1: b 0.6 < c 0.96 miss | q2: c 0.8 > a 0.0 hit
    metrics, skipped = score_mmeb(data, _vectors(data, table), _no_failures(data), extra_meta={"Toy": "vqa"})
    assert metrics == pytest.approx(
        {"subset/Toy": 2 / 3, "meta/vqa": 2 / 3, "overall": 2 / 3, "skipped_rows": 0.0}
    )
    assert skipped == []


def test_ties_count_against_the_query(tmp_path):
    rows = [_row("q", ["pos", "twin"]), _row("q", ["pos", "other"]), _row("q", ["pos"])]
    _subset(tmp_path, "Ties", rows)
    data = load_mmeb(tmp_path, tmp_path)
    table = {"q": [1, 0], "pos": [1, 1], "twin": [1, 1], "other": [0, 1]}
    # row 0: pos ties twin -> miss | row 1: pos 0.71 > other 0 -> hit | row 2: alone -> hit
    metrics, _ = score_mmeb(data, _vectors(data, table), _no_failures(data))
    assert metrics["subset/Ties"] == pytest.approx(2 / 3)


def _reference(data: MmebSet, vectors: np.ndarray, failed: list[bool]) -> tuple[dict[str, float], int]:
    """Per-subset precision@1 by plain Python loops in float64."""
    hits: dict[str, list[float]] = {}
    skipped = 0
    for row in data.rows:
        if any(failed[i] for i in (row.query, *row.candidates)):
            skipped += 1
            continue
        q = [float(x) for x in vectors[row.query]]
        scores = [sum(a * float(b) for a, b in zip(q, vectors[c])) for c in row.candidates]
        hits.setdefault(row.subset, []).append(float(all(scores[0] > s for s in scores[1:])))
    return {s: sum(h) / len(h) for s, h in hits.items()}, skipped


@pytest.mark.parametrize("budget", [1 << 24, 50])  # one chunk per count, and many small chunks
def test_matches_a_brute_force_reference(monkeypatch, budget):
    monkeypatch.setattr(mmeb, "SCORE_BUDGET", budget)
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    num_items, dim = 60, 8
    base = np_rng.normal(size=(num_items, dim)).astype(np.float32)
    base[1::7] = base[0::7][: len(base[1::7])]  # exact duplicates: ties that must go against the query
    vectors = base / np.linalg.norm(base, axis=1, keepdims=True)
    items = [EmbedItem(f"item {i}", None) for i in range(num_items)]
    rows = [
        MmebRow(f"S{rng.randrange(4)}", "f", r, rng.randrange(num_items),
                rng.sample(range(num_items), rng.choice([1, 2, 5, 5, 5, 9])))
        for r in range(400)
    ]
    failed = [rng.random() < 0.05 for _ in range(num_items)]
    data = MmebSet(items, rows)
    metrics, skipped = score_mmeb(data, vectors, failed)
    expected, expected_skipped = _reference(data, vectors, failed)
    assert {k.removeprefix("subset/"): v for k, v in metrics.items() if k.startswith("subset/")} == expected
    assert metrics["overall"] == pytest.approx(np.mean(list(expected.values())))
    assert len(skipped) == metrics["skipped_rows"] == expected_skipped > 0
    assert all("could not be embedded" in s["reason"] for s in skipped)


def test_repeated_items_are_embedded_once(tmp_path):
    (tmp_path / "img.png").write_bytes(b"png")
    rows = [
        _row("q", ["a", "b"], "img.png"), _row("q", ["b", "a"], "img.png"), _row("q", ["a", ""], "", ["", "img.png"])
    ]
    _subset(tmp_path, "One", rows)
    _subset(tmp_path, "Two", rows[:1])
    data = load_mmeb(tmp_path, tmp_path)
    image = str(tmp_path / "img.png")
    assert data.items == [EmbedItem("q", image), EmbedItem("a", None), EmbedItem("b", None),
                          EmbedItem("q", None), EmbedItem(None, image)]
    assert [(r.subset, r.query, r.candidates) for r in data.rows] == [
        ("One", 0, [1, 2]), ("One", 0, [2, 1]), ("One", 3, [1, 4]), ("Two", 0, [1, 2])
    ]


def test_old_layout_placeholders_become_the_image_token(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"jpg")
    rows = [_row("<|image_1|>\nRepresent the given image for classification", ["cat", "<|image_2|> dog"], "x.jpg")]
    _subset(tmp_path, "ImageNet-1K", rows)
    data = load_mmeb(tmp_path, tmp_path)
    assert [item.text for item in data.items] == [
        "<image>\nRepresent the given image for classification", "cat", "<image> dog"
    ]


def test_instructions_come_first(tmp_path):
    (tmp_path / "x.png").write_bytes(b"png")
    rows = [
        _row("", ["red", "blue"], "x.png", qry_inst="Find a caption.", tgt_inst=["Represent:", "Represent:"]),
        _row("What color?", ["red"], "x.png", qry_inst="<|image_1|> Answer.", tgt_inst=["Represent:"]),
    ]
    _subset(tmp_path, "Lists", rows)
    plain = [_row("q", ["a", "b"], qry_inst="Ask:", tgt_inst="Doc:")]  # a single string for every target
    _subset(tmp_path, "Plain", plain)
    data = load_mmeb(tmp_path, tmp_path)
    assert [item.text for item in data.items] == [
        "Find a caption.", "Represent: red", "Represent: blue", "<image> Answer. What color?",
        "Ask: q", "Doc: a", "Doc: b",
    ]


def test_unknown_subset_names_the_choices(tmp_path):
    _subset(tmp_path, "A", [_row("q", ["a"])])
    _subset(tmp_path, "B", [_row("q", ["a"])])
    (tmp_path / "eval_images").mkdir()  # no parquet: not a subset
    assert list_subsets(tmp_path) == ["A", "B"]
    assert len(load_mmeb(tmp_path, tmp_path, subsets=["B"]).rows) == 1
    with pytest.raises(ValueError, match=r"\['Nope'\].*\['A', 'B'\]"):
        load_mmeb(tmp_path, tmp_path, subsets=["A", "Nope"])


def test_files_of_a_subset_are_read_in_name_order(tmp_path):
    _subset(tmp_path, "S", [_row("second", ["a"])], "test-00001-of-00002.parquet")
    _subset(tmp_path, "S", [_row("first", ["a"])], "test-00000-of-00002.parquet")
    _subset(tmp_path, "S", [_row("ignored", ["a"])], "train-00000-of-00001.parquet")
    data = load_mmeb(tmp_path, tmp_path)
    assert [data.items[r.query].text for r in data.rows] == ["first", "second"]


def test_broken_rows_are_skipped_and_counted(tmp_path):
    _subset(tmp_path, "S", [_row("ok", ["a", "b"]), _row("short images", ["a", "b"], tgt_img=[""]), _row("empty", [])])
    _subset(tmp_path, "T", [_row("short inst", ["a", "b"], qry_inst="", tgt_inst=["x"])])
    data = load_mmeb(tmp_path, tmp_path)
    assert len(data.rows) == 1
    assert [(s["subset"], s["row"]) for s in data.skipped] == [("S", 1), ("S", 2), ("T", 0)]
    assert "tgt_img_path 1" in data.skipped[0]["reason"] and "tgt_inst 1" in data.skipped[2]["reason"]
    assert data.skipped[1]["reason"] == "no candidates" and data.skipped[0]["file"].endswith(".parquet")
    metrics, skipped = score_mmeb(data, _vectors(data, {"ok": [1, 0], "a": [1, 0], "b": [0, 1]}), _no_failures(data))
    assert metrics["skipped_rows"] == 3.0 and skipped == []  # load-time skips stay in data.skipped
    assert metrics["subset/S"] == 1.0 and "subset/T" not in metrics
    failed = [item.text == "b" for item in data.items]  # the last scorable row now uses a failed item
    metrics, skipped = score_mmeb(data, _vectors(data, {"ok": [1, 0], "a": [1, 0], "b": [0, 1]}), failed)
    assert metrics == {"skipped_rows": 4.0} and [(s["subset"], s["row"]) for s in skipped] == [("S", 0)]


def test_missing_image_fails_naming_the_file(tmp_path):
    (tmp_path / "there.png").write_bytes(b"png")
    absolute = tmp_path / "elsewhere" / "target.png"  # absolute and inside the image root: used as given
    absolute.parent.mkdir()
    absolute.write_bytes(b"png")
    _subset(tmp_path / "data", "Good", [_row("q", ["a"], "there.png", [str(absolute)])])
    _subset(tmp_path / "data", "Bad", [_row("q", ["a"], "there.png"), _row("q", ["a"], "gone.png")])
    good = load_mmeb(tmp_path / "data", tmp_path, subsets=["Good"])
    assert good.items == [EmbedItem("q", str(tmp_path / "there.png")), EmbedItem("a", str(absolute))]
    with pytest.raises(ValueError, match=r"gone\.png not found \(subset Bad, row 1 of .*test-00000"):
        load_mmeb(tmp_path / "data", tmp_path)


def test_meta_tasks_average_their_subsets():
    items = [EmbedItem("q", None), EmbedItem("same", None), EmbedItem("away", None)]
    vectors = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)

    def rows(subset: str, hits: int, misses: int) -> list[MmebRow]:
        return [MmebRow(subset, "f", i, 0, [1, 2]) for i in range(hits)] + [
            MmebRow(subset, "f", hits + i, 0, [2, 1]) for i in range(misses)
        ]

    data = MmebSet(items, rows("ImageNet-1K", 1, 1) + rows("VOC2007", 1, 0) + rows("OK-VQA", 1, 3)
                   + rows("Mine", 3, 1) + rows("Unmapped", 0, 2))
    metrics, _ = score_mmeb(data, vectors, [False] * 3, extra_meta={"Mine": "vqa"})
    assert metrics == pytest.approx({
        "subset/ImageNet-1K": 0.5, "subset/VOC2007": 1.0, "subset/OK-VQA": 0.25, "subset/Mine": 0.75,
        "subset/Unmapped": 0.0,
        "meta/classification": 0.75, "meta/vqa": 0.5,  # no retrieval or grounding subset: no key
        "overall": (0.5 + 1.0 + 0.25 + 0.75 + 0.0) / 5, "skipped_rows": 0.0,
    })


def test_a_subset_whose_rows_all_fail_gets_no_score():
    items = [EmbedItem("q", None), EmbedItem("a", None), EmbedItem(None, "/broken.png")]
    data = MmebSet(items, [MmebRow("A", "f", 0, 0, [1]), MmebRow("B", "f", 0, 2, [1])])
    metrics, skipped = score_mmeb(data, np.eye(3, dtype=np.float32), [False, False, True])
    assert metrics == {"subset/A": 1.0, "overall": 1.0, "skipped_rows": 1.0}
    assert skipped[0]["subset"] == "B" and "/broken.png" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="expected 3 vectors"):
        score_mmeb(data, np.eye(2, dtype=np.float32), [False] * 3)
