"""The embedded offline data set: procedurally drawn scenes with an exact scene graph.

Each scene is a square image with one to three non-overlapping shapes, one per cell of a 3x3
grid. All text (captions, questions, answers, yes/no probes) is generated from the scene graph,
so every answer is exactly true. `write_scene_dataset` writes the files in public layouts:

    out_dir/onevision/scenes_caption/train-0000i-of-0000n.parquet   LLaVA-OneVision-Data
    out_dir/eval/retrieval/scenes/test.parquet                      nlphuji flickr_1k layout
    out_dir/eval/pope/scenes/test.parquet                           lmms-eval POPE (3 categories)
    out_dir/eval/mmeb/scenes/<Subset>/test-00000-of-00001.parquet   MMEB-eval (first target positive)
    out_dir/eval/mmeb/scenes/eval_images/*.png                      MMEB images (paths relative here)
    out_dir/eval/generation/scenes/test.parquet                     held-out conversations (OneVision layout)
    out_dir/scene_graphs/{train,eval}.jsonl                         the exact scene graphs

Scene graphs are split between train and eval by a hash of the graph itself, so no held-out
graph is ever drawn for training, whatever the seed or the counts. Pure Python + PIL + pyarrow.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from cafe.config import ScenesConfig
from cafe.prompts import IMAGE_TOKEN

KINDS = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 50, 180),
    "orange": (250, 120, 10),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major over the 3x3 grid
BACKGROUNDS = ((245, 245, 245), (250, 246, 236), (238, 243, 248), (244, 240, 246))
NUMBER_WORDS = ("zero", "one", "two", "three")

SUBSET = "scenes_caption"
HELD_OUT_FRACTION = 8  # one graph in 8 belongs to the evaluation side
MMEB_CANDIDATES = 10
POPE_CATEGORIES = ("random", "popular", "adversarial")
MMEB_I2T, MMEB_VQA = "SceneCaption_i2t", "SceneVQA"  # our own subsets, named apart from MMEB's
SCENE_MMEB_META_TASKS = {MMEB_I2T: "retrieval", MMEB_VQA: "vqa"}
MMEB_INSTRUCTIONS = {
    MMEB_I2T: ("Find a caption describing the given image.", "Represent the given caption."),
    MMEB_VQA: ("Answer the question about the given image.", "Represent the given answer."),
}
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Describe the shapes in the image in detail.",
    "Write a short caption for this image.",
    "What do you see in the image?",
    "Give a description of this scene.",
)

IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
ONEVISION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("image", IMAGE_STRUCT),
        pa.field("conversations", pa.list_(pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())]))),
        pa.field("data_source", pa.string()),
    ]
)
# the generation file adds each row's exact scene graph (JSON), which scene_match scores captions
# against, and each exchange's question type, by which QA exact match is broken down
GENERATION_SCHEMA = ONEVISION_SCHEMA.append(pa.field("scene", pa.string())).append(
    pa.field("question_types", pa.list_(pa.string())))
RETRIEVAL_SCHEMA = pa.schema(
    [
        pa.field("image", IMAGE_STRUCT),
        pa.field("caption", pa.list_(pa.string())),
        pa.field("img_id", pa.string()),
        pa.field("filename", pa.string()),
    ]
)
POPE_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.int64()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("image_source", pa.string()),
        pa.field("image", IMAGE_STRUCT),
        pa.field("category", pa.string()),
    ]
)
MMEB_SCHEMA = pa.schema(
    [
        pa.field("qry_inst", pa.string()),
        pa.field("qry_text", pa.string()),
        pa.field("qry_img_path", pa.string()),
        pa.field("tgt_inst", pa.list_(pa.string())),
        pa.field("tgt_text", pa.list_(pa.string())),
        pa.field("tgt_img_path", pa.list_(pa.string())),
    ]
)


# ---------------------------------------------------------------------------- scene graph


@dataclass(frozen=True, slots=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def noun(self) -> str:
        """'large red circle'"""
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True, slots=True)
class Scene:
    """The exact scene graph. Shapes are kept in grid order, so equal graphs compare equal."""

    shapes: tuple[Shape, ...]

    def key(self) -> str:
        return ";".join(f"{s.position}:{s.size}:{s.colour}:{s.kind}" for s in self.shapes)

    def to_dict(self) -> dict:
        return {"shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(shapes=tuple(Shape(**s) for s in data["shapes"]))


def make_scene(shapes: list[Shape]) -> Scene:
    if len({s.position for s in shapes}) != len(shapes):
        raise ValueError("two shapes share a grid cell")
    return Scene(shapes=tuple(sorted(shapes, key=lambda s: POSITIONS.index(s.position))))


def sample_scene(rng: random.Random) -> Scene:
    cells = rng.sample(POSITIONS, rng.randint(1, 3))
    colours = list(COLOURS)
    return make_scene([Shape(rng.choice(KINDS), rng.choice(colours), rng.choice(SIZES), p) for p in cells])


def is_held_out(scene: Scene) -> bool:
    """Deterministic train/eval split of the graph space (sha256, not Python's salted hash)."""
    return hashlib.sha256(scene.key().encode()).digest()[0] % HELD_OUT_FRACTION == 0


def has_object(scene: Scene, colour: str, kind: str) -> bool:
    """Ground truth of the POPE probe 'Is there a <colour> <kind> in the image?'."""
    return any(s.colour == colour and s.kind == kind for s in scene.shapes)


# ---------------------------------------------------------------------------- drawing


def _regular_points(cx: float, cy: float, radii: list[float]) -> list[tuple[float, float]]:
    """Points at equal angles around (cx, cy), one per radius, the first pointing up."""
    angles = [-math.pi / 2 + 2 * math.pi * i / len(radii) for i in range(len(radii))]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    """Every kind fits in the axis-aligned square of half-side `r` around (cx, cy)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        h = 0.85 * r  # a little inside r, so a square does not look larger than a circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "triangle":
        draw.polygon(_regular_points(cx, cy + 0.15 * r, [1.15 * r] * 3), fill=fill)
    elif kind == "star":
        draw.polygon(_regular_points(cx, cy, [r, 0.42 * r] * 5), fill=fill)
    elif kind == "diamond":
        draw.polygon(_regular_points(cx, cy, [r] * 4), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def render_scene(scene: Scene, *, size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; jitter in placement and size varies pixels, never the graph."""
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for shape in scene.shapes:
        row, col = divmod(POSITIONS.index(shape.position), 3)
        # Half-extent <= 0.42 and shift <= 0.05 of a cell: the shape stays in its cell, none overlap.
        r = cell * (0.38 if shape.size == "large" else 0.19) * rng.uniform(0.95, 1.1)
        cx = (col + 0.5 + rng.uniform(-0.05, 0.05)) * cell
        cy = (row + 0.5 + rng.uniform(-0.05, 0.05)) * cell
        _draw_shape(draw, shape.kind, cx, cy, r, COLOURS[shape.colour])
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless and byte-stable for equal pixels
    return buffer.getvalue()


# ---------------------------------------------------------------------------- captions


def _at(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("s" if n > 1 else "")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# Each template names every shape with all its attributes, so a caption identifies its graph.
CAPTION_TEMPLATES: tuple[Callable[[list[Shape]], str], ...] = (
    lambda ss: _join([f"a {s.noun()} {_at(s.position)}" for s in ss]),
    lambda ss: f"There {'is' if len(ss) == 1 else 'are'} {_count_phrase(len(ss))}: "
    + _join([f"a {s.noun()} {_at(s.position)}" for s in ss]) + ".",
    lambda ss: _cap("; ".join(f"{_at(s.position)} there is a {s.noun()}" for s in ss)) + ".",
    lambda ss: f"A picture of {_count_phrase(len(ss))}. "
    + " ".join(f"The {s.noun()} is {_at(s.position)}." for s in ss),
    lambda ss: _cap(_count_phrase(len(ss))) + " on a plain background: "
    + ", ".join(f"a {s.noun()} ({s.position})" for s in ss) + ".",
    lambda ss: "An image showing " + _join([f"a {s.size} {s.kind} in {s.colour} {_at(s.position)}" for s in ss]) + ".",
)


def caption(scene: Scene, template: int, order: list[int] | None = None) -> str:
    """One paraphrase: a template applied to the shapes in `order` (grid order by default)."""
    shapes = [scene.shapes[i] for i in order] if order is not None else list(scene.shapes)
    return CAPTION_TEMPLATES[template](shapes)


def paraphrases(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """`n` captions from distinct templates, each with its own shape order."""
    templates = rng.sample(range(len(CAPTION_TEMPLATES)), n)
    return [caption(scene, t, rng.sample(range(len(scene.shapes)), len(scene.shapes))) for t in templates]


# a shape as the templates name it: "red circle" (after an optional size) or "circle in red"
_OBJECT = re.compile(rf"\b(?:({'|'.join(COLOURS)})\s+)?({'|'.join(KINDS)})s?\b(?:\s+in\s+({'|'.join(COLOURS)}))?")


def caption_objects(text: str) -> Counter:
    """The (colour, kind) of every shape a caption names; a kind without a colour counts as (None, kind)."""
    return Counter((m[1] or m[3], m[2]) for m in _OBJECT.finditer(text.lower()))


def describes_scene(text: str, graph: dict) -> bool:
    """True when the caption names exactly the scene's shapes with their colours, no more, no fewer."""
    truth = Counter((s["colour"], s["kind"]) for s in graph["shapes"])
    return caption_objects(text) == truth


# ---------------------------------------------------------------------------- questions


@dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str
    choices: tuple[str, ...]  # every answer of this question type: the candidates for MMEB VQA


ALL_OBJECTS = tuple(f"a {s} {c} {k}" for s in SIZES for c in COLOURS for k in KINDS)
COUNT_CHOICES = tuple(str(i) for i in range(10))


def _unique(scene: Scene, match: Callable[[Shape], bool]) -> Shape | None:
    found = [s for s in scene.shapes if match(s)]
    return found[0] if len(found) == 1 else None


def _unique_object(scene: Scene, rng: random.Random) -> Shape | None:
    """A random shape, if no other shape has its colour and kind (else 'the red circle' is ambiguous)."""
    target = rng.choice(scene.shapes)
    return _unique(scene, lambda s: (s.colour, s.kind) == (target.colour, target.kind))


def qa_count(scene: Scene, rng: random.Random) -> QA:
    return QA("How many shapes are there?", str(len(scene.shapes)), COUNT_CHOICES)


def qa_count_kind(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(KINDS)  # absent kinds too: "0" is a true answer
    n = sum(s.kind == kind for s in scene.shapes)
    return QA(f"How many {kind}s are there?", str(n), COUNT_CHOICES)


def qa_colour_at(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(scene.shapes)
    return QA(f"What color is the shape {_at(shape.position)}?", shape.colour, tuple(COLOURS))


def qa_kind_at(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(scene.shapes)
    return QA(f"What shape is {_at(shape.position)}?", shape.kind, KINDS)


def qa_object_at(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(scene.shapes)
    return QA(f"What is {_at(shape.position)}?", f"a {shape.noun()}", ALL_OBJECTS)


def qa_colour_of_kind(scene: Scene, rng: random.Random) -> QA | None:
    kind = rng.choice(scene.shapes).kind
    shape = _unique(scene, lambda s: s.kind == kind)  # ambiguous if the kind appears twice
    if shape is None:
        return None
    return QA(f"What color is the {kind}?", shape.colour, tuple(COLOURS))


def qa_where(scene: Scene, rng: random.Random) -> QA | None:
    shape = _unique_object(scene, rng)
    if shape is None:
        return None
    return QA(f"Where is the {shape.colour} {shape.kind}?", shape.position, POSITIONS)


def qa_size_of(scene: Scene, rng: random.Random) -> QA | None:
    shape = _unique_object(scene, rng)
    if shape is None:
        return None
    return QA(f"Is the {shape.colour} {shape.kind} large or small?", shape.size, SIZES)


def pope_question(colour: str, kind: str) -> str:
    return f"Is there a {colour} {kind} in the image?"


def pope_probe(scene: Scene, rng: random.Random, *, present: bool) -> QA:
    """A yes/no probe; negatives are drawn at random from absent objects (POPE 'random')."""
    if present:
        shape = rng.choice(scene.shapes)
        colour, kind = shape.colour, shape.kind
    else:
        colour, kind = rng.choice([(c, k) for c in COLOURS for k in KINDS if not has_object(scene, c, k)])
    return QA(pope_question(colour, kind), "yes" if present else "no", ("yes", "no"))


QABuilder = Callable[[Scene, random.Random], QA | None]  # None: the question does not apply
QA_BUILDERS: tuple[QABuilder, ...] = (
    qa_count, qa_count_kind, qa_colour_at, qa_kind_at, qa_object_at, qa_colour_of_kind, qa_where, qa_size_of,
    lambda scene, rng: pope_probe(scene, rng, present=True),
    lambda scene, rng: pope_probe(scene, rng, present=False),
)
VQA_BUILDERS: tuple[QABuilder, ...] = (qa_count, qa_count_kind, qa_colour_at, qa_kind_at, qa_object_at, qa_where)


def sample_qa(scene: Scene, rng: random.Random, builders: tuple[QABuilder, ...] = QA_BUILDERS) -> QA:
    """One question of a random applicable type (every scene has at least `qa_count`)."""
    while True:
        qa = rng.choice(builders)(scene, rng)
        if qa is not None:
            return qa


QUESTION_FIRST = ScenesConfig.question_first  # share of conversations that open with a question about the image
# LLaVA's instruction for short-answer questions in its training data (lmms-eval's POPE prompt ends with it too)
SHORT_ANSWER = "Answer the question using a single word or phrase."


def conversation(scene: Scene, rng: random.Random, question_first: float = QUESTION_FIRST) -> list[dict[str, str]]:
    """Describe -> caption and one QA exchange; `question_first` of the conversations open with
    the question. Only the first turn carries the image, so a model learns both to
    caption and to answer a question asked with the image (as POPE asks). (One question, not
    several: the image's tokens are paid once per conversation, and a second question costs a
    2-core step more than it teaches.)"""
    qa = sample_qa(scene, rng)
    exchanges = [(rng.choice(DESCRIBE_PROMPTS), paraphrases(scene, rng, 1)[0]),
                 (f"{qa.question}\n{SHORT_ANSWER}", qa.answer)]
    if rng.random() < question_first:
        exchanges[0], exchanges[1] = exchanges[1], exchanges[0]
    return _turns(exchanges)


# Held-out questions: every type but "What is at ...?", whose four-word answer the generation
# suite would read as a caption (its QA answers have at most `eval.qa_max_words` = 3 words).
EVAL_QA_BUILDERS: tuple[QABuilder, ...] = (qa_count, qa_count_kind, qa_colour_at, qa_kind_at, qa_colour_of_kind,
                                           qa_where, qa_size_of)


def eval_conversation(scene: Scene, rng: random.Random) -> tuple[list[dict[str, str]], list[str]]:
    """The caption, then one question of every type that applies to the scene (4-7): the
    generation suite asks each about the image alone, so QA exact match rests on 1,350 answers
    for the default 200 scenes rather than about 200 (one answer: 0.07 points, not 0.5).
    Also each exchange's type ("caption", then the builder's name: "count", "where", ...), by
    which the suite breaks QA exact match down: one skill at chance hides in the mean."""
    exchanges, types = [(rng.choice(DESCRIBE_PROMPTS), paraphrases(scene, rng, 1)[0])], ["caption"]
    for build in EVAL_QA_BUILDERS:
        if (qa := build(scene, rng)) is not None:
            exchanges.append((f"{qa.question}\n{SHORT_ANSWER}", qa.answer))
            types.append(build.__name__.removeprefix("qa_"))
    return _turns(exchanges), types


def _turns(exchanges: list[tuple[str, str]]) -> list[dict[str, str]]:
    """OneVision turns; only the first carries the image."""
    turns = []
    for i, (question, answer) in enumerate(exchanges):
        turns += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question},
                  {"from": "gpt", "value": answer}]
    return turns


# ---------------------------------------------------------------------------- sampling the splits


@dataclass(frozen=True, slots=True)
class DrawnScene:
    id: str
    scene: Scene
    png: bytes

    @property
    def filename(self) -> str:
        return f"{self.id}.png"


def _split_rng(seed: int, stream: str) -> random.Random:
    # String seeds go through sha512 in `random`, so streams are stable across processes.
    return random.Random(f"cafe-scenes:{seed}:{stream}")


def draw_train_scenes(
    n: int, *, image_size: int, seed: int, question_first: float = QUESTION_FIRST
) -> Iterator[tuple[DrawnScene, list[dict[str, str]]]]:
    """Training scenes (never a held-out graph) with their conversations, in a fixed order."""
    rng = _split_rng(seed, "train")
    for i in range(n):
        scene = sample_scene(rng)
        while is_held_out(scene):
            scene = sample_scene(rng)
        drawn = DrawnScene(f"scenes_train_{i:06d}", scene, encode_png(render_scene(scene, size=image_size, rng=rng)))
        yield drawn, conversation(scene, rng, question_first)


def draw_eval_scenes(n: int, *, image_size: int, seed: int, max_tries: int = 1000) -> list[DrawnScene]:
    """Held-out scenes with pairwise distinct graphs, so each caption names exactly one image."""
    rng = _split_rng(seed, "eval")
    seen: set[Scene] = set()
    drawn: list[DrawnScene] = []
    for i in range(n):
        for _ in range(max_tries):
            scene = sample_scene(rng)
            if is_held_out(scene) and scene not in seen:
                break
        else:
            raise RuntimeError(f"no new held-out scene after {max_tries} draws")
        seen.add(scene)
        png = encode_png(render_scene(scene, size=image_size, rng=rng))
        drawn.append(DrawnScene(f"scenes_eval_{i:05d}", scene, png))
    return drawn


# ---------------------------------------------------------------------------- writers


def _write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_onevision(
    out_dir: Path, n: int, *, image_size: int, seed: int, shard_rows: int, question_first: float = QUESTION_FIRST
) -> tuple[list[Path], list[tuple[str, Scene]]]:
    """Training rows in the LLaVA-OneVision-Data layout, sharded; returns shards and graphs."""
    subset_dir = out_dir / "onevision" / SUBSET
    num_shards = max(1, math.ceil(n / shard_rows))
    scenes = draw_train_scenes(n, image_size=image_size, seed=seed, question_first=question_first)
    paths: list[Path] = []
    graphs: list[tuple[str, Scene]] = []
    for k in range(num_shards):  # one shard in memory at a time
        rows = []
        for drawn, turns in itertools.islice(scenes, shard_rows):
            graphs.append((drawn.id, drawn.scene))
            rows.append(
                {
                    "id": drawn.id,
                    "image": {"bytes": drawn.png, "path": drawn.filename},
                    "conversations": turns,
                    "data_source": SUBSET,
                }
            )
        paths.append(subset_dir / f"train-{k:05d}-of-{num_shards:05d}.parquet")
        _write_parquet(rows, ONEVISION_SCHEMA, paths[-1])
    return paths, graphs


def write_retrieval(eval_dir: Path, scenes: list[DrawnScene], seed: int) -> Path:
    rng = _split_rng(seed, "retrieval")
    rows = [
        {
            "image": {"bytes": d.png, "path": d.filename},
            "caption": paraphrases(d.scene, rng, 5),
            "img_id": d.id,
            "filename": d.filename,
        }
        for d in scenes
    ]
    path = eval_dir / "retrieval" / "scenes" / "test.parquet"
    _write_parquet(rows, RETRIEVAL_SCHEMA, path)
    return path


def write_generation(eval_dir: Path, scenes: list[DrawnScene], seed: int) -> Path:
    """Held-out conversations (caption, then QA turns) in the OneVision layout, plus each scene's
    graph and each exchange's question type: the generation suite's caption loss, QA exact
    match (overall and by type) and scene match."""
    rng = _split_rng(seed, "generation")
    rows = []
    for d in scenes:
        turns, types = eval_conversation(d.scene, rng)
        rows.append({"id": d.id, "image": {"bytes": d.png, "path": d.filename}, "conversations": turns,
                     "data_source": SUBSET, "scene": json.dumps(d.scene.to_dict()), "question_types": types})
    path = eval_dir / "generation" / "scenes" / "test.parquet"
    _write_parquet(rows, GENERATION_SCHEMA, path)
    return path


def _write_images(folder: Path, scenes: list[DrawnScene]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for d in scenes:
        (folder / d.filename).write_bytes(d.png)


Probe = tuple[str, str]  # (colour, kind)


def pope_negatives(category: str, scene: Scene, k: int, rng: random.Random, popular: list[Probe]) -> list[Probe]:
    """`k` absent objects, sampled in one of POPE's three ways.

    random: uniformly; popular: the most frequent objects of the eval scenes (`popular` is that
    ranking); adversarial: objects sharing the colour or the kind of a present shape, those
    sharing with more shapes first (the most confusable), random among equals."""
    absent = [(c, kind) for c in COLOURS for kind in KINDS if not has_object(scene, c, kind)]
    if category == "random":
        return rng.sample(absent, k)
    if category == "popular":
        return [p for p in popular if p in absent][:k]
    if category == "adversarial":
        shared = {p: sum((s.colour == p[0]) + (s.kind == p[1]) for s in scene.shapes) for p in absent}
        near = [p for p in absent if shared[p]]  # >= 7 for up to 3 shapes, so never short of k
        rng.shuffle(near)
        return sorted(near, key=shared.__getitem__, reverse=True)[:k]  # stable: the shuffle breaks ties
    raise ValueError(f"unknown POPE category {category!r}")


def _popularity(scenes: list[DrawnScene]) -> list[Probe]:
    """Every (colour, kind), most frequent over the scenes first; ties in a fixed order."""
    counts = {(c, k): sum(has_object(d.scene, c, k) for d in scenes) for c in COLOURS for k in KINDS}
    return sorted(counts, key=lambda p: -counts[p])


def pope_records(scenes: list[DrawnScene], seed: int) -> list[dict]:
    """Per image and category: one 'yes' per distinct present object and as many 'no' probes."""
    rng = _split_rng(seed, "pope")
    popular = _popularity(scenes)
    records: list[dict] = []
    for category in POPE_CATEGORIES:
        for d in scenes:
            present = sorted({(s.colour, s.kind) for s in d.scene.shapes})
            absent = pope_negatives(category, d.scene, len(present), rng, popular)
            probes = [(p, "yes") for p in present] + [(a, "no") for a in absent]
            rng.shuffle(probes)
            for (colour, kind), label in probes:
                records.append(
                    {
                        "question_id": len(records) + 1,
                        "question": pope_question(colour, kind),
                        "answer": label,
                        "image_source": d.id,
                        "image": {"bytes": d.png, "path": d.filename},
                        "category": category,
                    }
                )
    return records


def write_pope(eval_dir: Path, scenes: list[DrawnScene], seed: int) -> tuple[Path, int]:
    records = pope_records(scenes, seed)
    path = eval_dir / "pope" / "scenes" / "test.parquet"
    _write_parquet(records, POPE_SCHEMA, path)
    return path, len(records)


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute of one shape changed: a hard negative graph."""
    shapes = list(scene.shapes)
    i = rng.randrange(len(shapes))
    s = shapes[i]
    field = rng.choice(("kind", "colour", "size", "position"))
    if field == "kind":
        shapes[i] = Shape(rng.choice([k for k in KINDS if k != s.kind]), s.colour, s.size, s.position)
    elif field == "colour":
        shapes[i] = Shape(s.kind, rng.choice([c for c in COLOURS if c != s.colour]), s.size, s.position)
    elif field == "size":
        shapes[i] = Shape(s.kind, s.colour, "small" if s.size == "large" else "large", s.position)
    else:
        free = [p for p in POSITIONS if p not in {t.position for t in shapes}]
        shapes[i] = Shape(s.kind, s.colour, s.size, rng.choice(free))
    return make_scene(shapes)


def _i2t_distractors(query: Scene, others: list[Scene], rng: random.Random, k: int) -> list[Scene]:
    """Half hard negatives (one attribute changed), the rest other held-out scenes; all distinct."""
    chosen: list[Scene] = []
    for _ in range(20 * k):
        if len(chosen) == k:
            break
        candidate = _perturb(query, rng) if len(chosen) < k // 2 else rng.choice(others)
        if candidate != query and candidate not in chosen:
            chosen.append(candidate)
    rng.shuffle(chosen)
    return chosen


def mmeb_rows(subset: str, scenes: list[DrawnScene], seed: int) -> list[dict]:
    """One query per image; the first target is the positive, then up to 9 negatives."""
    rng = _split_rng(seed, f"mmeb-{subset}")
    qry_inst, tgt_inst = MMEB_INSTRUCTIONS[subset]
    all_scenes = [d.scene for d in scenes]
    rows = []
    for d in scenes:
        if subset == MMEB_I2T:
            template = rng.randrange(len(CAPTION_TEMPLATES))  # one template for all candidates
            negatives = _i2t_distractors(d.scene, all_scenes, rng, MMEB_CANDIDATES - 1)
            qry_text = ""
            targets = [caption(s, template) for s in [d.scene, *negatives]]
        else:
            qa = sample_qa(d.scene, rng, VQA_BUILDERS)
            wrong = [c for c in qa.choices if c != qa.answer]
            qry_text = qa.question
            targets = [qa.answer, *rng.sample(wrong, min(len(wrong), MMEB_CANDIDATES - 1))]
        rows.append(
            {
                "qry_inst": qry_inst,
                "qry_text": qry_text,
                "qry_img_path": d.filename,
                "tgt_inst": [tgt_inst] * len(targets),
                "tgt_text": targets,
                "tgt_img_path": [""] * len(targets),
            }
        )
    return rows


def write_mmeb(eval_dir: Path, scenes: list[DrawnScene], seed: int) -> Path:
    """One folder per subset, images in `eval_images/` as MMEB-eval ships them; returns the root."""
    root = eval_dir / "mmeb" / "scenes"
    _write_images(root / "eval_images", scenes)
    for subset in SCENE_MMEB_META_TASKS:
        _write_parquet(mmeb_rows(subset, scenes, seed), MMEB_SCHEMA, root / subset / "test-00000-of-00001.parquet")
    return root


def _write_scene_graphs(path: Path, items: list[tuple[str, Scene]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, **s.to_dict()}) + "\n" for i, s in items))


def write_scene_dataset(
    out_dir: str | Path,
    *,
    train_images: int,
    eval_images: int,
    image_size: int = 128,
    seed: int = 0,
    shard_rows: int = 500,
    question_first: float = QUESTION_FIRST,
) -> dict:
    """Write the training shards, the held-out evaluation files and the scene graphs.

    Returns JSON-ready paths and counts. Same arguments => byte-identical files.
    """
    out_dir = Path(out_dir)
    train_shards, train_graphs = write_onevision(
        out_dir, train_images, image_size=image_size, seed=seed, shard_rows=shard_rows, question_first=question_first
    )
    eval_scenes = draw_eval_scenes(eval_images, image_size=image_size, seed=seed)
    eval_dir = out_dir / "eval"
    retrieval = write_retrieval(eval_dir, eval_scenes, seed)
    pope, pope_questions = write_pope(eval_dir, eval_scenes, seed)
    mmeb = write_mmeb(eval_dir, eval_scenes, seed)
    generation = write_generation(eval_dir, eval_scenes, seed)
    graphs_dir = out_dir / "scene_graphs"
    _write_scene_graphs(graphs_dir / "train.jsonl", train_graphs)
    _write_scene_graphs(graphs_dir / "eval.jsonl", [(d.id, d.scene) for d in eval_scenes])
    return {
        "onevision_dir": str(out_dir / "onevision"),
        "train_shards": [str(p) for p in train_shards],
        "train_rows": train_images,
        "eval_dir": str(eval_dir),
        "eval_images": eval_images,
        "retrieval": str(retrieval),
        "pope": str(pope),
        "pope_questions": pope_questions,
        "mmeb": str(mmeb),
        "mmeb_meta_tasks": dict(SCENE_MMEB_META_TASKS),
        "mmeb_images": str(mmeb / "eval_images"),
        "generation": str(generation),
        "scene_graphs": {"train": str(graphs_dir / "train.jsonl"), "eval": str(graphs_dir / "eval.jsonl")},
    }


def scene_corpus(*, num_scenes: int = 300, seed: int = 0) -> Iterator[str]:
    """Every kind of text the data set uses, for training a tokenizer.

    Fixed strings first, then one single-shape scene per (kind, colour, size) so every word
    appears, then random scenes for the multi-shape phrasings; each with every caption template
    and one question of every type.
    """
    yield from DESCRIBE_PROMPTS
    yield SHORT_ANSWER
    for qry_inst, tgt_inst in MMEB_INSTRUCTIONS.values():
        yield qry_inst
        yield tgt_inst
    yield from POSITIONS
    yield from COUNT_CHOICES  # answer candidates that no generated scene makes true
    yield from ALL_OBJECTS
    rng = _split_rng(seed, "corpus")
    singles = [
        make_scene([Shape(kind, colour, size, POSITIONS[i % len(POSITIONS)])])
        for i, (kind, colour, size) in enumerate((k, c, s) for k in KINDS for c in COLOURS for s in SIZES)
    ]
    for scene in singles + [sample_scene(rng) for _ in range(num_scenes)]:
        for template in range(len(CAPTION_TEMPLATES)):
            yield caption(scene, template)
        for build in QA_BUILDERS:
            if (qa := build(scene, rng)) is not None:
                yield qa.question
                yield qa.answer
