"""The contrastive pair text of a training row, chosen by a per-data-set policy.

CAFe pulls an image toward the text that describes it. In conversations that open with a
question, the first reply is "yes", "2" or "red"; paired with those, every image that must match
"yes" is pulled toward every other, and the term cannot tell them apart.

Policies (`pair_text:` in a dataset YAML entry; default `data.ingest.pair_text`, "caption"):
* `caption`: the reply to a user turn that asks for a caption (`asks_for_caption`); with several
  such turns, the first whose reply is long enough;
* `first_assistant`: the first assistant turn (the research code's pairing, kept to compare);
* `longest_assistant`: the assistant turn with the most words (the first of equals);
* `column:NAME`: the source row's text column NAME;
* `none`: no pair.

Under every policy a text of fewer than MIN_PAIR_WORDS words is no pair: never a one-word
answer. A row without a pair keeps an empty `pair_text`; it trains the LM term and takes no
part in the contrastive term. `<image>` tokens are removed from the text.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cafe.config import PAIR_TEXT_COLUMN
from cafe.prompts import IMAGE_TOKEN

# 4: "yes", "2", "large" and "a red circle" are answers, not descriptions; the scenes' shortest
# caption ("a small red circle on the left") has 7 words.
MIN_PAIR_WORDS = 4
PAIRED = "paired"
# why a row has no pair: no user turn asks for a caption; the column is missing, not text or
# empty; the chosen text is under MIN_PAIR_WORDS words; the policy is `none`
NO_PAIR_REASONS = ("no_caption_turn", "no_column_text", "too_short", "policy_none")

# The caption rule. A user turn asks for a caption when, with its <image> tokens removed,
# lower-cased and its whitespace collapsed, it
# 1. asks for no short answer: it holds none of the phrases of _SHORT_ANSWER (LLaVA's VQA,
#    multiple-choice and yes/no instructions: "Answer the question using a single word or
#    phrase.", "Answer with the option's letter from the given choices directly."); and
# 2. either holds a describing word (_DESCRIBING: describe, description, caption, depict,
#    narrate, portray, summarize, summary: "Describe the image.", "Provide a brief description
#    of the given image.", "Write a short caption for this image.", "Summarize the visual
#    content of the image.");
#    or is, as a whole, a question about the whole picture (_WHOLE_PICTURE: "What is in this
#    picture?", "What do you see happening in this image?", "What's going on in the scene?",
#    "What is this photo about?", "What are the key elements in this picture?", "What is shown?");
#    or asks for an account of the picture and asks no question (_ACCOUNT, and none of the words
#    of _QUESTION_WORD: "Offer a thorough analysis of the image.", "Explain the visual content
#    of the image in great detail.", "Share a concise interpretation of the image provided.",
#    but not "Explain why the man in the image is smiling.").
# A question about a part of the picture ("What is in the center?", "Is there a cat in the
# image?") is none. LLaVA's detailed- and brief-description instructions all satisfy the rule.
_SHORT_ANSWER = re.compile(
    r"single word|one word|word or (?:a )?phrase|short answer|answer with|yes or no|\boptions?\b|\bchoices?\b"
)
_DESCRIBING = re.compile(r"\b(?:describ|descript|caption|depict|narrat|portray|summar)")
_PICTURE_NOUN = r"(?:image|picture|photo|photograph|scene|snapshot)"
_PICTURE = rf"(?:the|this) {_PICTURE_NOUN}"
_WHOLE_PICTURE = re.compile(
    rf"what(?:'s| is| do you think is) (?:shown|depicted|pictured|happening|going on)(?: in {_PICTURE})?"
    rf"|what(?:'s| is) in {_PICTURE}"
    rf"|what do you see(?: happening)?(?: in {_PICTURE})?"
    rf"|what(?:'s| is) {_PICTURE} (?:about|of)"
    rf"|what are the (?:key|main) (?:elements|features|objects)(?: in {_PICTURE})?"
)
_ACCOUNT = re.compile(
    r"\b(?:analy[sz]|explain|explanation|interpret|account|rundown|clarify|examine|walk through|break down|elaborat)"
    rf"\w*\b.*\b(?:the|this) (?:\w+ )?{_PICTURE_NOUN}\b"
)
_QUESTION_WORD = re.compile(r"\b(?:why|how|which|who|whom|whose|when|where|what|whether|if)\b")


@dataclass(frozen=True, slots=True)
class Pair:
    text: str  # "" when the row has no usable pair
    outcome: str  # PAIRED, or one of NO_PAIR_REASONS


def asks_for_caption(instruction: str) -> bool:
    """True when a user turn asks for a caption of its image (the rule above)."""
    text = " ".join(instruction.replace(IMAGE_TOKEN, " ").replace("\u2019", "'").lower().split())
    if _SHORT_ANSWER.search(text):
        return False
    if _DESCRIBING.search(text) or _WHOLE_PICTURE.fullmatch(text.rstrip("?.! ")):
        return True
    return bool(_ACCOUNT.search(text)) and not _QUESTION_WORD.search(text)


def choose_pair(turns: list[dict[str, str]], row: dict[str, Any], *, policy: str) -> Pair:
    """The pair text of a row under `policy`, from its normalised `turns` or (`column:NAME`) its source `row`."""
    if policy == "none":
        return Pair("", "policy_none")
    candidates, missing = _candidates(turns, row, policy)
    if not candidates:
        return Pair("", missing)
    text = next((t for t in candidates if len(t.split()) >= MIN_PAIR_WORDS), "")
    return Pair(text, PAIRED if text else "too_short")


def _candidates(turns: list[dict[str, str]], row: dict[str, Any], policy: str) -> tuple[list[str], str]:
    """The texts a policy may pair, best first, and the reason for no pair when there are none."""
    if policy.startswith(PAIR_TEXT_COLUMN):
        value = row.get(policy.removeprefix(PAIR_TEXT_COLUMN))
        text = _clean(value) if isinstance(value, str) else ""
        return [text] if text else [], "no_column_text"
    if policy == "caption":
        return list(_caption_replies(turns)), "no_caption_turn"
    replies = [_clean(t["content"]) for t in turns if t["role"] == "assistant"]
    if policy == "first_assistant":
        return replies[:1], "too_short"
    if policy == "longest_assistant":
        return [max(replies, key=lambda r: len(r.split()))] if replies else [], "too_short"
    raise ValueError(f"unknown pair_text policy {policy!r}")


def _caption_replies(turns: list[dict[str, str]]) -> Iterator[str]:
    """The reply to each user turn that asks for a caption, in order (the assistant turn that
    follows it before the next user turn)."""
    for i, turn in enumerate(turns):
        if turn["role"] != "user" or not asks_for_caption(turn["content"]):
            continue
        for later in turns[i + 1 :]:
            if later["role"] == "user":
                break
            if later["role"] == "assistant":
                yield _clean(later["content"])
                break


def _clean(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()
