"""pipelines: OneVision parquet / LLaVA json -> training Parquet + quarantine, nothing lost."""
from __future__ import annotations

import filecmp
import io
import json
import os
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cafe.config import IngestConfig, load_config
from cafe.schema import QUARANTINE_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, TRAIN_SCHEMA
from pipelines import units
from pipelines.ingest import IngestProgress, PipelineError, run_from_config, run_pipeline
from pipelines.onevision import write_onevision_shard
from pipelines.records import Rejected, check_conversation, normalise_conversation, prepare_image
from pipelines.subsets import DatasetYamlError, discover_subsets, load_dataset_yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
REQUIRED_REASONS = {
    "undecodable_image", "truncated_image", "missing_image_file", "image_too_large", "no_assistant_turn",
    "empty_text", "text_too_long", "image_token_mismatch", "duplicate_id", "malformed_row",
}
# small limits so that planted rows trip them while the good rows (<= 40x30) pass
OPTIONS = dict(max_image_pixels=10_000, max_text_chars=2_000, rows_per_shard=4)


def encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def jpeg(w: int = 32, h: int = 24, color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (w, h), color), "JPEG")


def noisy_jpeg(w: int = 96, h: int = 96) -> bytes:
    return encode(Image.effect_noise((w, h), 80).convert("RGB"), "JPEG")


def fv(*turns: tuple[str, str | None]) -> list[dict]:
    return [{"from": who, "value": text} for who, text in turns]


def rc(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": who, "content": text} for who, text in turns]


ASK = ("human", "<image>\nWhat is shown?")
ANSWER = ("gpt", "A red square.")


def ov_row(row_id, conversations, image_bytes=None, image_path=None):
    image = None if image_bytes is None and image_path is None else {"bytes": image_bytes, "path": image_path}
    return {"id": row_id, "image": image, "conversations": conversations, "data_source": "planted"}


def build_planted(root: Path) -> dict:
    """Two subsets (parquet shards in both conversation styles; LLaVA json + image folder) with
    one planted bad row per quarantine reason. Returns the expected outcome."""
    (root / "ov_images").mkdir(parents=True)
    (root / "ov_images" / "ok.jpg").write_bytes(jpeg(color=(0, 200, 0)))
    shard0 = [
        ov_row("g1", fv(ASK, ANSWER), jpeg()),
        ov_row("g2", fv(("human", "Describe it."), ("gpt", "A blue square.")),
               encode(Image.new("RGBA", (40, 30)), "PNG")),
        ov_row("g3", fv(("human", "What is 2+2?"), ("gpt", "4"))),
        ov_row("g4", fv(("system", "Be brief."), ASK, ("gpt", "Red."), ("human", "Sure?"), ("gpt", "Yes.")), jpeg()),
        ov_row("g5", fv(ASK, ("gpt", "A green square.")), image_path="ok.jpg"),
        ov_row("b_undecodable", fv(ASK, ANSWER), b"definitely not an image"),
        ov_row("b_truncated", fv(ASK, ANSWER), noisy_jpeg()[:1500]),
        ov_row("b_missing", fv(ASK, ANSWER), image_path="nope.jpg"),
        ov_row("b_large", fv(ASK, ANSWER), jpeg(120, 100)),
        ov_row("b_noassist", fv(ASK), jpeg()),
        ov_row("b_empty", fv(ASK, ("gpt", "   ")), jpeg()),
        ov_row("b_long", fv(ASK, ("gpt", "x" * 2500)), jpeg()),
        ov_row("b_two_tokens", fv(("human", "<image>\n<image>\nCompare."), ANSWER), jpeg()),
        ov_row("b_token_no_image", fv(ASK, ANSWER)),
        ov_row("b_no_conversations", None, jpeg()),
        ov_row(None, fv(ASK, ANSWER), jpeg()),
    ]
    shard1 = [
        ov_row("g6", rc(("user", "<image>\nName the colour."), ("assistant", "Red.")), jpeg()),
        ov_row("g1", rc(("user", "<image>\nAgain?"), ("assistant", "Red again.")), jpeg()),  # repeats shard 0
        ov_row("g7", rc(("user", "Name the colour."), ("assistant", "Red.")), jpeg()),
        ov_row("g6", rc(("user", "<image>\nOnce more."), ("assistant", "Red.")), jpeg()),  # repeats in shard
        ov_row("b_role", rc(("robot", "<image>\nBeep."), ("assistant", "Boop.")), jpeg()),
    ]
    write_onevision_shard(shard0, str(root / "ov" / "train-00000-of-00002.parquet"), row_group_size=3)
    write_onevision_shard(shard1, str(root / "ov" / "train-00001-of-00002.parquet"), conversation_style="role_content")

    (root / "lj" / "images").mkdir(parents=True)
    (root / "lj" / "images" / "a.jpg").write_bytes(jpeg(color=(10, 10, 240)))
    (root / "lj" / "images" / "b.png").write_bytes(encode(Image.new("L", (20, 10), 128), "PNG"))
    rows = [
        {"id": "j1", "image": "images/a.jpg", "conversations": fv(ASK, ("gpt", "Blue."))},
        {"id": "j2", "conversations": rc(("user", "Hello?"), ("assistant", "Hi."))},
        {"id": "j3", "image": "images/missing.jpg", "conversations": fv(ASK, ANSWER)},
        {"id": "j4", "image": ["images/a.jpg", "images/b.png"], "conversations": fv(ASK, ANSWER)},
        {"id": 5, "image": "images/b.png", "conversations": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Grey?"}]},
            {"role": "assistant", "content": "Grey."},
        ]},
        "not a row",
    ]
    (root / "lj" / "data.json").write_text(json.dumps(rows))
    (root / "datasets.yaml").write_text(
        "datasets:\n"
        "  - name: ov\n    path: ${raw_dir}/ov/\n    format: onevision_parquet\n    image_root: ${raw_dir}/ov_images\n"
        "  - name: lj\n    path: ${raw_dir}/lj/data.json\n    format: llava_json\n"
    )
    good = ["ov/g1", "ov/g2", "ov/g3", "ov/g4", "ov/g5", "ov/g6", "ov/g7", "lj/j1", "lj/j2", "lj/5"]
    bad = {
        "ov/b_undecodable": "undecodable_image", "ov/b_truncated": "truncated_image",
        "ov/b_missing": "missing_image_file", "ov/b_large": "image_too_large", "ov/b_noassist": "no_assistant_turn",
        "ov/b_empty": "empty_text", "ov/b_long": "text_too_long", "ov/b_two_tokens": "image_token_mismatch",
        "ov/b_token_no_image": "image_token_mismatch", "ov/b_no_conversations": "malformed_row",
        "ov/g1": "duplicate_id", "ov/g6": "duplicate_id", "ov/b_role": "malformed_row",
        "lj/j3": "missing_image_file", "lj/j4": "malformed_row",
    }
    return {"good": good, "bad": bad, "anonymous_bad": 2, "rows": len(shard0) + len(shard1) + len(rows)}


def read_dir(path: Path) -> list[dict]:
    rows = []
    for f in sorted(path.glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def parquet_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.parquet"))


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    assert names
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return root, build_planted(root)


def test_planted_rows_ray_job_nothing_lost_and_deterministic(ray_cluster, planted, tmp_path):
    root, expected = planted
    out, quarantine = tmp_path / "train", tmp_path / "quarantine"
    run = lambda executor, out, q: run_pipeline(  # noqa: E731
        dataset_yaml=str(root / "datasets.yaml"), input_dir=str(root), output_dir=str(out), quarantine_dir=str(q),
        options=IngestConfig(executor=executor, **OPTIONS),
    )
    summary = run("ray", out, quarantine)

    # counts add up, per subset and per reason; every required reason was exercised
    n_bad = len(expected["bad"]) + expected["anonymous_bad"]
    assert summary.read == expected["rows"] == summary.written + summary.quarantined
    assert summary.written == len(expected["good"])
    assert summary.quarantined == n_bad
    assert REQUIRED_REASONS <= set(summary.quarantined_by_reason)
    assert sum(summary.quarantined_by_reason.values()) == summary.quarantined
    assert {k: (v["read"], v["written"]) for k, v in summary.subsets.items()} == {"ov": (21, 7), "lj": (6, 3)}
    assert json.loads((out / "summary.json").read_text()) == summary.to_dict()

    # good rows in input order; bad rows each exactly once with their reason
    train = read_dir(out)
    assert [r["id"] for r in train] == expected["good"]
    bad = read_dir(quarantine)
    assert len(bad) == summary.quarantined
    by_id = {}
    for row in bad:
        if row["id"] is not None:
            assert row["id"] not in by_id or row["reason"] == "duplicate_id"
            by_id.setdefault(row["id"], set()).add(row["reason"])
    assert by_id == {k: {v} for k, v in expected["bad"].items()}
    assert sum(1 for r in bad if r["id"] is None) == expected["anonymous_bad"]
    assert sum(1 for r in bad if r["reason"] == "duplicate_id") == 2
    for row in bad:
        raw = json.loads(row["raw"])
        assert "_origin" in raw and row["detail"]
        assert len(row["raw"]) < 4000 or row["reason"] == "text_too_long"
    raw_undecodable = next(json.loads(r["raw"]) for r in bad if r["id"] == "ov/b_undecodable")
    assert raw_undecodable["image"]["bytes"] == "<23 bytes elided>"

    # schema and version in every file's metadata
    for f in list(out.glob("*.parquet")) + list(quarantine.glob("*.parquet")):
        schema = pq.read_schema(f)
        assert schema.metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()
        assert schema.equals(TRAIN_SCHEMA if f.parent == out else QUARANTINE_SCHEMA)

    # normalised conversations, derived texts, re-encoded images
    rows = {r["id"]: r for r in train}
    g1 = rows["ov/g1"]
    assert json.loads(g1["conversations"]) == [
        {"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A red square."}]
    assert g1["pair_text"] == "" and g1["query_text"] is None  # its caption, "A red square.", is too short
    assert Image.open(io.BytesIO(g1["image"])).format == "JPEG" and (g1["width"], g1["height"]) == (32, 24)
    g2 = rows["ov/g2"]
    assert json.loads(g2["conversations"])[0]["content"] == "<image>\nDescribe it."
    img2 = Image.open(io.BytesIO(g2["image"]))
    assert (img2.format, img2.mode, img2.size) == ("PNG", "RGB", (40, 30))
    assert rows["ov/g3"]["image"] is None and rows["ov/g3"]["width"] is None
    assert [t["role"] for t in json.loads(rows["ov/g4"]["conversations"])] == \
        ["system", "user", "assistant", "user", "assistant"]
    assert rows["ov/g4"]["pair_text"] == ""
    # no planted reply is long enough to pair (pipelines.pairs): counted, by reason
    assert summary.paired == 0 and summary.unpaired_by_reason == {"no_caption_turn": 5, "too_short": 5}
    assert summary.subsets["lj"]["unpaired_by_reason"] == {"no_caption_turn": 2, "too_short": 1}
    assert json.loads(rows["ov/g7"]["conversations"])[0]["content"] == "<image>\nName the colour."
    assert json.loads(rows["lj/5"]["conversations"])[0]["content"] == "<image>\nGrey?"
    assert rows["ov/g5"]["image"] and rows["lj/j1"]["image"]

    # re-run into the same place: byte-identical, nothing duplicated, no staging left behind
    before = {n: (out / n).read_bytes() for n in parquet_files(out)}
    again = run("ray", out, quarantine)
    assert again.to_dict() == summary.to_dict()
    assert {n: (out / n).read_bytes() for n in parquet_files(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quarantine", "train"]
    # the one-process loop writes the very same files
    local = run("local", tmp_path / "local", tmp_path / "local-q")
    assert_same_files(out, tmp_path / "local", parquet_files(out))
    assert_same_files(quarantine, tmp_path / "local-q", parquet_files(quarantine))
    ray_summary = (out / "summary.json").read_text()
    local_summary = (tmp_path / "local" / "summary.json").read_text()
    assert ray_summary.replace(str(tmp_path / "train"), "X").replace(str(tmp_path / "quarantine"), "Y") == \
        local_summary.replace(str(tmp_path / "local-q"), "Y").replace(str(tmp_path / "local"), "X")
    assert local.written == summary.written


def test_multimodal_input_resize_and_sampling(tmp_path):
    rows = [ov_row(f"r{i}", fv(ASK, ("gpt", f"Caption {i}.")), jpeg(64, 32)) for i in range(60)]
    write_onevision_shard(rows, str(tmp_path / "in" / "mm" / "a.parquet"))
    (tmp_path / "d.yaml").write_text(
        f"datasets:\n  - name: mm\n    path: {tmp_path / 'in' / 'mm'}\n"
        "    sampling_ratio: 0.5\n    multimodal_input: true\n"
    )
    options = IngestConfig(executor="local", max_side=16, rows_per_shard=16)
    first = run_pipeline(dataset_yaml=str(tmp_path / "d.yaml"), output_dir=str(tmp_path / "o1"), options=options)
    second = run_pipeline(dataset_yaml=str(tmp_path / "d.yaml"), output_dir=str(tmp_path / "o2"), options=options)
    assert first.read + first.sampled_out == 60 and 15 <= first.read <= 45 and first.quarantined == 0
    kept = read_dir(tmp_path / "o1")
    assert [r["id"] for r in kept] == [r["id"] for r in read_dir(tmp_path / "o2")] and second.read == first.read
    row = kept[0]
    n = int(row["id"].split("/r")[1])
    assert (row["query_text"], row["target_text"], row["pair_text"]) == \
        ("What is shown?", f"Caption {n}.", "")  # the target is the reply; two words are no contrastive pair
    assert (row["width"], row["height"]) == (16, 8) == Image.open(io.BytesIO(row["image"])).size


def test_experiment_config_sets_the_conversion(tmp_path):
    """`cafe data --set data.ingest.<key>=...` reaches the job: resize, executor, shard size."""
    rows = [ov_row(f"r{i}", fv(ASK, ("gpt", f"Caption {i}.")), jpeg(64, 32)) for i in range(5)]
    write_onevision_shard(rows, str(tmp_path / "raw" / "s" / "a.parquet"))
    cfg = load_config("configs/demo.yaml", [
        f"data.raw_dir={tmp_path / 'raw'}", "data.dataset_yaml=''", f"data.train_dir={tmp_path / 'train'}",
        f"data.quarantine_dir={tmp_path / 'q'}", "data.ingest.max_side=16", "data.ingest.executor=local",
        "data.ingest.rows_per_shard=2",
    ])
    summary = run_from_config(cfg.data)
    assert summary.written == 5 and len(summary.train_files) == 3
    assert summary.options["max_side"] == 16 and summary.options["rows_per_shard"] == 2
    assert {(r["width"], r["height"]) for r in read_dir(tmp_path / "train")} == {(16, 8)}


def test_conversation_styles_normalise_alike():
    a = normalise_conversation(fv(("system", "S"), ("human", "Q"), ("gpt", "A")))
    b = normalise_conversation(rc(("system", "S"), ("user", "Q"), ("assistant", "A")))
    c = normalise_conversation(json.dumps(rc(("system", "S"), ("user", "Q"), ("assistant", "A"))))
    assert a == b == c == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}]
    with_image = check_conversation(a, has_image=True, max_text_chars=100)
    assert with_image[1]["content"] == "<image>\nQ" and a[1]["content"] == "Q"
    for turns, reason in [
        (fv(("gpt", "A"), ("human", "Q")), "malformed_row"),
        (fv(("human", "Q <image>"), ("gpt", "A <image>")), "image_token_mismatch"),
        (fv(("human", "Q"), ("gpt", "<image>")), "image_token_mismatch"),
    ]:
        with pytest.raises(Rejected) as err:
            check_conversation(normalise_conversation(turns), has_image=True, max_text_chars=100)
        assert err.value.reason == reason


def test_prepare_image_policy():
    jpg = prepare_image(jpeg(300, 100), max_image_pixels=10**6, max_side=150)
    assert (jpg.format, jpg.width, jpg.height) == ("JPEG", 150, 50)
    png = prepare_image(encode(Image.new("P", (10, 20)), "GIF"), max_image_pixels=10**6)
    assert (png.format, Image.open(io.BytesIO(png.data)).mode) == ("PNG", "RGB")
    assert prepare_image(jpeg(), max_image_pixels=10**6).data == prepare_image(jpeg(), max_image_pixels=10**6).data
    for data, reason in [(b"", "undecodable_image"), (noisy_jpeg()[:1500], "truncated_image"),
                         (jpeg(200, 200), "image_too_large")]:
        with pytest.raises(Rejected) as err:
            prepare_image(data, max_image_pixels=10_000)
        assert err.value.reason == reason


@pytest.mark.parametrize(
    "entry, message",
    [
        ("  - name: coco\n    path: {p}\n    sampling: 0.5\n", "subset 'coco': unknown key(s) ['sampling']"),
        ("  - name: coco\n    path: {p}\n    format: webdataset\n", "subset 'coco': unknown format 'webdataset'"),
        ("  - name: coco\n    format: llava_json\n", "subset 'coco': missing required key 'path'"),
        ("  - name: coco\n    path: {p}\n    sampling_ratio: 2\n", "subset 'coco': sampling_ratio must be"),
        ("  - name: coco\n    path: {p}\n  - name: coco\n    path: {p}\n", "['coco'] appear more than once"),
        ("  - name: coco\n    path: {p}\n    pair_text: captions\n", "subset 'coco': pair_text 'captions' is not"),
        ("  - name: coco\n    path: ${{NOT_SET_ANYWHERE_42}}/x\n", "subset 'coco': uses ${{NOT_SET_ANYWHERE_42}}"),
    ],
)
def test_dataset_yaml_errors_name_subset_and_problem(tmp_path, entry, message):
    (tmp_path / "d.yaml").write_text("datasets:\n" + entry.format(p=tmp_path))
    with pytest.raises(DatasetYamlError) as err:
        load_dataset_yaml(str(tmp_path / "d.yaml"))
    assert message.format() in str(err.value)


def test_missing_path_and_bad_top_level_are_clear(tmp_path):
    (tmp_path / "d.yaml").write_text(f"datasets:\n  - name: gone\n    path: {tmp_path / 'nowhere'}/\n")
    with pytest.raises(DatasetYamlError, match=r"subset 'gone': path .*nowhere' does not exist"):
        run_pipeline(dataset_yaml=str(tmp_path / "d.yaml"), output_dir=str(tmp_path / "o"),
                     options=IngestConfig(executor="local"))
    assert not (tmp_path / "o").exists()
    (tmp_path / "e.yaml").write_text("subsets: []\n")
    with pytest.raises(DatasetYamlError, match="'datasets' list"):
        load_dataset_yaml(str(tmp_path / "e.yaml"))


def test_no_yaml_every_folder_is_a_subset(tmp_path):
    for folder in ("b_set", "a_set"):
        write_onevision_shard([ov_row("1", fv(ASK, ANSWER), jpeg())],
                              str(tmp_path / "raw" / "onevision" / folder / "x.parquet"))
    (tmp_path / "raw" / "eval").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "caption": [["a caption"]]}), tmp_path / "raw" / "eval" / "test.parquet")
    assert [s.name for s in discover_subsets(str(tmp_path / "raw"))] == ["a_set", "b_set"]
    summary = run_pipeline(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "o"),
                           options=IngestConfig(executor="local"))
    assert [r["id"] for r in read_dir(tmp_path / "o")] == ["a_set/1", "b_set/1"] and summary.written == 2


def test_example_dataset_yamls_parse(tmp_path):
    scenes = load_dataset_yaml(str(REPO / "configs/datasets/scenes.yaml"), raw_dir="runs/demo/raw")
    assert [s.name for s in scenes] == ["scenes_caption"]
    assert scenes[0].path == os.path.abspath("runs/demo/raw/onevision/scenes_caption")
    assert scenes[0].pair_text == "caption"
    reference = load_dataset_yaml(str(REPO / "configs/datasets/onevision_reference.yaml"), raw_dir="s3://bucket/ov")
    assert [s.name for s in reference] == [
        "sharegpt4o", "sharegpt4v(coco)", "sharegpt4v(knowledge)", "sharegpt4v(llava)", "sharegpt4v(sam)",
        "image_textualization(filtered)"]
    assert reference[1].path == "s3://bucket/ov/sharegpt4v(coco)"


def test_failed_run_leaves_previous_output(tmp_path, monkeypatch):
    write_onevision_shard([ov_row(str(i), fv(ASK, ANSWER), jpeg()) for i in range(6)],
                          str(tmp_path / "in" / "s" / "a.parquet"))
    options = IngestConfig(executor="local", rows_per_shard=2)
    run_pipeline(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o"), options=options)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    real_write = units._write

    def flaky_write(records, schema, uri, *args):
        if uri.endswith("00001.parquet"):
            raise OSError("disk full")
        return real_write(records, schema, uri, *args)

    monkeypatch.setattr(units, "_write", flaky_write)
    with pytest.raises(PipelineError, match="disk full"):
        run_pipeline(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o"), options=options)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o", "o-quarantine"]


def test_unreadable_chunk_is_quarantined_by_position(tmp_path, monkeypatch):
    write_onevision_shard([ov_row(str(i), fv(ASK, ANSWER), jpeg()) for i in range(5)],
                          str(tmp_path / "in" / "s" / "a.parquet"))
    real_load = units._load_rows
    def load_rows(unit, storage):
        if unit.row_start:  # every chunk but the first
            raise OSError("bad page")
        return real_load(unit, storage)

    monkeypatch.setattr(units, "_load_rows", load_rows)
    options = IngestConfig(executor="local", rows_per_shard=2)
    summary = run_pipeline(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o"), options=options)
    assert (summary.read, summary.written, summary.quarantined_by_reason) == (5, 2, {"unreadable_source": 3})
    assert [json.loads(r["raw"])["_origin"]["row"] for r in read_dir(tmp_path / "o-quarantine")] == [2, 3, 4]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    write_onevision_shard([ov_row("1", fv(ASK, ANSWER), jpeg())], str(tmp_path / "in" / "s" / "a.parquet"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="refusing to replace"):
        run_pipeline(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "home"),
                     options=IngestConfig(executor="local"))
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_summary_logged_to_active_mlflow_run(tmp_path, monkeypatch):
    logged = {}
    fake = types.SimpleNamespace(
        active_run=lambda: object(),
        log_metrics=lambda m: logged.setdefault("metrics", m),
        log_dict=lambda d, name: logged.setdefault("artifact", (name, d)),
    )
    monkeypatch.setitem(__import__("sys").modules, "mlflow", fake)
    write_onevision_shard([ov_row("1", fv(ASK, ANSWER), jpeg()), ov_row("2", fv(ASK), jpeg())],
                          str(tmp_path / "in" / "s" / "a.parquet"))
    summary = run_pipeline(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o"),
                           options=IngestConfig(executor="local"))
    metrics = logged["metrics"]
    assert (metrics["data/read"], metrics["data/written"], metrics["data/quarantined"]) == (2, 1, 1)
    assert metrics["data/quarantined/no_assistant_turn"] == 1 and metrics["data/quarantined/duplicate_id"] == 0
    assert logged["artifact"] == ("data/summary.json", summary.to_dict())


def test_ingest_progress_counts_units_rows_and_gives_an_eta(capsys, monkeypatch):
    clock = iter([0.0, 5.0, 15.0, 25.0, 26.0])
    monkeypatch.setattr("pipelines.ingest.time.perf_counter", lambda: next(clock))
    progress = IngestProgress(4, every_s=10.0)  # created at t=0
    progress.unit_done({"written": 500, "quarantined": 0})  # t=5: too soon for a line
    progress.unit_done({"written": 480, "quarantined": 20})  # t=15: 1 unit in 10 s since the first
    progress.unit_done({"written": 500, "quarantined": 0})  # t=25: 2 units in 20 s
    progress.unit_done({"written": 500, "quarantined": 0})  # t=26: the last unit prints nothing
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[data] 2/4 units | 980 rows written, 20 quarantined | 0.10 units/s | ETA 0:20",
                     "[data] 3/4 units | 1,480 rows written, 20 quarantined | 0.10 units/s | ETA 0:10"]
