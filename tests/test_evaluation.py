"""The whole scorecard: the Ray actor pool and the training-worker backend against the
in-process path, every suite on the embedded scenes, logging into an existing MLflow run,
and bad input (missing image file, undecodable bytes, unknown suite, missing data set)."""
import collections
import dataclasses
import io
import json
import pickle
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient

from cafe.config import EvalConfig, ExperimentConfig, load_config
from cafe.inference import InferenceModel
from evaluation.backends import ActorPool, in_process, model_call, rank_share, training_workers
from evaluation.generation import is_short_answer, load_exchanges
from evaluation.requests import Answers, Request
from evaluation.run import RunRef, evaluate_checkpoint
from evaluation.scorecard import majority_notes
from evaluation.suites import generation_task, prepare_tasks
from pipelines.scenes import CAPTION_TEMPLATES, Scene, caption, write_scene_dataset
from tests.conftest import random_image

WORLD = 2


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = random.Random(seed)
    random_image(rng, rng.randint(40, 90), rng.randint(40, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Every op, with an undecodable image and a missing image file among them."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "ok.png").write_bytes(png(9))
    conv = json.dumps([{"role": "user", "content": "<image>\nDescribe."},
                       {"role": "assistant", "content": "a red star"}])
    return ([Request("embed", image=png(i)) for i in range(5)]
            + [Request("embed", image=b"not an image"), Request("embed", image_path=str(folder / "missing.png"))]
            + [Request("embed", text=t) for t in ("red circle", "a blue square at the top left", "two")]
            + [Request("embed", text="<image>\nwhich is red", image_path=str(folder / "ok.png"))]
            + [Request("generate", text="Is there a red circle?", image=png(i), max_new_tokens=4) for i in range(3)]
            + [Request("nll", image=png(i), messages=conv) for i in range(3)])


def assert_same_answers(a, b):
    assert a.errors == b.errors
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    assert a.texts == b.texts
    np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_actor_pool_matches_in_process(tiny_checkpoint, requests, ray_cluster):
    local = in_process(InferenceModel.load(tiny_checkpoint, batch_size=32))(requests)
    pool = ActorPool(num_actors=2, cpus_per_actor=0.5)
    pooled = pool.backend(str(tiny_checkpoint), batch_size=4)(requests)
    assert_same_answers(pooled, local)
    assert_same_answers(pool.backend(str(tiny_checkpoint), batch_size=4)(requests), local)  # warm: a second call
    pool.close()
    assert [bool(e) for e in local.errors] == [i in (5, 6) for i in range(len(requests))]
    assert "not an image" in local.errors[5] and "missing.png" in local.errors[6]
    assert not local.embeddings[5].any()
    assert local.tokens[-1] > 0 and local.nll[-1] > 0


def _worker(rank: int, checkpoint: str, store_path: str, out_dir: str, requests: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        answers = training_workers(InferenceModel.load(checkpoint, batch_size=3), rank, WORLD)(requests)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(answers, f)
    finally:
        dist.destroy_process_group()


def test_every_rank_makes_the_same_model_calls():
    """ZeRO-3 needs the ranks in lockstep: the same ops, and generation budgets, in the same
    counts, even when one budget has a single request (found as a hang in the live scorecard)."""
    requests = [Request("embed", text=f"t{i}") for i in range(5)]
    requests += [Request("generate", text=f"q{i}", max_new_tokens=8) for i in range(4)]
    requests += [Request("generate", text="caption", max_new_tokens=64), Request("nll", messages="[]")]
    shares = [rank_share(requests, rank, 2) for rank in range(2)]
    calls = [sorted(model_call(requests[i]) for i in share) for share in shares]
    assert calls[0] == calls[1]
    assert set(shares[0]) | set(shares[1]) == set(range(len(requests)))


def test_training_workers_match_in_process(tiny_checkpoint, requests, tmp_path):
    mp.spawn(_worker, args=(str(tiny_checkpoint), str(tmp_path / "store"), str(tmp_path), requests), nprocs=WORLD)
    local = in_process(InferenceModel.load(tiny_checkpoint, batch_size=32))(requests)
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            assert_same_answers(pickle.load(f), local)


@pytest.fixture(scope="module")
def scenes_config(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("scenes")
    write_scene_dataset(root, train_images=4, eval_images=10, image_size=64, seed=0)
    cfg = load_config(None, [f"output_dir={root}/out", f"data.eval_dir={root}/eval", "eval.batch_size=8"])
    return cfg


def test_every_suite_on_the_scenes_into_one_run(tiny_checkpoint, scenes_config, tmp_path, ray_cluster):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id

    card = evaluate_checkpoint(scenes_config, tiny_checkpoint, tracking=RunRef(client.tracking_uri, run_id), step=7,
                               label="trained")
    reference = evaluate_checkpoint(scenes_config, tiny_checkpoint, use_ray=False, report_dir=tmp_path / "local")
    assert card.metrics == pytest.approx(reference.metrics, rel=1e-6, abs=1e-6)

    m = card.metrics
    names = ({f"eval/retrieval/scenes/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
             | {"eval/mmeb/scenes/overall", "eval/mmeb/scenes/meta/retrieval", "eval/mmeb/scenes/meta/vqa",
                "eval/mmeb/scenes/subset/SceneCaption_i2t", "eval/mmeb/scenes/subset/SceneVQA"}
             | {f"eval/pope/scenes/{c}{k}" for c in ("", "random/", "popular/", "adversarial/")
                for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
             | {f"eval/generation/scenes/{k}" for k in ("caption_loss", "perplexity", "qa_exact_match", "scene_match")})
    assert names <= m.keys()
    assert m["eval/mmeb/scenes/overall"] == pytest.approx(
        (m["eval/mmeb/scenes/subset/SceneCaption_i2t"] + m["eval/mmeb/scenes/subset/SceneVQA"]) / 2)
    assert m["eval/generation/scenes/perplexity"] == pytest.approx(np.exp(m["eval/generation/scenes/caption_loss"]))
    assert m["eval/generation/scenes/scene_match_count"] == 10  # every held-out scene's greedy caption
    assert m["eval/pope/scenes/count"] == sum(m[f"eval/pope/scenes/{c}/count"]
                                              for c in ("random", "popular", "adversarial"))

    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no second run
    assert client.get_run(run_id).data.metrics == pytest.approx(m)
    assert {h.step for h in client.get_metric_history(run_id, "eval/pope/scenes/f1")} == {7}
    artifacts = {a.path for a in client.list_artifacts(run_id, "scorecards/trained")}
    assert artifacts == {f"scorecards/trained/{f}"
                         for f in ("scorecard.json", "scorecard.md", "modality_gap_scenes.png")}
    report = json.loads((tmp_path / "local" / "scorecard.json").read_text())
    assert report["metrics"] == pytest.approx(reference.metrics)
    generation = next(s for s in report["suites"] if s["suite"] == "generation")
    assert len(generation["samples"]) == scenes_config.eval.caption_samples
    assert {"truth", "greedy"} <= generation["samples"][0].keys()


def test_scene_match_scores_each_scenes_greedy_caption(scenes_config):
    """Answers written by hand: the true caption for every scene but one, which names a wrong
    colour, so scene match is 9 in 10 whatever the model."""
    (task,) = prepare_tasks(scenes_config.eval, scenes_config.data.eval_dir, suites=["generation"])
    graded = [(i, r) for i, r in enumerate(task.requests)
              if r.op == "generate" and r.max_new_tokens > scenes_config.eval.max_new_tokens]
    assert len(graded) == 10
    texts = [""] * len(task.requests)
    table = pq.read_table(task.source)
    scenes = [Scene.from_dict(json.loads(g)) for g in table["scene"].to_pylist()]
    for (i, _), scene in zip(graded, scenes):
        texts[i] = caption(scene, len(CAPTION_TEMPLATES) - 1)
    first = scenes[0].shapes[0]
    wrong = "purple" if first.colour != "purple" else "red"
    texts[graded[0][0]] = texts[graded[0][0]].replace(f"in {first.colour}", f"in {wrong}", 1)
    n = len(task.requests)
    answers = Answers(np.zeros((n, 1), np.float32), texts, np.ones(n), np.ones(n, np.int64), [""] * n)
    result = task.score(answers)
    assert result.metrics["scene_match"] == pytest.approx(0.9)
    singles = [s for s in scenes if len(s.shapes) == 1]
    if singles:
        expected = sum(s is not scenes[0] for s in singles) / len(singles)
        assert result.metrics["scene_match_single"] == pytest.approx(expected)
    assert result.samples[0]["greedy"] == texts[graded[0][0]]


def test_qa_exact_match_by_question_type(scenes_config, tmp_path):
    """Answers written by hand: every QA answer right but the "where" ones, so that type alone
    scores 0 and the overall share is the others' count over all; a row whose question_types
    does not fit its conversation is skipped with a reason, not scored untyped."""
    table = pq.read_table(Path(scenes_config.data.eval_dir) / "generation" / "scenes" / "test.parquet")
    types = table["question_types"].to_pylist()
    types[0] = types[0][:-1]
    path = tmp_path / "test.parquet"
    pq.write_table(table.set_column(table.column_names.index("question_types"), "question_types",
                                    pa.array(types, table.schema.field("question_types").type)), path)
    task = generation_task("scenes", path, None, scenes_config.eval)
    exchanges, _ = load_exchanges(path)
    qa = [ex for ex in exchanges if is_short_answer(ex.answer, scenes_config.eval.qa_max_words)]
    first_qa = next(i for i, r in enumerate(task.requests) if r.op == "generate")
    texts = [""] * len(task.requests)
    for i, ex in enumerate(qa, start=first_qa):
        texts[i] = "nowhere" if ex.question_type == "where" else ex.answer.upper() + "."
    n = len(task.requests)
    result = task.score(Answers(np.zeros((n, 1), np.float32), texts, np.ones(n), np.ones(n, np.int64), [""] * n))
    m = result.metrics
    counts = {k.split("/")[1]: v for k, v in m.items() if k.startswith("qa_count_by_type/")}
    assert set(counts) == {"count", "count_kind", "colour_at", "kind_at", "colour_of_kind", "where", "size_of"}
    assert sum(counts.values()) == m["qa_count"] == len(qa)
    assert m["qa_exact_match_by_type/where"] == 0
    assert all(m[f"qa_exact_match_by_type/{t}"] == 1 for t in counts if t != "where")
    assert m["qa_exact_match"] == pytest.approx(1 - counts["where"] / len(qa))
    for question_type in counts:
        truths = collections.Counter(ex.answer for ex in qa if ex.question_type == question_type)
        assert m[f"qa_majority_by_type/{question_type}"] == max(truths.values()) / counts[question_type]
    assert "question_types names" in result.skipped[0]["reason"] and result.skipped[0]["row"] == 0


def _generation_file(path: Path, question_types: pa.Array) -> Path:
    """One row per entry of `question_types`, each a caption and one question."""
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red star at the top"},
             {"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "1"}]
    rows = [{"id": f"r{i}", "image": {"bytes": png(i), "path": None}, "conversations": turns}
            for i in range(len(question_types))]
    pq.write_table(pa.Table.from_pylist(rows).append_column("question_types", question_types), path)
    return path


@pytest.mark.parametrize("bad, reason", [
    (["caption", ""], "must be a list of names"),  # an empty name would make an invalid metric name
    (["caption", "where?"], "must be a list of names"),
    (["caption"], "names 1 exchanges, the conversation has 2"),
])
def test_bad_question_types_skip_their_row_with_a_reason(tmp_path, bad, reason):
    path = _generation_file(tmp_path / "test.parquet", pa.array([["caption", "count"], bad]))
    exchanges, skipped = load_exchanges(path)
    assert [(ex.row_id, ex.question_type) for ex in exchanges] == [("r0", "caption"), ("r0", "count")]
    assert [s["id"] for s in skipped] == ["r1"] and reason in skipped[0]["reason"]


def test_question_types_written_as_text_are_refused(tmp_path):
    """A JSON string is not a list: its length would count characters, not exchanges."""
    exchanges, skipped = load_exchanges(_generation_file(tmp_path / "test.parquet", pa.array(['["caption", "count"]'])))
    assert exchanges == [] and "must be a list of names" in skipped[0]["reason"]


def test_a_note_names_the_question_types_no_model_has_learnt():
    """Exact match against always giving the commonest answer, two standard errors over 200
    questions: "0" to every "How many stars?" (0.615 of them) is no skill; 0.9 on "where"
    against 0.155 is, even when the other model is at chance there."""
    def card(count_kind, where):
        metrics = {"eval/generation/scenes/qa_exact_match": 0.6}
        for question_type, hit, majority in (("count_kind", count_kind, 0.615), ("where", where, 0.155)):
            metrics |= {f"eval/generation/scenes/qa_exact_match_by_type/{question_type}": hit,
                        f"eval/generation/scenes/qa_majority_by_type/{question_type}": majority,
                        f"eval/generation/scenes/qa_count_by_type/{question_type}": 200.0}
        return metrics

    (note,) = majority_notes({"base": card(0.615, 0.17), "CAFe": card(0.605, 0.9)})
    assert note.startswith("QA scenes:") and note.endswith("count_kind (base 0.615, CAFe 0.605 vs 0.615).")
    (alone,) = majority_notes({"base": card(0.615, 0.17)})
    assert alone.endswith("count_kind (base 0.615 vs 0.615); where (base 0.170 vs 0.155).")
    assert majority_notes({"base": card(0.75, 0.9)}) == []
    # a model that did not score the types (its answers all failed): nothing is claimed of "no model"
    assert majority_notes({"base": card(0.615, 0.17), "CAFe": {"eval/generation/scenes/qa_exact_match": 0.6}}) == []


def test_bad_suites_and_paths_fail_before_any_model(scenes_config):
    cfg = scenes_config.eval
    with pytest.raises(ValueError, match="unknown suite 'mmbe'"):
        prepare_tasks(cfg, scenes_config.data.eval_dir, suites=["mmbe"])
    only_retrieval = dataclasses.replace(cfg, suites=[s for s in cfg.suites if s.suite == "retrieval"])
    with pytest.raises(ValueError, match="suite 'pope' has no data set"):
        prepare_tasks(only_retrieval, scenes_config.data.eval_dir, suites=["pope"])
    with pytest.raises(FileNotFoundError, match="pope/scenes: .*nowhere.* does not exist"):
        prepare_tasks(cfg, "/nowhere", suites=["pope"])
    with pytest.raises(ValueError, match="Nope"):
        prepare_tasks(dataclasses.replace(cfg, mmeb_subsets=["Nope"]), scenes_config.data.eval_dir, suites=["mmeb"])
    assert [t.suite for t in prepare_tasks(cfg, scenes_config.data.eval_dir, suites=["pope", "retrieval"])] == \
        ["retrieval", "pope"]


def test_suites_from_yaml_overrides():
    cfg = load_config(None, ["eval.suites=[{suite: retrieval, datasets: [{name: flickr30k, path: /data/f.parquet}]}]",
                             "eval.mmeb_meta_tasks={Mine: vqa}"])
    assert cfg.eval.suites[0].datasets[0].name == "flickr30k"
    assert cfg.eval.mmeb_meta_tasks == {"Mine": "vqa"}
    assert isinstance(ExperimentConfig().eval, EvalConfig)
