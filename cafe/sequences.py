"""Token sequences: conversations with assistant-only labels, embedding prompts, and the
expansion of each `<image>` placeholder into the number of feature tokens its image yields."""
from __future__ import annotations

from dataclasses import dataclass

from cafe.prompts import IGNORE_INDEX, chat_pieces, embedding_messages, question_messages


@dataclass(slots=True)
class Sequence:
    """One prompt or conversation. `image_slots[k]` is the batch image whose features fill the
    k-th `<image>` placeholder (before expansion)."""

    ids: list[int]
    labels: list[int]
    image_slots: list[int]


def _encode_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    # each piece on its own, as before, but in one call: the per-call overhead was most of the cost
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    for piece, (_, is_label) in zip(encoded, pieces):
        ids += piece
        labels += piece if is_label else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_conversation(tokenizer, messages: list[dict], image_slots: list[int]) -> Sequence:
    ids, labels = _encode_pieces(tokenizer, chat_pieces(messages))
    return Sequence(ids, labels, list(image_slots))


def encode_embedding_prompt(tokenizer, text: str | None, image_slots: list[int]) -> Sequence:
    ids, _ = _encode_pieces(tokenizer,
                            chat_pieces(embedding_messages(text, len(image_slots)), add_generation_prompt=True))
    return Sequence(ids, [IGNORE_INDEX] * len(ids), list(image_slots))


def encode_generation_prompt(tokenizer, question: str, image_slots: list[int]) -> Sequence:
    """A single user turn and the assistant header: what greedy generation continues."""
    ids, _ = _encode_pieces(tokenizer,
                            chat_pieces(question_messages(question, len(image_slots)), add_generation_prompt=True))
    return Sequence(ids, [IGNORE_INDEX] * len(ids), list(image_slots))


def expand_image_tokens(seq: Sequence, image_token_id: int,
                        tokens_per_image: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Replace each placeholder by `tokens_per_image[image]` copies.

    Returns ids, labels and, per token, the batch image it shows (-1 for text tokens)."""
    placeholders = sum(1 for t in seq.ids if t == image_token_id)
    if placeholders != len(seq.image_slots):
        raise ValueError(f"sequence has {placeholders} image placeholders but {len(seq.image_slots)} images")
    ids: list[int] = []
    labels: list[int] = []
    owner: list[int] = []
    slots = iter(seq.image_slots)
    for token, label in zip(seq.ids, seq.labels):
        if token == image_token_id:
            image = next(slots)
            n = tokens_per_image[image]
            ids += [token] * n
            labels += [IGNORE_INDEX] * n
            owner += [image] * n
        else:
            ids.append(token)
            labels.append(label)
            owner.append(-1)
    return ids, labels, owner
