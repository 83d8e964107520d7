"""What a run's checkpoints are allowed to do to a user's files: a finished run is reused, never
re-reported; an exported model is replaced only by a complete one; a checkpoint is loaded only
when every file still has the hash it was saved with."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

LOG = logging.getLogger("cafe.train")
STATE_FILE = "cafe_state.json"  # in every checkpoint: the step it was taken at (rank 0)
HF_EXPORT_DIR = "hf"  # inside the final checkpoint: a from_pretrained-ready model
MANIFEST = "manifest_rank{rank}.json"  # each rank's files in a checkpoint, with their SHA-256
# Ray Train's record of the run's reported checkpoints, in the run folder (ray.train.v2 constants)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used as it is: one line saying what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, rank: int) -> None:
    """Record the hash of every file this rank put in `folder` (its part of a checkpoint)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("manifest_rank"))
    entries = {str(p.relative_to(folder)): _sha256(p) for p in files}
    (folder / MANIFEST.format(rank=rank)).write_text(json.dumps(entries, indent=0, sort_keys=True))


def verify_manifests(folder: Path) -> None:
    """Refuse a checkpoint whose files differ from what its ranks wrote (a partial copy, a
    rewrite by someone else): DeepSpeed unpickles what it loads, so nothing unverified is read."""
    manifests = sorted(folder.glob("manifest_rank*.json"))
    if not manifests:
        raise CheckpointError(f"checkpoint {folder} has no manifest: it was not written by this trainer, or only "
                              "partly copied; restore it, or delete the run folder to train again from the start")
    for manifest in manifests:
        for name, digest in json.loads(manifest.read_text()).items():
            path = folder / name
            if not path.is_file() or _sha256(path) != digest:
                raise CheckpointError(f"checkpoint {folder}: {name} is missing or differs from the hash written at "
                                      "save time; restore the checkpoint, or delete the run folder to train again "
                                      "from the start")


@dataclass(frozen=True)
class RunFolder:
    """Ray Train's folder of one run (`storage_path/name`), read before Ray is asked to resume it."""

    path: str
    filesystem: pyarrow.fs.FileSystem

    def _read(self, path: str) -> bytes | None:
        try:
            with self.filesystem.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def _exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def registered(self) -> tuple[list[str], str | None]:
        """The checkpoint folders Ray Train has registered for this run, and the latest of them."""
        raw = self._read(f"{self.path}/{RAY_SNAPSHOT}")
        if raw is None:
            return [], None
        try:
            snapshot = json.loads(raw)
            names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{self.path}/{RAY_SNAPSHOT} cannot be read ({err}); delete {self.path} to "
                                  "start the run afresh") from None
        return names, latest

    def check(self) -> str | None:
        """The latest registered checkpoint's path, after checking every registered one exists
        (Ray would stop with a traceback otherwise)."""
        names, latest = self.registered()
        missing = [n for n in names if not self._exists(f"{self.path}/{n}")]
        if missing:
            raise CheckpointError(f"the run folder {self.path} lists checkpoint {missing[0]}, which no longer exists; "
                                  f"restore it, or delete {self.path} to train again from the start (its MLflow run "
                                  "continues)")
        return f"{self.path}/{latest}" if latest else None

    def verified_latest(self) -> str | None:
        """`check`, and on a local disk the latest checkpoint's hashes too, so that a damaged one
        is one line here rather than a failure in every worker (which Ray would retry)."""
        latest = self.check()
        if latest is not None and isinstance(self.filesystem, pyarrow.fs.LocalFileSystem):
            verify_manifests(Path(latest))
        return latest

    def finished_checkpoint(self, total_steps: int) -> str | None:
        """The latest checkpoint when it is the run's last (taken at `total_steps`, with the export)."""
        latest = self.verified_latest()
        if latest is None or not self._exists(f"{latest}/{HF_EXPORT_DIR}/config.json"):
            return None
        state = self._read(f"{latest}/{STATE_FILE}")
        return latest if state is not None and json.loads(state)["step"] >= total_steps else None

    def remove_orphans(self) -> list[str]:
        """Delete checkpoint folders Ray never registered (written by workers whose driver had
        died): a resumed run writes those steps again, under the same names."""
        names, _ = self.registered()
        listing = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        orphans = sorted(info.base_name for info in listing if info.type == pyarrow.fs.FileType.Directory
                         and info.base_name.startswith(CHECKPOINT_PREFIX) and info.base_name not in names)
        for name in orphans:
            self.filesystem.delete_dir(f"{self.path}/{name}")
        if orphans:
            LOG.warning(f"[train] removed {len(orphans)} checkpoint(s) that no driver registered, left by an "
                        f"earlier launch that ended abruptly: {', '.join(orphans)}")
        return orphans


def publish_model(source: Path, target: Path) -> Path:
    """Copy a model folder to `target` so that `target` is, at every moment, either the old model
    or the new one complete: the copy goes to `<target>.partial`, then two renames swap it in."""
    partial, previous = target.with_name(target.name + ".partial"), target.with_name(target.name + ".previous")
    recover_published(target)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def recover_published(target: Path) -> None:
    """A swap cut between its two renames leaves the old model at `<target>.previous`: put it
    back. Cut while the old one was being deleted, it leaves both: finish the deletion."""
    previous = target.with_name(target.name + ".previous")
    if previous.exists() and not target.exists():
        previous.rename(target)
    elif previous.exists():
        shutil.rmtree(previous)
