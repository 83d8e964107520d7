"""Local paths and `s3://` URIs behind one pyarrow filesystem API.

Credentials and the endpoint come from the environment only (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`). URIs that carry credentials or query options are
refused, so a secret never lands in a config, a log line, a summary or a quarantine row.

A `Storage` is built once on the driver and shipped (pickled) to Ray tasks: workers started
before the environment was set still get the same filesystem.
"""
from __future__ import annotations

import concurrent.futures
import os
import posixpath
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cafe.files import check_size, read_regular_file


class StorageError(ValueError):
    """A path or URI that cannot be used."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts; works for local paths and `s3://` URIs alike."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(os.path.abspath(uri))


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(os.path.normpath(uri))


def normalise(uri: str) -> str:
    """Absolute local paths (Ray workers may run elsewhere); `s3://` URIs without a trailing slash."""
    if is_s3(uri):
        check_s3_uri(uri)
        return uri.rstrip("/")
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri.split('://', 1)[0]}://...; use a local path or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def check_s3_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise StorageError("s3 URIs must not embed credentials; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
    if parts.query or parts.fragment:
        raise StorageError(f"s3://{parts.netloc}{parts.path}: query options are not supported; use AWS_* variables")
    if not parts.netloc:
        raise StorageError(f"{uri!r}: missing bucket name")


def s3_filesystem_from_env(env: dict[str, str] | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from AWS_* variables (never logged)."""
    env = dict(os.environ if env is None else env)
    kwargs: dict = {}
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@dataclass
class Storage:
    """Resolves local paths and `s3://` URIs to (pyarrow filesystem, path)."""

    s3: pafs.S3FileSystem | None = None
    local: pafs.LocalFileSystem = field(default_factory=pafs.LocalFileSystem)

    @classmethod
    def for_uris(cls, uris: list[str]) -> Storage:
        """Build the S3 filesystem (from the environment) only when some URI needs it."""
        return cls(s3=s3_filesystem_from_env() if any(is_s3(u) for u in uris if u) else None)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(uri):
            check_s3_uri(uri)
            if self.s3 is None:
                self.s3 = s3_filesystem_from_env()
            return self.s3, uri[len("s3://"):].rstrip("/")
        return self.local, normalise(uri)

    def info(self, uri: str) -> pafs.FileInfo:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path)

    def exists(self, uri: str) -> bool:
        return self.info(uri).type != pafs.FileType.NotFound

    def list_files(self, uri: str, suffix: str, *, recursive: bool = False) -> list[str]:
        """Files in `uri` ending in `suffix`, sorted, as URIs/paths like `uri`; hidden ones skipped."""
        fs, path = self.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        rel = sorted(
            i.path[len(path):].lstrip("/")
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix) and not _hidden(i.path[len(path):])
        )
        return [join(uri.rstrip("/") if is_s3(uri) else normalise(uri), r) for r in rel]

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_capped(self, uri: str, *, max_bytes: int) -> bytes:
        """A file's bytes, refused unread (`cafe.files.RefusedFile`) when larger than `max_bytes`
        or, on a local disk, not a regular file (an object store holds nothing else)."""
        if not is_s3(uri):
            return read_regular_file(normalise(uri), max_bytes=max_bytes)
        fs, path = self.resolve(uri)
        with fs.open_input_file(path) as f:
            check_size(f.size(), uri, max_bytes)
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.resolve(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def remove_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def make_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        fs.create_dir(path, recursive=True)

    def publish_dir(self, staging: str, final: str) -> None:
        """Replace `final` by `staging`.

        Local: two renames (the old directory is moved aside first, then deleted), so `final`
        is always either the old complete output or the new complete one. S3 has no rename:
        the old objects are deleted, then the staged ones copied server-side; a crash in between
        leaves `final` without its `summary.json`, which is written last (see `ingest`).
        """
        fs, src = self.resolve(staging)
        _, dst = self.resolve(final)
        if isinstance(fs, pafs.LocalFileSystem):
            old = _sibling(dst, "old")
            if os.path.lexists(old):
                fs.delete_dir(old)
            if os.path.exists(dst):
                os.rename(dst, old)
            os.rename(src, dst)
            if os.path.lexists(old):
                fs.delete_dir(old)
            return
        if fs.get_file_info(dst).type != pafs.FileType.NotFound:
            fs.delete_dir(dst)
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(src, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File]
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:  # server-side copies
            list(pool.map(lambda path: fs.copy_file(path, dst + path[len(src):]), files))
        fs.delete_dir(src)


def staging_path(final: str) -> str:
    """A deterministic hidden sibling of `final` to build the new output in."""
    return join(parent(final), f".{basename(final)}.staging")


def _sibling(path: str, tag: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}")


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.strip("/").split("/"))


def redact(uri: str) -> str:
    """A URI safe to print: no user info, no query string."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
