"""The LLaVA-OneVision-Data parquet layout (the pipeline's input), for writers of such shards:
the synthetic scenes, the benchmark and the tests."""
from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import Storage

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def onevision_schema(conversation_style: Literal["from_value", "role_content"] = "from_value") -> pa.Schema:
    keys = ("from", "value") if conversation_style == "from_value" else ("role", "content")
    turn = pa.struct([(keys[0], pa.string()), (keys[1], pa.string())])
    return pa.schema(
        [("id", pa.string()), ("image", IMAGE_TYPE), ("conversations", pa.list_(turn)), ("data_source", pa.string())]
    )


def write_onevision_shard(
    rows: list[dict[str, Any]],
    path: str,
    *,
    conversation_style: Literal["from_value", "role_content"] = "from_value",
    row_group_size: int | None = None,
    storage: Storage | None = None,
) -> None:
    """Write rows ({id, image: {bytes, path} | None, conversations, data_source}) as one shard."""
    storage = storage or Storage.for_uris([path])
    table = pa.Table.from_pylist(rows, schema=onevision_schema(conversation_style))
    fs, fs_path = storage.resolve(path)
    parent = fs_path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    pq.write_table(table, fs_path, filesystem=fs, row_group_size=row_group_size)
