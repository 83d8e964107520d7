"""One source row -> one training row or one quarantine row. Pure functions, no Ray, no I/O
except through the `load_image` callable; the Ray job and the one-process loop both call
`convert_row`, so they do the same work.

Conversations are normalised to `[{"role": "user"|"assistant"|"system", "content": str}]` from
either `from/value` (human/gpt/user/assistant/system) or `role/content` turns (content may be a
string or a list of `{"type": "text"|"image"}` parts). The `<image>` token stays in the text.

Images are decoded, checked and re-encoded. Encoding policy: sources that were JPEG (or MPO)
are written as JPEG quality 95 (writing them losslessly would only inflate the bytes of an
already-lossy image); every other source (PNG, GIF, BMP, WEBP, TIFF, ...) is written as PNG, so
lossless images (documents, charts, screenshots) stay lossless. Pixels are converted to RGB
with `Image.convert("RGB")` (alpha dropped, as the model's image processor does); EXIF
orientation is not applied, as in the reference. Re-encoding strips metadata and makes the
bytes a deterministic function of the pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError

from cafe.config import IngestConfig
from cafe.files import REFUSAL_REASONS, RefusedFile
from cafe.prompts import IMAGE_TOKEN
from pipelines.pairs import choose_pair

# Every reason a row can be quarantined for. `unreadable_source`: a whole input chunk could not
# be read (its rows are quarantined by position, with no id). `undecodable_text`: a parquet text
# value that is not UTF-8; `unencodable_text`: text that cannot be written as UTF-8 (a lone
# surrogate from a json escape). The image file reasons come from `cafe.files`.
REASONS = (
    "malformed_row",
    "duplicate_id",
    "no_assistant_turn",
    "image_token_mismatch",
    "empty_text",
    "text_too_long",
    "undecodable_text",
    "unencodable_text",
    "missing_image_file",
    *REFUSAL_REASONS,  # path_outside_root, not_a_regular_file, image_too_large
    "undecodable_image",
    "truncated_image",
    "unreadable_source",
)
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
JPEG_QUALITY = 95
LOSSY_FORMATS = ("JPEG", "MPO")
_DETAIL_CHARS = 500
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(kw_only=True, frozen=True)
class ConvertOptions:
    max_image_pixels: int = 25_000_000  # width * height of the source image
    max_text_chars: int = 32_768  # all turns together
    max_side: int | None = None  # resize (keeping aspect) so that max(width, height) <= this
    multimodal_input: bool = False  # fill query_text / target_text
    pair_text: str = IngestConfig.pair_text  # the pair-text policy (`pipelines.pairs`)


class Rejected(Exception):
    """A row that goes to quarantine, with its reason (one of REASONS) and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:_DETAIL_CHARS]


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    width: int
    height: int
    format: str  # "JPEG" or "PNG"


def prepare_image(data: bytes, *, max_image_pixels: int, max_side: int | None = None) -> PreparedImage:
    """Decode, validate, convert to RGB, optionally resize, re-encode. Raises `Rejected`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Rejected("image_too_large", str(e)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            raise Rejected("undecodable_image", _describe(e)) from None
        width, height = img.size
        if width < 1 or height < 1:
            raise Rejected("undecodable_image", f"image has size {width}x{height}")
        if width * height > max_image_pixels:
            raise Rejected(
                "image_too_large", f"{width}x{height} = {width * height} pixels > max_image_pixels {max_image_pixels}"
            )
        source_format = img.format or ""
        target = _target_size(width, height, max_side)
        if target != (width, height) and source_format in LOSSY_FORMATS:
            img.draft("RGB", target)  # JPEG DCT scaling: decode at >= the target size, much faster
        try:
            img.load()
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
            reason = "truncated_image" if "truncat" in str(e).lower() else "undecodable_image"
            raise Rejected(reason, _describe(e)) from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if source_format in LOSSY_FORMATS:
        img.save(out, format="JPEG", quality=JPEG_QUALITY)
        fmt = "JPEG"
    else:
        img.save(out, format="PNG")
        fmt = "PNG"
    return PreparedImage(data=out.getvalue(), width=target[0], height=target[1], format=fmt)


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


def normalise_conversation(value: Any) -> list[dict[str, str]]:
    """`from/value` or `role/content` turns (list, or its JSON text) -> role/content dicts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Rejected("malformed_row", f"conversations is a string but not JSON: {e}") from None
    if value is None:
        raise Rejected("malformed_row", "row has no conversations")
    if not isinstance(value, (list, tuple)):
        raise Rejected("malformed_row", f"conversations must be a list of turns, got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise Rejected("malformed_row", f"turn {i} is a {type(turn).__name__}, not a mapping")
        if turn.get("from") is not None or ("value" in turn and "content" not in turn):
            raw_role, content = turn.get("from"), turn.get("value")
        elif "role" in turn or "content" in turn:
            raw_role, content = turn.get("role"), turn.get("content")
        else:
            raise Rejected("malformed_row", f"turn {i} has neither from/value nor role/content keys: {sorted(turn)}")
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise Rejected("malformed_row", f"turn {i} has unknown role {raw_role!r}; known: {sorted(ROLE_ALIASES)}")
        turns.append({"role": role, "content": _content_text(content, i)})
    return turns


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # chat-template parts
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                pieces.append(IMAGE_TOKEN)
            elif kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise Rejected("malformed_row", f"turn {index}: content part {part!r} is neither text nor image")
        return "\n".join(pieces)
    raise Rejected("malformed_row", f"turn {index}: content is a {type(content).__name__}, not text")


def check_conversation(turns: list[dict[str, str]], *, has_image: bool, max_text_chars: int) -> list[dict[str, str]]:
    """Validate turns; return them with `<image>\\n` prepended to the first user turn when the
    row has an image and no image token. Raises `Rejected`."""
    roles = [t["role"] for t in turns]
    if "assistant" not in roles:
        raise Rejected("no_assistant_turn", f"roles in order: {roles}")
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise Rejected("malformed_row", f"the first non-system turn must be from the user, got {first!r}")
    counts = [t["content"].count(IMAGE_TOKEN) for t in turns]
    total = sum(counts)
    if total and not has_image:
        raise Rejected("image_token_mismatch", f"{total} {IMAGE_TOKEN} token(s) but the row has no image")
    if total > 1:
        raise Rejected("image_token_mismatch", f"{total} {IMAGE_TOKEN} tokens for one image")
    if total == 1 and roles[counts.index(1)] != "user":
        raise Rejected("image_token_mismatch", f"the {IMAGE_TOKEN} token is in a {roles[counts.index(1)]} turn")
    for i, turn in enumerate(turns):
        if not turn["content"].replace(IMAGE_TOKEN, "").strip() and IMAGE_TOKEN not in turn["content"]:
            raise Rejected("empty_text", f"turn {i} ({turn['role']}) has no text")
    chars = sum(len(t["content"]) for t in turns)
    if chars > max_text_chars:
        raise Rejected("text_too_long", f"{chars} characters > max_text_chars {max_text_chars}")
    if has_image and total == 0:
        user = roles.index("user")
        turns = [dict(t) for t in turns]
        turns[user]["content"] = f"{IMAGE_TOKEN}\n{turns[user]['content']}"
    return turns


def first_turn_text(turns: list[dict[str, str]], role: str) -> str:
    text = next(t["content"] for t in turns if t["role"] == role)
    return text.replace(IMAGE_TOKEN, "").strip()


def row_id(row: dict[str, Any]) -> str | None:
    """The source id as text, or None when missing."""
    value = row.get("id")
    if value is None or isinstance(value, (bytes, dict, list, float)):
        return None
    text = str(value)
    return text if text.strip() else None


def unique_id(subset: str, source_id: str) -> str:
    return f"{subset}/{source_id}"


def keep_by_hash(uid: str, ratio: float) -> bool:
    """Deterministic sampling: keep a row when the hash of its unique id falls below `ratio`."""
    if ratio >= 1.0:
        return True
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


def image_reference(row: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """(encoded bytes, path) of the row's one image; (None, None) for a text-only row."""
    if row.get("video"):
        raise Rejected("malformed_row", "video rows are not supported")
    image = row.get("image")
    if isinstance(image, (list, tuple)):
        if len(image) > 1:
            raise Rejected("malformed_row", f"multi-image rows are not supported ({len(image)} images)")
        image = image[0] if image else None
    if image is None:
        return None, None
    if isinstance(image, str):
        return (None, image) if image.strip() else (None, None)
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise Rejected("malformed_row", f"image.bytes is a {type(data).__name__}")
            return bytes(data), None
        return (None, path) if isinstance(path, str) and path.strip() else (None, None)
    raise Rejected("malformed_row", f"image is a {type(image).__name__}")


class Converted(NamedTuple):
    ok: bool
    record: dict[str, Any]  # the training row, or the quarantine row
    pair: str = ""  # a training row's pair outcome: "paired" or why it has none (`pipelines.pairs`)


def convert_row(
    row: dict[str, Any],
    *,
    subset: str,
    options: ConvertOptions,
    load_image: Callable[[str], bytes],
    duplicate: bool = False,
    origin: dict[str, Any] | None = None,
) -> Converted:
    """(True, training row, pair outcome) or (False, quarantine row). Never raises for bad data.

    `load_image(path)` returns the bytes of an image given by path (the caller resolves it
    against the subset's image root); `duplicate` marks a repeated id (decided by the caller,
    who sees the whole run); `origin` (file, row) goes into the quarantine row's raw JSON.
    """
    source_id = row_id(row)
    uid = unique_id(subset, source_id) if source_id is not None else None
    try:
        if uid is None:
            raise Rejected("malformed_row", "row has no id")
        if duplicate:
            raise Rejected("duplicate_id", f"{uid} already appeared earlier in this run")
        data, path = image_reference(row)
        turns = check_conversation(
            normalise_conversation(row.get("conversations")),
            has_image=data is not None or path is not None,
            max_text_chars=options.max_text_chars,
        )
        image = None
        if path is not None:
            try:
                data = load_image(path)
            except RefusedFile as e:
                raise Rejected(e.reason, e.detail) from None
            except Exception as e:  # noqa: BLE001 - any other failure to fetch the file
                raise Rejected("missing_image_file", f"{path}: {_describe(e)}") from None
        if data is not None:
            image = prepare_image(data, max_image_pixels=options.max_image_pixels, max_side=options.max_side)
        pair = choose_pair(turns, row, policy=options.pair_text)
        return Converted(True, _check_encodable({
            "id": uid,
            "source": subset,
            "image": image.data if image else None,
            "width": image.width if image else None,
            "height": image.height if image else None,
            "conversations": json.dumps(turns, ensure_ascii=False),
            "pair_text": pair.text,
            # multimodal_input: the query is the first user turn and the target its reply, whatever its length
            "query_text": first_turn_text(turns, "user") if options.multimodal_input else None,
            "target_text": first_turn_text(turns, "assistant") if options.multimodal_input else None,
            "target_image": None,
        }), pair.outcome)
    except Rejected as e:
        return Converted(False, quarantine_record(row, subset=subset, uid=uid, reason=e.reason, detail=e.detail,
                                                  origin=origin))
    except Exception as e:  # noqa: BLE001 - a bug or an input we did not foresee: still quarantined
        detail = _describe(e)
        return Converted(False, quarantine_record(row, subset=subset, uid=uid, reason="malformed_row", detail=detail,
                                                  origin=origin))


def quarantine_record(
    row: dict[str, Any] | None,
    *,
    subset: str,
    uid: str | None,
    reason: str,
    detail: str,
    origin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    raw = dict(elide_bytes(row or {}))
    if origin:
        raw["_origin"] = origin
    return {
        "id": None if uid is None else _writable(uid),
        "source": subset,
        "reason": reason,
        "detail": _writable(detail[:_DETAIL_CHARS]),
        "raw": _writable(json.dumps(raw, ensure_ascii=False, default=repr)),
    }


def _check_encodable(record: dict[str, Any]) -> dict[str, Any]:
    """The record, when every text in it can be written as UTF-8; else Rejected: one such row
    must not fail the writing of its whole shard."""
    for key, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise Rejected("unencodable_text", f"{key}: {e.reason} at character {e.start}") from None
    return record


def _writable(text: str) -> str:
    """Text a quarantine row can hold: what UTF-8 cannot encode becomes a backslash escape (in
    `raw`, a JSON escape that reads back as the original)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def elide_bytes(value: Any) -> Any:
    """The value with every bytes object replaced by a short marker (never embed image bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes elided>"
    if isinstance(value, dict):
        return {str(k): elide_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [elide_bytes(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _describe(e: BaseException) -> str:
    """Exception text without object addresses, so quarantine files are identical across runs."""
    return _ADDRESS.sub("", f"{type(e).__name__}: {e}")[:_DETAIL_CHARS]
