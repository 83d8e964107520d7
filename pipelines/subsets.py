"""Which data go into a run: a dataset YAML (like the reference repo's `data/dataset.yaml`), or
every parquet shard under a directory.

    datasets:
      - name: sharegpt4v_coco
        path: s3://bucket/onevision/sharegpt4v(coco)/   # parquet shards dir (or one file), or a .json
        format: onevision_parquet                        # or llava_json
        image_root: ...                                  # llava_json: images are relative to this
        sampling_ratio: 0.5                              # a fraction in (0, 1], or "all"
        multimodal_input: false                          # optional; default: the run's flag
        pair_text: caption                               # optional; default: the run's data.ingest.pair_text

`pair_text` is how each row's contrastive pair text is chosen (`pipelines.pairs`): `caption`,
`first_assistant`, `longest_assistant`, `column:NAME` (a text column of the source) or `none`.

`${raw_dir}` in a path is the run's input directory; `${NAME}` is an environment variable.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cafe.config import PAIR_TEXT_CHOICES, is_pair_text_policy
from pipelines.storage import Storage, StorageError, basename, is_s3, normalise, parent, redact

FORMATS = ("onevision_parquet", "llava_json")
SUBSET_KEYS = ("name", "path", "format", "image_root", "sampling_ratio", "multimodal_input", "pair_text")
TOP_LEVEL_KEYS = ("datasets",)
log = logging.getLogger(__name__)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class DatasetYamlError(ValueError):
    """A dataset selection that cannot be used; the message names the subset and the problem."""


@dataclass(kw_only=True, frozen=True)
class SubsetSpec:
    name: str  # unique in a run; prefixes every id (f"{name}/{id}")
    path: str  # parquet shard directory or file, or a LLaVA .json file
    format: str = "onevision_parquet"
    image_root: str | None = None  # llava_json; default: the json file's directory
    sampling_ratio: float = 1.0
    multimodal_input: bool | None = None  # None: the run's `multimodal_input` option
    pair_text: str | None = None  # the pair-text policy; None: the run's `pair_text` option


def load_dataset_yaml(path: str, *, raw_dir: str | None = None, storage: Storage | None = None) -> list[SubsetSpec]:
    """Subsets from a dataset YAML file (local or `s3://`)."""
    storage = storage or Storage.for_uris([path])
    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise DatasetYamlError(f"dataset YAML {path!r} does not exist") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DatasetYamlError(f"dataset YAML {path!r} is not valid YAML: {e}") from None
    return parse_dataset_mapping(raw, origin=path, raw_dir=raw_dir)


def parse_dataset_mapping(raw: Any, *, origin: str = "<dataset yaml>", raw_dir: str | None = None) -> list[SubsetSpec]:
    if not isinstance(raw, dict) or "datasets" not in raw:
        raise DatasetYamlError(f"{origin}: expected a mapping with a 'datasets' list at the top level")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise DatasetYamlError(f"{origin}: unknown top-level key(s) {unknown}; valid: {list(TOP_LEVEL_KEYS)}")
    entries = raw["datasets"]
    if not isinstance(entries, list) or not entries:
        raise DatasetYamlError(f"{origin}: 'datasets' must be a non-empty list of subsets")
    subsets = [_parse_subset(entry, i, origin, raw_dir) for i, entry in enumerate(entries)]
    repeated = sorted(n for n, c in Counter(s.name for s in subsets).items() if c > 1)
    if repeated:
        raise DatasetYamlError(f"{origin}: subset name(s) {repeated} appear more than once; names must be unique")
    return subsets


def _parse_subset(entry: Any, index: int, origin: str, raw_dir: str | None) -> SubsetSpec:
    where = f"{origin}: datasets[{index}]"
    if not isinstance(entry, dict):
        raise DatasetYamlError(f"{where}: expected a mapping with keys {list(SUBSET_KEYS)}, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DatasetYamlError(f"{where}: missing or empty 'name'")
    if "/" in name:
        raise DatasetYamlError(f"{where}: subset {name!r}: '/' is not allowed in a name (it separates subset and id)")
    where = f"{origin}: subset {name!r}"
    unknown = sorted(set(entry) - set(SUBSET_KEYS))
    if unknown:
        raise DatasetYamlError(f"{where}: unknown key(s) {unknown}; valid keys: {list(SUBSET_KEYS)}")
    if not entry.get("path"):
        raise DatasetYamlError(f"{where}: missing required key 'path'")
    path = _expand(str(entry["path"]), where, raw_dir)
    fmt = entry.get("format") or ("llava_json" if path.endswith(".json") else "onevision_parquet")
    if fmt not in FORMATS:
        raise DatasetYamlError(f"{where}: unknown format {fmt!r}; valid formats: {list(FORMATS)}")
    image_root = entry.get("image_root")  # parquet rows with a path and no bytes resolve against it too
    ratio = _parse_ratio(entry.get("sampling_ratio", "all"), where)
    mm = entry.get("multimodal_input")
    if mm is not None and not isinstance(mm, bool):
        raise DatasetYamlError(f"{where}: multimodal_input must be true or false, got {mm!r}")
    pair_text = entry.get("pair_text")
    if pair_text is not None and not is_pair_text_policy(pair_text):
        raise DatasetYamlError(f"{where}: pair_text {pair_text!r} is not one of {PAIR_TEXT_CHOICES}")
    try:
        path = normalise(path)
        image_root = normalise(_expand(str(image_root), where, raw_dir)) if image_root else None
    except StorageError as e:
        raise DatasetYamlError(f"{where}: {e}") from None
    return SubsetSpec(
        name=name, path=path, format=fmt, image_root=image_root, sampling_ratio=ratio, multimodal_input=mm,
        pair_text=pair_text,
    )


def _parse_ratio(value: Any, where: str) -> float:
    if value == "all":
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise DatasetYamlError(f"{where}: sampling_ratio must be a fraction in (0, 1] or \"all\", got {value!r}")
    return float(value)


def _expand(text: str, where: str, raw_dir: str | None) -> str:
    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key == "raw_dir":
            if raw_dir is None:
                raise DatasetYamlError(f"{where}: uses ${{raw_dir}} but no input directory was given")
            return raw_dir.rstrip("/")
        if key not in os.environ:
            raise DatasetYamlError(f"{where}: uses ${{{key}}}, which is not set in the environment")
        return os.environ[key]

    return _VARIABLE.sub(substitute, text)


def discover_subsets(input_dir: str, storage: Storage | None = None) -> list[SubsetSpec]:
    """Every OneVision parquet shard under `input_dir`, one subset per folder, named after it.

    Parquet files without a `conversations` column (e.g. evaluation files written beside the
    training shards) are skipped with a warning; files whose schema cannot be read stay in, so
    that the run quarantines them by name.
    Folders whose names collide (a/x and b/x) are named by their path relative to `input_dir`
    instead. Subsets are sorted by name, so the run order does not depend on listing order.
    """
    storage = storage or Storage.for_uris([input_dir])
    root = normalise(input_dir)
    if not storage.exists(root):
        raise DatasetYamlError(f"input directory {root!r} does not exist")
    shards = storage.list_files(root, ".parquet", recursive=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        layouts = list(pool.map(lambda f: _is_onevision_shard(f, storage), shards))
    skipped = [f for f, ok in zip(shards, layouts) if not ok]
    if skipped:
        log.warning("skipping %d parquet file(s) without a 'conversations' column (not OneVision shards), e.g. %s",
                    len(skipped), redact(skipped[0]))
    shards = [f for f, ok in zip(shards, layouts) if ok]
    folders = sorted({parent(f) if not is_s3(f) else f.rsplit("/", 1)[0] for f in shards})
    if not folders:
        raise DatasetYamlError(f"no OneVision .parquet shards (with a 'conversations' column) under {redact(root)!r}")
    names = [basename(f) for f in folders]
    counts = Counter(names)
    subsets = []
    for folder, name in zip(folders, names):
        if counts[name] > 1:
            name = folder[len(root):].strip("/").replace("/", "_") or basename(root)
        subsets.append(SubsetSpec(name=name, path=folder, format="onevision_parquet"))
    return sorted(subsets, key=lambda s: s.name)


def _is_onevision_shard(uri: str, storage: Storage) -> bool:
    fs, path = storage.resolve(uri)
    try:
        return "conversations" in pq.read_schema(path, filesystem=fs).names
    except (OSError, pa.ArrowException):  # empty or truncated: nothing says it is not a shard
        return True


def default_image_root(spec: SubsetSpec) -> str | None:
    if spec.image_root:
        return spec.image_root
    if spec.format == "llava_json":
        return parent(spec.path)
    return None


__all__ = [
    "DatasetYamlError",
    "FORMATS",
    "SubsetSpec",
    "default_image_root",
    "discover_subsets",
    "load_dataset_yaml",
    "parse_dataset_mapping",
]
