"""trainers/checkpoints.py without Ray: a checkpoint loads only as its ranks wrote it, a run
folder is read as Ray Train left it, and an exported model is swapped, never half-written."""
import json
from pathlib import Path

import pyarrow.fs
import pytest

from trainers.checkpoints import (
    CheckpointError,
    RunFolder,
    publish_model,
    recover_published,
    verify_manifests,
    write_manifest,
)


def checkpoint(folder: Path, step: int, *, export: bool) -> Path:
    """A checkpoint as two ranks leave it: each its own files and manifest, rank 0 the state."""
    staging = folder / f"ranks_{step}"
    for rank in (0, 1):
        part = staging / f"rank{rank}"
        (part / "deepspeed").mkdir(parents=True)
        (part / "deepspeed" / f"optim_rank{rank}.pt").write_bytes(bytes([rank]) * 100)
        if rank == 0:
            (part / "cafe_state.json").write_text(json.dumps({"step": step}))
            if export:
                (part / "hf").mkdir()
                (part / "hf" / "config.json").write_text("{}")
        write_manifest(part, rank)
    merged = folder / f"checkpoint_{step:07d}"  # Ray Train merges the ranks' folders into one
    for rank in (0, 1):
        for path in (staging / f"rank{rank}").rglob("*"):
            if path.is_file():
                target = merged / path.relative_to(staging / f"rank{rank}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return merged


def test_a_checkpoint_loads_only_as_written(tmp_path):
    merged = checkpoint(tmp_path, 10, export=False)
    verify_manifests(merged)
    (merged / "deepspeed" / "optim_rank1.pt").write_bytes(b"pickled code")
    with pytest.raises(CheckpointError, match="deepspeed/optim_rank1.pt is missing or differs from the hash"):
        verify_manifests(merged)
    (merged / "deepspeed" / "optim_rank1.pt").unlink()
    with pytest.raises(CheckpointError, match="optim_rank1.pt is missing"):
        verify_manifests(merged)
    for manifest in merged.glob("manifest_rank*.json"):
        manifest.unlink()
    with pytest.raises(CheckpointError, match="has no manifest"):
        verify_manifests(merged)


def run_folder(tmp_path: Path, registered: list[str]) -> RunFolder:
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in registered],
                "latest_checkpoint_result": {"checkpoint_dir_name": registered[-1]} if registered else None}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return RunFolder(str(tmp_path), pyarrow.fs.LocalFileSystem())


def test_a_finished_run_is_found_and_orphans_removed(tmp_path):
    checkpoint(tmp_path, 10, export=False)
    checkpoint(tmp_path, 20, export=True)
    checkpoint(tmp_path, 30, export=True)  # written by workers after their driver died: never registered
    folder = run_folder(tmp_path, ["checkpoint_0000010", "checkpoint_0000020"])
    assert folder.finished_checkpoint(20) == f"{tmp_path}/checkpoint_0000020"
    assert folder.finished_checkpoint(40) is None  # a longer run: not finished, resumed by Ray
    assert folder.remove_orphans() == ["checkpoint_0000030"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_0*")) == ["checkpoint_0000010", "checkpoint_0000020"]


def test_a_damaged_latest_checkpoint_is_refused_before_any_worker_starts(tmp_path):
    checkpoint(tmp_path, 10, export=True)
    (tmp_path / "checkpoint_0000010" / "deepspeed" / "optim_rank0.pt").write_bytes(b"not what was saved")
    with pytest.raises(CheckpointError, match="differs from the hash written at save time; restore the checkpoint"):
        run_folder(tmp_path, ["checkpoint_0000010"]).finished_checkpoint(20)


def test_a_registered_checkpoint_that_is_gone_is_one_line(tmp_path):
    checkpoint(tmp_path, 10, export=False)
    folder = run_folder(tmp_path, ["checkpoint_0000010", "checkpoint_0000020"])
    with pytest.raises(CheckpointError, match=r"lists checkpoint checkpoint_0000020, which no longer exists; restore"):
        folder.finished_checkpoint(20)
    (tmp_path / "fresh").mkdir()
    assert run_folder(tmp_path / "fresh", []).finished_checkpoint(20) is None


def test_publishing_swaps_in_a_complete_model(tmp_path):
    old, new, target = tmp_path / "old", tmp_path / "new", tmp_path / "model"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    publish_model(old, target)
    publish_model(new, target)
    assert (target / "config.json").read_text() == "new"
    assert not any(p.name.startswith("model.") for p in tmp_path.iterdir())
    # a swap cut between its two renames: the previous model is put back
    target.rename(tmp_path / "model.previous")
    recover_published(target)
    assert (target / "config.json").read_text() == "new"
    # cut while the old model was being deleted: the deletion is finished, the next swap works
    (tmp_path / "model.previous").mkdir()
    (tmp_path / "model.previous" / "config.json").write_text("old")
    publish_model(old, target)
    assert (target / "config.json").read_text() == "old" and not (tmp_path / "model.previous").exists()
