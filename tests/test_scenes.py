"""The embedded scene data set: determinism, public layouts, and answers that are true."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.mmeb import list_subsets, load_mmeb
from evaluation.pope import load_pope
from pipelines.scenes import (
    CAPTION_TEMPLATES,
    COLOURS,
    DESCRIBE_PROMPTS,
    KINDS,
    MMEB_INSTRUCTIONS,
    POSITIONS,
    SHORT_ANSWER,
    Scene,
    Shape,
    caption,
    describes_scene,
    draw_train_scenes,
    is_held_out,
    make_scene,
    render_scene,
    sample_scene,
    scene_corpus,
    write_scene_dataset,
)

TRAIN, EVAL, SIZE, SHARD = 20, 10, 96, 8
IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes")
    return out, _write(out, seed=0)


def _write(out: Path, seed: int) -> dict:
    return write_scene_dataset(out, train_images=TRAIN, eval_images=EVAL, image_size=SIZE, seed=seed, shard_rows=SHARD)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _graphs(out: Path, split: str) -> dict[str, Scene]:
    lines = (out / "scene_graphs" / f"{split}.jsonl").read_text().splitlines()
    return {row["id"]: Scene.from_dict(row) for row in map(json.loads, lines)}


def _rows(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _all_captions(scene: Scene) -> set[str]:
    orders = itertools.permutations(range(len(scene.shapes)))
    return {caption(scene, t, list(o)) for o in orders for t in range(len(CAPTION_TEMPLATES))}


# An oracle written independently of the generator: it re-derives every answer from the graph.
_AT = {"on the left": "left", "on the right": "right", "in the center": "center"}
_AT |= {f"at the {p}": p for p in POSITIONS if p not in _AT.values()}


def _only(shapes: list[Shape]) -> Shape:
    assert len(shapes) == 1, f"ambiguous question: {shapes}"
    return shapes[0]


def oracle(scene: Scene, question: str) -> str:
    shapes = list(scene.shapes)
    at = {s.position: s for s in shapes}

    def objects(c: str, k: str) -> list[Shape]:
        return [s for s in shapes if (s.colour, s.kind) == (c, k)]

    rules = [
        (r"How many shapes are there\?", lambda: str(len(shapes))),
        (r"How many (\w+)s are there\?", lambda k: str(sum(s.kind == k for s in shapes))),
        (r"What color is the shape (.+)\?", lambda p: at[_AT[p]].colour),
        (r"What shape is (.+)\?", lambda p: at[_AT[p]].kind),
        (r"What is (.+)\?", lambda p: f"a {at[_AT[p]].size} {at[_AT[p]].colour} {at[_AT[p]].kind}"),
        (r"What color is the (\w+)\?", lambda k: _only([s for s in shapes if s.kind == k]).colour),
        (r"Where is the (\w+) (\w+)\?", lambda c, k: _only(objects(c, k)).position),
        (r"Is the (\w+) (\w+) large or small\?", lambda c, k: _only(objects(c, k)).size),
        (r"Is there a (\w+) (\w+) in the image\?", lambda c, k: "yes" if objects(c, k) else "no"),
    ]
    for pattern, answer in rules:
        if match := re.fullmatch(pattern, question):
            return answer(*match.groups())
    raise AssertionError(f"question the oracle does not know: {question!r}")


def test_captions_name_every_shape():
    scene = make_scene(
        [Shape("square", "blue", "small", "center"), Shape("circle", "red", "large", "top left")]
    )
    assert caption(scene, 0) == "a large red circle at the top left and a small blue square in the center"
    assert caption(scene, 1, [1, 0]) == (
        "There are two shapes: a small blue square in the center and a large red circle at the top left."
    )
    assert len(CAPTION_TEMPLATES) >= 5
    assert len({caption(scene, t) for t in range(len(CAPTION_TEMPLATES))}) == len(CAPTION_TEMPLATES)
    with pytest.raises(ValueError):
        make_scene([Shape("star", "red", "large", "top"), Shape("circle", "blue", "small", "top")])


def test_scene_match_reads_every_caption_template():
    rng = random.Random(3)
    for _ in range(300):
        scene = sample_scene(rng)
        graph = scene.to_dict()
        for template in range(len(CAPTION_TEMPLATES)):
            assert describes_scene(caption(scene, template), graph), caption(scene, template)
    scene = make_scene([Shape("square", "blue", "small", "center"), Shape("circle", "red", "large", "top left")])
    graph = scene.to_dict()
    assert not describes_scene("a large red circle at the top left", graph)  # a shape missing
    assert not describes_scene("a large red circle and a small green square", graph)  # a wrong colour
    assert not describes_scene("a red circle, a blue square and a blue star", graph)  # one too many
    assert not describes_scene("a large circle at the top left and a small blue square", graph)  # colour unnamed
    assert describes_scene("A small square in blue and a big red circle.", graph)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_stay_inside_their_cell(kind):
    """Shapes never overlap: every drawn pixel lies in the shape's own grid cell."""
    size, rng = 96, random.Random(0)
    for index, position in [*enumerate(POSITIONS)] * 5:  # several draws of the random jitter
        image = render_scene(make_scene([Shape(kind, "red", "large", position)]), size=size, rng=rng)
        left, top, right, bottom = Image.eval(image.convert("L"), lambda v: 255 if v < 200 else 0).getbbox()
        row, col = divmod(index, 3)
        assert col * size / 3 <= left and right <= (col + 1) * size / 3
        assert row * size / 3 <= top and bottom <= (row + 1) * size / 3
        assert (right - left) > size / 6  # large shapes are large


def test_same_seed_gives_identical_files_across_processes(dataset, tmp_path):
    out, _ = dataset
    script = (
        "import sys; from pipelines.scenes import write_scene_dataset; "
        f"write_scene_dataset(sys.argv[1], train_images={TRAIN}, eval_images={EVAL}, "
        f"image_size={SIZE}, seed=0, shard_rows={SHARD})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a differently salted hash must not matter
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "again")], check=True, cwd=REPO, env=env)
    assert _files(tmp_path / "again") == _files(out)


def test_different_seed_gives_different_data(dataset, tmp_path):
    out, result = dataset
    other = _write(tmp_path, seed=1)
    assert Path(other["train_shards"][0]).read_bytes() != Path(result["train_shards"][0]).read_bytes()
    assert _graphs(tmp_path, "eval") != _graphs(out, "eval")


def test_onevision_layout_and_conversations(dataset):
    out, result = dataset
    shards = sorted((out / "onevision" / "scenes_caption").glob("*.parquet"))
    assert [str(p) for p in shards] == result["train_shards"] and len(shards) == 3
    expected = pa.schema(
        [
            ("id", pa.string()),
            ("image", IMAGE),
            ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
            ("data_source", pa.string()),
        ]
    )
    rows = []
    for shard in shards:
        table = pq.read_table(shard)
        assert table.schema.remove_metadata().equals(expected)
        assert table.num_rows <= SHARD
        rows += table.to_pylist()
    assert len(rows) == result["train_rows"] == TRAIN
    assert len({r["id"] for r in rows}) == TRAIN
    graphs = _graphs(out, "train")
    question_first = 0
    for row in rows:
        assert row["data_source"] == "scenes_caption"
        assert _decode(row["image"]["bytes"]).size == (SIZE, SIZE)
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert len(turns) // 2 == 2  # describe + one question
        assert turns[0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in turns[1:])
        scene = graphs[row["id"]]
        describe = [i for i, t in enumerate(turns) if t["value"].removeprefix("<image>\n") in DESCRIBE_PROMPTS]
        assert len(describe) == 1 and describe[0] in (0, 2)  # the caption first, or right after one question
        question_first += describe[0] == 2
        assert turns[describe[0] + 1]["value"] in _all_captions(scene)
        for question, answer in zip(turns[0::2], turns[1::2]):
            if question is not turns[describe[0]]:
                text = question["value"].removeprefix("<image>\n")
                assert text.endswith(f"\n{SHORT_ANSWER}")
                assert answer["value"] == oracle(scene, text.removesuffix(f"\n{SHORT_ANSWER}"))
    assert 0 < question_first < len(rows)  # about half open with a question


def test_question_first_only_reorders_the_exchanges():
    """`question_first` moves the question before the caption and changes nothing else."""
    def draw(question_first: float):
        return list(draw_train_scenes(30, image_size=32, seed=3, question_first=question_first))

    never, always = draw(0.0), draw(1.0)
    for (scene_a, turns_a), (scene_b, turns_b) in zip(never, always, strict=True):
        assert scene_a == scene_b
        assert turns_a[0]["value"].removeprefix("<image>\n") in DESCRIBE_PROMPTS
        assert turns_b[2]["value"] in DESCRIBE_PROMPTS
        exchanges_a = {(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns_a[0::2], turns_a[1::2])}
        exchanges_b = {(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns_b[0::2], turns_b[1::2])}
        assert exchanges_a == exchanges_b


def test_held_out_conversations_caption_first_then_every_question_type(dataset):
    out, result = dataset
    graphs = _graphs(out, "eval")
    rows = _rows(result["generation"])
    assert len(rows) == EVAL
    for row in rows:
        scene, turns = graphs[row["id"]], row["conversations"]
        assert turns[0]["value"].removeprefix("<image>\n") in DESCRIBE_PROMPTS
        assert turns[1]["value"] in _all_captions(scene) and len(turns[1]["value"].split()) > 3
        questions = [q["value"].removesuffix(f"\n{SHORT_ANSWER}") for q in turns[2::2]]
        assert 4 <= len(questions) == len(set(questions)) <= 7
        assert "How many shapes are there?" in questions and not any(q.startswith("What is") for q in questions)
        for question, answer in zip(questions, turns[3::2]):
            assert answer["value"] == oracle(scene, question)
            assert len(answer["value"].split()) <= 3  # read as QA answers by the generation suite
        assert row["question_types"] == ["caption"] + [question_type(q) for q in questions]


def question_type(question: str) -> str:
    types = {r"How many shapes are there\?": "count", r"How many \w+s are there\?": "count_kind",
             r"What color is the shape .+\?": "colour_at", r"What shape is .+\?": "kind_at",
             r"What color is the \w+\?": "colour_of_kind", r"Where is the \w+ \w+\?": "where",
             r"Is the \w+ \w+ large or small\?": "size_of"}
    # the first that fits: "How many shapes are there?" fits count_kind's pattern too
    return next(t for pattern, t in types.items() if re.fullmatch(pattern, question))


def test_eval_scenes_are_distinct_and_held_out(dataset):
    out, _ = dataset
    train, held = _graphs(out, "train"), _graphs(out, "eval")
    assert len(held) == EVAL and len(set(held.values())) == EVAL
    assert not set(held.values()) & set(train.values())
    assert all(map(is_held_out, held.values())) and not any(map(is_held_out, train.values()))
    train_images = {r["image"]["bytes"] for p in (out / "onevision").rglob("*.parquet") for r in _rows(p)}
    eval_images = {p.read_bytes() for p in (out / "eval" / "mmeb" / "scenes" / "eval_images").glob("*.png")}
    assert len(eval_images) == EVAL and not eval_images & train_images


def test_retrieval_captions_identify_their_image(dataset):
    out, result = dataset
    table = pq.read_table(result["retrieval"])
    expected = pa.schema(
        [("image", IMAGE), ("caption", pa.list_(pa.string())), ("img_id", pa.string()), ("filename", pa.string())]
    )
    assert table.schema.remove_metadata().equals(expected)
    graphs = _graphs(out, "eval")
    owners: dict[str, set[str]] = {}
    for img_id, scene in graphs.items():
        for text in _all_captions(scene):
            owners.setdefault(text, set()).add(img_id)
    rows = table.to_pylist()
    assert len(rows) == EVAL
    for row in rows:
        assert row["filename"] == f"{row['img_id']}.png"
        assert _decode(row["image"]["bytes"]).size == (SIZE, SIZE)
        assert len(row["caption"]) == len(set(row["caption"])) == 5
        for text in row["caption"]:
            assert owners[text] == {row["img_id"]}


def _objects(scene: Scene) -> set[tuple[str, str]]:
    return {(s.colour, s.kind) for s in scene.shapes}


def _probe(question: str) -> tuple[str, str]:
    colour, kind = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question).groups()
    return colour, kind


def test_pope_labels_follow_the_scene_graph(dataset):
    out, result = dataset
    assert result["pope"] == str(out / "eval" / "pope" / "scenes" / "test.parquet")
    expected = pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("image_source", pa.string()),
            ("image", IMAGE),
            ("category", pa.string()),
        ]
    )
    assert pq.read_schema(result["pope"]).remove_metadata().equals(expected)
    sources = [r["image_source"] for r in _rows(result["pope"])]
    items, skipped = load_pope(result["pope"])
    assert len(items) == result["pope_questions"] and skipped == []
    assert len({i.question_id for i in items}) == len(items) and all(type(i.question_id) is int for i in items)
    graphs = _graphs(out, "eval")
    assert set(sources) == set(graphs)
    probes: dict[tuple[str, str], list[tuple[tuple[str, str], str]]] = {}
    for item, source in zip(items, sources):
        assert item.label == oracle(graphs[source], item.question)
        assert item.image_path is None and _decode(item.image).size == (SIZE, SIZE)
        probes.setdefault((source, item.category), []).append((_probe(item.question), item.label))
    assert {category for _, category in probes} == {"random", "popular", "adversarial"}
    assert len(probes) == 3 * EVAL  # every image in every category
    frequency = {(c, k): sum((c, k) in _objects(g) for g in graphs.values()) for c in COLOURS for k in KINDS}
    for (source, category), asked in probes.items():
        present = _objects(graphs[source])
        yes = [p for p, label in asked if label == "yes"]
        no = [p for p, label in asked if label == "no"]
        assert sorted(yes) == sorted(present) and len(no) == len(set(no)) == len(present)
        if category == "popular":  # no absent object is more frequent than the ones asked about
            unasked = set(frequency) - present - set(no)
            assert min(frequency[p] for p in no) >= max(frequency[p] for p in unasked)
        if category == "adversarial":  # each shares its colour or its kind with a present object
            assert all(any(c == pc or k == pk for pc, pk in present) for c, k in no)


def test_mmeb_first_target_is_the_positive(dataset):
    out, result = dataset
    expected = pa.schema(
        [
            ("qry_inst", pa.string()),
            ("qry_text", pa.string()),
            ("qry_img_path", pa.string()),
            ("tgt_inst", pa.list_(pa.string())),
            ("tgt_text", pa.list_(pa.string())),
            ("tgt_img_path", pa.list_(pa.string())),
        ]
    )
    root = out / "eval" / "mmeb" / "scenes"
    assert result["mmeb"] == str(root) and result["mmeb_images"] == str(root / "eval_images")
    assert result["mmeb_meta_tasks"] == {"SceneCaption_i2t": "retrieval", "SceneVQA": "vqa"}
    assert list_subsets(root) == sorted(result["mmeb_meta_tasks"])
    graphs = {f"{i}.png": s for i, s in _graphs(out, "eval").items()}
    for subset in result["mmeb_meta_tasks"]:
        path = root / subset / "test-00000-of-00001.parquet"
        table = pq.read_table(path)
        assert table.schema.remove_metadata().equals(expected)
        rows = table.to_pylist()
        assert len(rows) == EVAL
        for row in rows:
            scene = graphs[row["qry_img_path"]]
            assert _decode((root / "eval_images" / row["qry_img_path"]).read_bytes()).size == (SIZE, SIZE)
            targets = row["tgt_text"]
            assert 5 <= len(targets) <= 10 and len(set(targets)) == len(targets)
            assert len(row["tgt_inst"]) == len(row["tgt_img_path"]) == len(targets)
            if subset == "SceneCaption_i2t":
                own = _all_captions(scene)
                assert targets[0] in own and not own & set(targets[1:])
            else:
                assert targets[0] == oracle(scene, row["qry_text"])


def test_mmeb_loads_with_the_evaluator(dataset):
    _, result = dataset
    data = load_mmeb(result["mmeb"], result["mmeb_images"])
    assert not data.skipped and len(data.rows) == 2 * EVAL
    assert len(set(data.items)) == len(data.items)
    for row in data.rows:
        qry_inst, tgt_inst = MMEB_INSTRUCTIONS[row.subset]
        query = data.items[row.query]
        assert query.text.startswith(qry_inst) and Path(query.image_path).parent == Path(result["mmeb_images"])
        assert all(data.items[c].text.startswith(f"{tgt_inst} ") for c in row.candidates)
        assert all(data.items[c].image_path is None for c in row.candidates)


def test_corpus_covers_every_word_of_the_data(dataset):
    out, result = dataset
    corpus = list(scene_corpus(num_scenes=50))
    assert corpus == list(scene_corpus(num_scenes=50))
    vocabulary = {w for text in corpus for w in re.findall(r"\w+", text)}
    turns = [t for p in result["train_shards"] for r in _rows(p) for t in r["conversations"]]
    texts = [t["value"].removeprefix("<image>\n") for t in turns]
    texts += [c for r in _rows(result["retrieval"]) for c in r["caption"]]
    for path in Path(result["mmeb"]).glob("*/test-*.parquet"):
        for r in _rows(path):
            texts += [r["qry_inst"], r["qry_text"], *r["tgt_inst"], *r["tgt_text"]]
    texts += [item.question for item in load_pope(result["pope"])[0]]
    assert {w for text in texts for w in re.findall(r"\w+", text)} <= vocabulary
    assert set(COLOURS) | set(KINDS) <= vocabulary
