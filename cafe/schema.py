"""The training Parquet schema: the one contract between `pipelines` (writer) and
`trainers` / `evaluation` (readers). Versioned in the file metadata."""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"cafe.schema_version"

TRAIN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # subset / data_source name
        pa.field("image", pa.binary()),  # encoded image bytes (JPEG/PNG); null for text-only rows
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # JSON list of {"role": "system"|"user"|"assistant", "content": str}; the image token is in the text
        pa.field("conversations", pa.string(), nullable=False),
        pa.field("pair_text", pa.string(), nullable=False),  # contrastive target for the image
        # multimodal_input rows (MMEB-style): query = user turn, target = assistant turn
        pa.field("query_text", pa.string()),
        pa.field("target_text", pa.string()),
        pa.field("target_image", pa.binary()),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("raw", pa.string()),  # the offending row, JSON, image bytes elided
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)
