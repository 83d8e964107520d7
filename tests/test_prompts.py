"""Prompts and token sequences on the tiny checkpoint's tokenizer: labels cover exactly the
assistant content and its end-of-turn marker, the pieces equal the chat template, the
embedding instructions follow DESIGN.md, and `<image>` expands to the processor's count."""
import random

import pytest
from transformers import AutoProcessor

from cafe.batch import Collator, Example, tokens_per_image
from cafe.prompts import (
    IGNORE_INDEX,
    IMAGE_EMBED_INSTRUCTION,
    TEXT_EMBED_INSTRUCTION,
    chat_pieces,
    embedding_messages,
    first_exchanges,
)
from cafe.sequences import (
    PieceTokenizer,
    Sequence,
    encode_conversation,
    encode_embedding_prompt,
    expand_image_tokens,
)
from tests.conftest import random_image

CONVERSATIONS = {
    "one-turn": [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": "A red circle at the top left."},
    ],
    "multi-turn": [
        {"role": "user", "content": "<image>\n<image>\nHow many shapes?"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "Is there a blue square?"},
        {"role": "assistant", "content": " yes, in the center\nand small "},
    ],
    "own-system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "colour?"},
        {"role": "assistant", "content": "green"},
    ],
}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(tiny_checkpoint, local_files_only=True)


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_labels_cover_exactly_the_assistant_turns(processor, name):
    tok = processor.tokenizer
    messages = CONVERSATIONS[name]
    images = messages[0 if messages[0]["role"] == "user" else 1]["content"].count("<image>")
    seq = encode_conversation(tok, messages, list(range(images)))
    assert len(seq.ids) == len(seq.labels)
    assert seq.image_slots == list(range(images))
    # every label is either ignored or the token at that position
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(seq.ids, seq.labels))
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    decoded = [tok.decode(run, skip_special_tokens=False) for run in labelled_runs(seq.labels)]
    assert decoded == [f"{a}<|im_end|>" for a in answers]
    # the last labelled token of each turn is the end-of-turn marker
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [run[-1] for run in labelled_runs(seq.labels)] == [end] * len(answers)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_ids_equal_the_chat_template(processor, name):
    messages = CONVERSATIONS[name]
    seq = encode_conversation(processor.tokenizer, messages, [])
    assert seq.ids == template_ids(processor.tokenizer, messages)
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    assert "".join(piece for piece, _ in chat_pieces(messages)) == text
    assert text.count("You are a helpful assistant.") == (messages[0]["role"] != "system")


def test_remembered_pieces_give_the_tokenizers_ids(processor):
    """The collator's piece cache: the same sequences as the tokenizer's, on first sight, when
    remembered, and after older texts are forgotten; it never holds more than its bound."""
    pieces = PieceTokenizer(processor.tokenizer, max_texts=12)
    rng = random.Random(0)
    words = ["red", "blue", "circle", "square", "top", "left", "large", "small"]
    for _ in range(30):
        messages = [{"role": "user", "content": "<image>\n" + " ".join(rng.choices(words, k=3))},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))}]
        assert encode_conversation(pieces, messages, [0]) == encode_conversation(processor.tokenizer, messages, [0])
        text = rng.choice([None, " ".join(rng.choices(words, k=4))])
        assert encode_embedding_prompt(pieces, text, [0]) == encode_embedding_prompt(processor.tokenizer, text, [0])
        assert len(pieces._ids) <= 12


@pytest.mark.parametrize(
    "text, num_images, expected",
    [
        (None, 1, f"<image>\n{IMAGE_EMBED_INSTRUCTION}"),
        ("", 2, f"<image>\n<image>\n{IMAGE_EMBED_INSTRUCTION}"),
        ("a red circle", 0, f"a red circle\n{TEXT_EMBED_INSTRUCTION}"),
        ("what is here", 1, f"<image>\nwhat is here\n{TEXT_EMBED_INSTRUCTION}"),
    ],
)
def test_embedding_instructions(processor, text, num_images, expected):
    assert IMAGE_EMBED_INSTRUCTION == "Compress this image in one word:"
    assert TEXT_EMBED_INSTRUCTION == "Compress this sentence in one word:"
    assert embedding_messages(text, num_images) == [{"role": "user", "content": expected}]
    tok = processor.tokenizer
    seq = encode_embedding_prompt(tok, text, list(range(num_images)))
    assert seq.labels == [IGNORE_INDEX] * len(seq.ids)
    assert seq.ids == template_ids(tok, embedding_messages(text, num_images), add_generation_prompt=True)
    decoded = tok.decode(seq.ids, skip_special_tokens=False)
    assert decoded.endswith(f"{expected}<|im_end|>\n<|im_start|>assistant\n")


def test_embedding_input_needs_text_or_an_image():
    with pytest.raises(ValueError):
        embedding_messages(None, 0)
    with pytest.raises(ValueError):
        embedding_messages("", 0)


def test_expand_image_tokens_uses_each_images_count(processor):
    tok = processor.tokenizer
    image_id = processor.image_token_id
    seq = encode_conversation(tok, CONVERSATIONS["multi-turn"], [2, 0])  # batch images 2 and 0
    ids, labels, owner = expand_image_tokens(seq, image_id, [3, 99, 5])
    assert ids.count(image_id) == 5 + 3
    # "<image>\n<image>\n": five tokens of image 2, the newline, three tokens of image 0
    first = ids.index(image_id)
    assert owner[first : first + 9] == [2] * 5 + [-1] + [0] * 3
    assert [i == image_id for i in ids[first : first + 9]] == [True] * 5 + [False] + [True] * 3
    assert all(lab == IGNORE_INDEX for lab, o in zip(labels, owner) if o >= 0)
    # the text tokens and their labels are untouched and in order
    text = [(i, lab) for i, lab, o in zip(ids, labels, owner) if o < 0]
    assert text == [(i, lab) for i, lab in zip(seq.ids, seq.labels) if i != image_id]
    assert len(ids) == len(seq.ids) - 2 + 8


def test_expand_image_tokens_rejects_a_count_mismatch(processor):
    tok = processor.tokenizer
    one_placeholder = encode_embedding_prompt(tok, None, [0])
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        expand_image_tokens(Sequence(one_placeholder.ids, one_placeholder.labels, [0, 1]), processor.image_token_id,
                            [4, 4])
    two_placeholders = encode_embedding_prompt(tok, None, [0, 1])
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        expand_image_tokens(Sequence(two_placeholders.ids, two_placeholders.labels, [0]), processor.image_token_id, [4])


def test_expansion_matches_the_processor(processor):
    rng = random.Random(4)
    images = [random_image(rng, 96, 48), random_image(rng, 64, 64), random_image(rng, 40, 100)]
    image_inputs = dict(processor.image_processor(images=images, return_tensors="pt"))
    counts = tokens_per_image(processor, image_inputs)
    for k, image in enumerate(images):
        seq = encode_embedding_prompt(processor.tokenizer, "a caption", [k])
        ids, _, owner = expand_image_tokens(seq, processor.image_token_id, counts)
        prompt = processor.tokenizer.apply_chat_template(embedding_messages("a caption", 1), tokenize=False,
                                                         add_generation_prompt=True)
        reference = processor(text=prompt, images=[image], return_tensors="pt")["input_ids"][0].tolist()
        assert ids == reference
        assert owner.count(k) == counts[k] > 0


def test_first_exchanges_keeps_system_turns_and_whole_exchanges():
    system = {"role": "system", "content": "Be brief."}
    turns = CONVERSATIONS["multi-turn"]
    assert first_exchanges([system, *turns], 1) == [system, *turns[:2]]
    assert first_exchanges(turns, 2) == turns
    assert first_exchanges(turns, 5) == turns


def test_max_turns_trains_on_the_first_exchanges_with_the_images_they_show(processor):
    rng = random.Random(0)
    conversation = [{"role": "user", "content": "<image>\nHow many shapes?"},
                    {"role": "assistant", "content": "two"},
                    {"role": "user", "content": "<image>\nAnd in this one?"},
                    {"role": "assistant", "content": "one"}]
    example = Example(images=[random_image(rng, 64, 64), random_image(rng, 96, 48)], messages=conversation,
                      target_text="two shapes")
    full = Collator(processor, compute_contrastive_loss=False)([example])
    cut = Collator(processor, compute_contrastive_loss=False, max_turns=1)([example])
    tok, image_id = processor.tokenizer, processor.image_token_id

    def labelled(batch):
        return tok.decode(batch.lm_targets[batch.lm_targets != IGNORE_INDEX])

    assert labelled(full) == "two<|im_end|>one<|im_end|>"
    assert labelled(cut) == "two<|im_end|>"
    assert int((full.input_ids == image_id).sum()) == sum(full.tokens_per_image)
    assert int((cut.input_ids == image_id).sum()) == cut.tokens_per_image[0]  # the second image is not shown
    with_query = Collator(processor, max_turns=1)([example])
    assert int((with_query.input_ids == image_id).sum()) == sum(with_query.tokens_per_image)  # the query shows both
