"""The contrastive pair-text policies (`pipelines.pairs`): the caption rule on realistic
OneVision conversations, each policy, the never-a-one-word-answer rule, the config errors, the
ingest summary's counts, and the scenes' training Parquet."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cafe.config import ConfigError, IngestConfig, load_config
from pipelines.ingest import run_pipeline
from pipelines.onevision import write_onevision_shard
from pipelines.pairs import MIN_PAIR_WORDS, Pair, asks_for_caption, choose_pair
from pipelines.records import normalise_conversation
from pipelines.scenes import DESCRIBE_PROMPTS, conversation, describes_scene, sample_scene, write_scene_dataset
from tests.test_pipeline import REPO, fv, jpeg, ov_row, read_dir

CAPTION = "A red square sits on the left of a white table."
SHORT = "Answer the question using a single word or phrase."

# LLaVA's detailed- and brief-description instructions (LLaVA paper, appendix) and a few more
# caption requests of the kind found in OneVision's caption subsets
CAPTION_REQUESTS = [
    "Describe the following image in detail", "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see", "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image", "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner", "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative", "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation", "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "What do you see happening in this image?", "What is this photo about?", "What's going on in the scene?",
    "What are the key elements in this picture?", "Can you describe the main features of this image for me?",
    "How would you describe the image to someone who cannot see it?", "Write a short caption for this image.",
    "What is shown?",
]
NOT_CAPTION_REQUESTS = [
    f"What is in the center?\n{SHORT}", "What is in the center?", "What is at the top left?",
    "Is there a red circle in the image?", "How many shapes are there?", "What color is the shape on the left?",
    "Explain why the man in the image is smiling.", "What is written on the sign?",
    "Which option describes the image best?\nA. a cat\nB. a dog\nAnswer with the option's letter from the given "
    "choices directly.", "Describe the colour of the car in one word.", "Hello?",
]


def turns(*exchanges: tuple[str, str], system: str | None = None) -> list[dict[str, str]]:
    """Normalised OneVision turns (the image on the first user turn)."""
    raw = [("system", system)] if system else []
    for i, (question, answer) in enumerate(exchanges):
        raw += [("human", f"<image>\n{question}" if i == 0 else question), ("gpt", answer)]
    return normalise_conversation(fv(*raw))


@pytest.mark.parametrize("instruction", CAPTION_REQUESTS + list(DESCRIBE_PROMPTS))
def test_caption_requests_are_recognised(instruction):
    assert asks_for_caption(f"<image>\n{instruction}")


@pytest.mark.parametrize("instruction", NOT_CAPTION_REQUESTS)
def test_questions_and_short_answer_requests_are_not_caption_requests(instruction):
    assert not asks_for_caption(f"<image>\n{instruction}")


def test_scene_conversations_ask_for_their_caption_once():
    """Every question the scenes ask besides the describe prompt is a short-answer one."""
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        asked = [asks_for_caption(t["value"]) for t in conversation(scene, rng) if t["from"] == "human"]
        assert sorted(asked) == [False, True]


@pytest.mark.parametrize(
    "dialogue, expected",
    [
        # question first, caption second: the caption, not the one-word answer
        (turns((f"How many shapes are there?\n{SHORT}", "2"), ("Describe the image.", CAPTION)),
         Pair(CAPTION, "paired")),
        # caption first
        (turns(("Describe the image.", CAPTION), (f"Is it red?\n{SHORT}", "yes")), Pair(CAPTION, "paired")),
        # a VQA conversation: no turn asks for a caption
        (turns((f"What colour is it?\n{SHORT}", "red"), ("Why is it there?", "Someone put it on the table.")),
         Pair("", "no_caption_turn")),
        # multi-turn, with a system turn: the first caption reply too short, a later one long enough
        (turns(("Caption it in two words.", "Red square."), ("What is shown?", CAPTION), system="Be brief."),
         Pair(CAPTION, "paired")),
        # the only caption reply is too short: never a one-word answer
        (turns(("Write a caption.", "A red square."), ("What is it made of?", "It is made of painted wood.")),
         Pair("", "too_short")),
    ],
    ids=["question-first", "caption-first", "no-caption-turn", "multi-turn", "caption-too-short"],
)
def test_caption_policy_on_onevision_conversations(dialogue, expected):
    assert choose_pair(dialogue, {}, policy="caption") == expected


@pytest.mark.parametrize(
    "policy, row, expected",
    [
        ("first_assistant", {}, Pair("", "too_short")),  # "2"
        ("longest_assistant", {}, Pair(CAPTION, "paired")),
        ("column:caption", {"caption": f"  {CAPTION} "}, Pair(CAPTION, "paired")),
        ("column:caption", {"caption": "a red square"}, Pair("", "too_short")),
        ("column:caption", {}, Pair("", "no_column_text")),
        ("column:caption", {"caption": ["a list", "of captions"]}, Pair("", "no_column_text")),
        ("column:caption", {"caption": "   "}, Pair("", "no_column_text")),
        ("none", {"caption": CAPTION}, Pair("", "policy_none")),
    ],
)
def test_each_policy(policy, row, expected):
    dialogue = turns((f"How many shapes are there?\n{SHORT}", "2"), ("Describe the image.", CAPTION),
                     ("Anything else?", "No."))
    assert choose_pair(dialogue, row, policy=policy) == expected


def test_first_assistant_is_the_reference_pairing_when_long_enough():
    dialogue = turns(("What is on the table?", "A red square on a white table."), ("Describe it.", CAPTION))
    assert choose_pair(dialogue, {}, policy="first_assistant") == Pair("A red square on a white table.", "paired")


def test_a_pair_needs_min_pair_words_and_image_tokens_do_not_count():
    assert MIN_PAIR_WORDS == 4
    for policy in ("caption", "first_assistant", "longest_assistant"):
        three = turns(("Describe the image.", "<image> a red square"))
        four = turns(("Describe the image.", "a red square here"))
        assert choose_pair(three, {}, policy=policy) == Pair("", "too_short"), policy
        assert choose_pair(four, {}, policy=policy) == Pair("a red square here", "paired"), policy


@pytest.mark.parametrize("value", ["captions", "'column:'", "'column: x'", "first", ""])
def test_an_unknown_policy_is_a_one_line_config_error_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [f"data.ingest.pair_text={value}"])  # "key=": an empty text
    assert str(err.value).startswith("data.ingest.pair_text: ") and "\n" not in str(err.value)
    assert "caption, first_assistant, longest_assistant, column:NAME or none" in str(err.value)
    assert load_config("configs/demo.yaml", ["data.ingest.pair_text=column:caption"]).data.ingest.pair_text == \
        "column:caption"


def test_ingest_counts_pairs_per_subset_by_reason(tmp_path):
    qa_then_caption = fv(("human", f"<image>\nHow many?\n{SHORT}"), ("gpt", "2"), ("human", "Describe it."),
                         ("gpt", CAPTION))
    vqa = fv(("human", f"<image>\nWhat colour?\n{SHORT}"), ("gpt", "red"))
    short = fv(("human", "<image>\nWrite a caption."), ("gpt", "Red square."))
    rows = [ov_row("a", qa_then_caption, jpeg()), ov_row("b", vqa, jpeg()), ov_row("c", short, jpeg())]
    for name in ("captions", "answers"):
        write_onevision_shard(rows, str(tmp_path / "in" / name / "x.parquet"))
    (tmp_path / "d.yaml").write_text(
        f"datasets:\n  - name: captions\n    path: {tmp_path / 'in' / 'captions'}\n"
        f"  - name: answers\n    path: {tmp_path / 'in' / 'answers'}\n    pair_text: first_assistant\n"
    )
    summary = run_pipeline(dataset_yaml=str(tmp_path / "d.yaml"), output_dir=str(tmp_path / "o"),
                           options=IngestConfig(executor="local"))
    captions, answers = summary.subsets["captions"], summary.subsets["answers"]
    assert (captions["pair_text"], captions["paired"], captions["unpaired_by_reason"]) == \
        ("caption", 1, {"no_caption_turn": 1, "too_short": 1})
    assert (answers["pair_text"], answers["paired"], answers["unpaired_by_reason"]) == \
        ("first_assistant", 0, {"too_short": 3})
    assert (summary.paired, summary.unpaired_by_reason) == (1, {"no_caption_turn": 1, "too_short": 4})
    assert summary.options["pair_text"] == "caption"
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["subsets"]["captions"]["paired"] == 1
    pairs = {r["id"]: r["pair_text"] for r in read_dir(tmp_path / "o")}
    assert pairs == {"captions/a": CAPTION, "captions/b": "", "captions/c": "", "answers/a": "", "answers/b": "",
                     "answers/c": ""}


def test_scenes_training_parquet_pairs_every_image_with_its_caption(tmp_path):
    """The embedded default's data (the scenes, half of them question-first, through the demo's
    dataset YAML): every row is paired, with its caption, never with a text of three words or fewer."""
    written = write_scene_dataset(tmp_path / "raw", train_images=60, eval_images=4, image_size=32, seed=1,
                                  shard_rows=32)
    cfg = load_config("configs/demo.yaml", [f"data.raw_dir={tmp_path / 'raw'}", f"data.train_dir={tmp_path / 'train'}",
                                            f"data.quarantine_dir={tmp_path / 'q'}", "data.ingest.executor=local"])
    assert cfg.data.dataset_yaml == "configs/datasets/scenes.yaml"
    summary = run_pipeline(dataset_yaml=str(REPO / cfg.data.dataset_yaml), input_dir=cfg.data.raw_dir,
                           output_dir=cfg.data.train_dir, quarantine_dir=cfg.data.quarantine_dir,
                           options=cfg.data.ingest)
    assert summary.written == written["train_rows"] == summary.paired == 60 and summary.unpaired_by_reason == {}
    graphs = {graph["id"]: graph for graph in map(json.loads, Path(written["scene_graphs"]["train"]).open())}
    rows = [r for f in sorted((tmp_path / "train").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    question_first = 0
    for row in rows:
        assert len(row["pair_text"].split()) > 3
        assert describes_scene(row["pair_text"], graphs[row["id"].split("/", 1)[1]])
        question_first += row["pair_text"] != json.loads(row["conversations"])[1]["content"]
    assert 0 < question_first < len(rows)  # the first reply would have been an answer for these
