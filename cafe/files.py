"""Image files named by a data set, read safely: only inside the data set's image root (after
`..` and symlinks are resolved), only regular files, and never more than a byte cap. Training
ingest and every evaluation reader go through here, so one set of checks guards them all.

A refusal is a `RefusedFile` whose `reason` the callers record as given: `path_outside_root`,
`not_a_regular_file` or `image_too_large`. A file that does not exist stays a FileNotFoundError.
"""
from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

MAX_IMAGE_BYTES = 64 << 20  # the default cap: far above any real image, far below a worker's memory
REFUSAL_REASONS = ("path_outside_root", "not_a_regular_file", "image_too_large")


class RefusedFile(ValueError):
    """An image file that is not read, with its reason (one of REFUSAL_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REFUSAL_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def confine(path: str, root: str | None) -> str:
    """`path` (relative to `root`, or absolute) as a local path with symlinks resolved, or an
    `s3://` URI, that lies inside `root`; RefusedFile("path_outside_root") otherwise."""
    if not root:
        raise RefusedFile("path_outside_root", f"{path!r}: the data set names no image root to read it under")
    if _is_s3(root) or _is_s3(path):
        return _confine_s3(path, root)
    root_dir = Path(root).resolve()
    full = (root_dir / path).resolve()  # an absolute `path` replaces the root, then must still be inside it
    if not full.is_relative_to(root_dir):
        raise RefusedFile("path_outside_root", f"{path!r} resolves to {full}, outside the image root {root_dir}")
    return str(full)


def _confine_s3(path: str, root: str) -> str:
    """Object stores have no symlinks; a key is inside the root when, `..` applied, it keeps the
    root's prefix. The URI is returned as written: the store reads that key or its normal form,
    and both are inside."""
    uri = path if _is_s3(path) else posixpath.join(root, path)
    root_key = posixpath.normpath(root.removeprefix("s3://"))
    inside = _is_s3(root) and _is_s3(uri) and posixpath.normpath(uri.removeprefix("s3://")).startswith(root_key + "/")
    if not inside:
        raise RefusedFile("path_outside_root", f"{path!r} is outside the image root {root}")
    return uri


def check_image_file(path: str, root: str | None, *, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """The confined local path of an image that can be read (a regular file of at most
    `max_bytes`), checked without opening it: for loaders that name the files before anyone
    reads them. FileNotFoundError when it does not exist."""
    full = confine(path, root)
    _check_regular(os.stat(full), full, max_bytes)
    return full


def read_regular_file(path: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a local regular file of at most `max_bytes`.

    The checks are made on the opened descriptor, so a file swapped after a check is caught too:
    a device (/dev/zero), FIFO or directory is refused before a byte is read (O_NONBLOCK: opening
    a FIFO does not wait for a writer), and at most `max_bytes + 1` bytes are ever read, so a
    file that reports a wrong size (/proc) or grows cannot exhaust memory either.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(os.fstat(fd), path, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    check_size(len(data), path, max_bytes)
    return data


def check_size(size: int, path: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise RefusedFile("image_too_large", f"{path}: more than max_image_bytes {max_bytes} bytes")


def _check_regular(info: os.stat_result, path: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise RefusedFile("not_a_regular_file", f"{path} is not a regular file")
    check_size(info.st_size, path, max_bytes)


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")
