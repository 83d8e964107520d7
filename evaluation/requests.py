"""What the suites ask of a model, and the answers, independent of where the model runs.

A `Request` is one unit of model work: embed a (text, image) input, greedily answer a
question about an image, or score a conversation's assistant tokens (NLL). Suites build lists
of requests; a backend (`evaluation.backends`) answers them with an `InferenceModel` in this
process, on a Ray actor pool, or on the training workers. Images travel as encoded bytes or as
a file path that is read where the model runs (through `cafe.files`: a regular file under the
byte cap), and are decoded there. An image that cannot be read or decoded, a decompression bomb
included, becomes that request's error, `<reason>: <detail>`, never a failed job.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from cafe.files import read_regular_file
from cafe.inference import InferenceModel

Op = Literal["embed", "generate", "nll"]


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    text: str | None = None  # embed: the text to embed; generate: the question
    image: bytes | None = None  # an encoded image, or
    image_path: str | None = None  # a file to read where the model runs
    messages: str | None = None  # nll: role/content turns as JSON
    max_new_tokens: int = 0

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None

    @property
    def cost(self) -> int:
        """Sort key: similar lengths share a batch."""
        return len(self.text or "") + len(self.messages or "") + (1000 if self.has_image else 0)


@dataclass(slots=True)
class Answers:
    """One entry per request, in request order."""

    embeddings: np.ndarray  # (N, D) float32; zeros where the request was not an embedding or failed
    texts: list[str]  # generated answers ("" otherwise)
    nll: np.ndarray  # (N,) float64 summed NLL of nll requests
    tokens: np.ndarray  # (N,) int64 tokens those sums cover
    errors: list[str]  # "" where the request was answered

    def take(self, index: list[int]) -> Answers:
        return Answers(self.embeddings[index], [self.texts[i] for i in index], self.nll[index], self.tokens[index],
                       [self.errors[i] for i in index])


def decode_image(data: bytes | None, path: str | None) -> Image.Image:
    """The image as RGB, or ValueError "<reason>: <detail>" (a `cafe.files.RefusedFile` for a file
    refused unread)."""
    if data is None:
        try:
            data = read_regular_file(path)
        except OSError as err:
            raise ValueError(f"missing_image_file: cannot read image file {path}: {err.strerror}") from None
    where = f" ({path})" if path else ""
    try:
        with warnings.catch_warnings():
            # past Pillow's pixel limit, refused before decoding, not only warned about
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image_too_large: {err}{where}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):  # Pillow's many types for bad data
        # PIL's own message names a BytesIO address: not reproducible
        raise ValueError(f"undecodable_image: not an image PIL can read{where}, {len(data)} bytes") from None


def answer(model: InferenceModel, requests: list[Request]) -> Answers:
    """Answer requests in this process; each op's requests go to the model in one call (it
    batches and length-sorts them itself)."""
    n = len(requests)
    out = Answers(np.zeros((n, model.hidden_size), np.float32), [""] * n, np.zeros(n), np.zeros(n, np.int64), [""] * n)
    ready: dict[str, list[tuple[int, Request, list[Image.Image]]]] = {"embed": [], "generate": [], "nll": []}
    for i, req in enumerate(requests):
        try:
            images = [decode_image(req.image, req.image_path)] if req.has_image else []
        except ValueError as err:
            out.errors[i] = str(err)
            continue
        ready[req.op].append((i, req, images))
    if ready["embed"]:
        index, reqs, images = zip(*ready["embed"])
        out.embeddings[list(index)] = model.embed([(r.text, im) for r, im in zip(reqs, images)]).numpy()
    for max_new in sorted({r.max_new_tokens for _, r, _ in ready["generate"]}):
        chosen = [(i, r, im) for i, r, im in ready["generate"] if r.max_new_tokens == max_new]
        texts = model.generate([(r.text, im) for _, r, im in chosen], max_new_tokens=max_new)
        for (i, _, _), text in zip(chosen, texts):
            out.texts[i] = text
    if ready["nll"]:
        losses = model.conversation_loss([(json.loads(r.messages), im) for _, r, im in ready["nll"]])
        for (i, _, _), loss in zip(ready["nll"], losses):
            out.nll[i], out.tokens[i] = loss.nll, loss.tokens
    return out
