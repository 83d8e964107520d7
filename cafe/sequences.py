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


class PieceTokenizer:
    """A tokenizer's ids for chat pieces, each distinct text encoded once. Pieces are encoded on
    their own, so a remembered text's ids are exactly what encoding it again would give; the
    system prompt, role headers and instructions come back in every batch, and each row's own
    text every epoch. Keeps at most `max_texts` texts (the oldest are forgotten first)."""

    def __init__(self, tokenizer, max_texts: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.max_texts = max_texts
        self._ids: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> list[list[int]]:
        found = {text: self._ids.get(text) for text in texts}
        missing = [text for text, ids in found.items() if ids is None]
        if missing:  # in one call: the per-call overhead is most of a short text's cost
            for text, ids in zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]):
                found[text] = ids
                if len(self._ids) >= self.max_texts:
                    del self._ids[next(iter(self._ids))]
                self._ids[text] = ids
        return [found[text] for text in texts]


def _encode_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """`tokenizer`: a PieceTokenizer, or a tokenizer (each piece still encoded on its own)."""
    ids: list[int] = []
    labels: list[int] = []
    texts = [text for text, _ in pieces]
    if isinstance(tokenizer, PieceTokenizer):
        encoded = tokenizer(texts)
    else:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
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
