"""Training-Parquet rows (cafe/schema.py) -> `Example`s for the collator."""
from __future__ import annotations

import io
import json

from PIL import Image

from cafe.batch import Example


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def example_from_row(row: dict, *, multimodal_input: bool = False) -> Example:
    images = [decode_image(row["image"])] if row.get("image") else []
    messages = json.loads(row["conversations"])
    if not multimodal_input:
        return Example(images=images, messages=messages, target_text=row["pair_text"] or None)  # "": no pair
    target_images = [decode_image(row["target_image"])] if row.get("target_image") else []
    return Example(images=images, messages=messages, target_text=row.get("target_text") or None,
                   query_text=row.get("query_text") or None, target_images=target_images)
