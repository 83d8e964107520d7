"""Generation on held-out conversations in the LLaVA-OneVision-Data layout (`id`, `image` =
{bytes, path}, `conversations` = from/value or role/content turns).

Each (user, assistant) exchange is scored as a single-turn conversation with the row's image:
an answer of at most `qa_max_words` words is a QA answer, generated greedily and compared by
exact match after normalisation; a longer one is a caption, whose assistant tokens give the
caption loss (NLL per token) and perplexity. Where a row carries its scene graph (the
embedded scenes), its first caption is also generated greedily and scored by scene match: the
share of scenes whose caption names exactly their shapes and colours. Where a row names each
exchange's question type (`question_types`, one per exchange), QA exact match is also given per
type, beside what always giving that type's commonest answer would score. Multi-turn context
is not carried over, so every exchange asks its question about the image alone, as the
scenes' QA turns do.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cafe.prompts import IMAGE_TOKEN
from pipelines.records import Rejected, normalise_conversation


@dataclass(frozen=True, slots=True)
class Exchange:
    row: int
    row_id: str
    question: str  # the user text without image tokens
    answer: str
    image: bytes | None
    scene: dict | None = None  # the row's exact scene graph, where the file has one (the embedded scenes)
    question_type: str | None = None  # "count", "where", ..., where the file names them

    def messages(self) -> list[dict]:
        user = f"{IMAGE_TOKEN}\n{self.question}" if self.image is not None else self.question
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.answer}]


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: 'Two.' and 'two' match."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_short_answer(text: str, max_words: int) -> bool:
    return len(normalise_answer(text).split()) <= max_words


def load_exchanges(path: str | Path) -> tuple[list[Exchange], list[dict]]:
    """Every exchange of every row, plus the rows that could not be read (counted skips)."""
    table = pq.read_table(path)
    missing = {"id", "image", "conversations"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column {sorted(missing)}; a generation file has id, image, conversations")
    columns = [table[c].to_pylist() if c in table.column_names else [None] * table.num_rows
               for c in ("id", "image", "conversations", "scene", "question_types")]  # the last two optional
    exchanges, skipped = [], []
    for row, (row_id, image, turns, scene, types) in enumerate(zip(*columns)):
        try:
            pairs = _exchange_pairs(normalise_conversation(turns))
            if types is not None:
                _check_question_types(types, len(pairs))
        except Rejected as err:
            skipped.append({"row": row, "id": row_id, "file": str(path), "reason": str(err)})
            continue
        data = image["bytes"] if image else None
        graph = json.loads(scene) if scene else None
        for k, (question, answer) in enumerate(pairs):
            exchanges.append(Exchange(row, str(row_id), question, answer, data, graph, types[k] if types else None))
    if not exchanges and not skipped:
        raise ValueError(f"{path}: no (user, assistant) exchanges to score")
    return exchanges, skipped


QUESTION_TYPE = re.compile(r"[A-Za-z0-9_.\- ]+")  # each type names metrics; MLflow's characters only


def _check_question_types(types: object, exchanges: int) -> None:
    if not isinstance(types, list) or not all(isinstance(t, str) and QUESTION_TYPE.fullmatch(t) for t in types):
        raise Rejected("malformed_row", "question_types must be a list of names of letters, digits, _ . - or "
                                        f"space, got {str(types)[:80]}")
    if len(types) != exchanges:
        raise Rejected("malformed_row",
                       f"question_types names {len(types)} exchanges, the conversation has {exchanges}")


def _exchange_pairs(turns: list[dict]) -> list[tuple[str, str]]:
    """(user text without image tokens, assistant answer) for each exchange, in order."""
    pairs, user = [], None
    for turn in turns:
        if turn["role"] == "user":
            user = turn["content"].replace(IMAGE_TOKEN, "").strip()
        elif turn["role"] == "assistant" and user is not None:
            pairs.append((user, turn["content"]))
            user = None
    return pairs


def generation_metrics(caption_nll: float, caption_tokens: int, qa_hits: int, qa_total: int) -> dict[str, float]:
    metrics = {"captions_scored_tokens": float(caption_tokens), "qa_count": float(qa_total)}
    if caption_tokens:
        metrics["caption_loss"] = caption_nll / caption_tokens
        metrics["perplexity"] = math.exp(metrics["caption_loss"])
    if qa_total:
        metrics["qa_exact_match"] = qa_hits / qa_total
    return metrics


def qa_by_type_metrics(results: list[tuple[str, str, bool]]) -> dict[str, float]:
    """`results`: (question type, true answer, exact match) per answered QA exchange whose type
    is named. Per type: exact match, count, and the share of its commonest true answer (majority):
    what always giving that answer scores (e.g. "0" to "How many stars?"). The names are their
    own, not `qa_exact_match/<type>`: a metric that is also another's folder breaks MLflow's
    file store."""
    by_type: dict[str, list[tuple[str, bool]]] = {}
    for question_type, truth, hit in results:
        by_type.setdefault(question_type, []).append((normalise_answer(truth), hit))
    metrics = {}
    for question_type, answered in sorted(by_type.items()):
        n = len(answered)
        metrics[f"qa_exact_match_by_type/{question_type}"] = sum(hit for _, hit in answered) / n
        metrics[f"qa_majority_by_type/{question_type}"] = Counter(t for t, _ in answered).most_common(1)[0][1] / n
        metrics[f"qa_count_by_type/{question_type}"] = float(n)
    return metrics


def scene_match_metrics(matches: list[tuple[bool, int]]) -> dict[str, float]:
    """`matches`: per scene, whether its greedy caption names exactly its shapes and colours,
    and how many shapes it has. The share over all scenes and over single-shape scenes."""
    metrics = {"scene_match_count": float(len(matches))}
    if matches:
        metrics["scene_match"] = sum(ok for ok, _ in matches) / len(matches)
    single = [ok for ok, n in matches if n == 1]
    if single:
        metrics["scene_match_single"] = sum(single) / len(single)
    return metrics


def messages_json(exchange: Exchange) -> str:
    return json.dumps(exchange.messages())
