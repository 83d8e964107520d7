"""The Ray Data actor pool against the in-process Embedder, and logging into an MLflow run."""
import io
import json
import os
import random

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from mlflow import MlflowClient

from cafe.config import EvalConfig
from cafe.embed import Embedder
from evaluation.embedding_pool import embed_in_process, embed_with_actor_pool
from evaluation.run import embedding_rows, evaluate_retrieval, load_retrieval_set, retrieval_path
from tests.conftest import WORDS, random_image

NAME = "tiny"
BROKEN = 3  # row of the image whose bytes are not an image


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """Eight random images with one to three captions each, in the flickr_1k test layout."""
    rng = random.Random(0)
    rows = []
    for i in range(8):
        buf = io.BytesIO()
        random_image(rng, rng.randint(40, 90), rng.randint(40, 90)).save(buf, format="PNG")
        data = b"not an image" if i == BROKEN else buf.getvalue()
        captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 3))]
        rows.append({"image": {"bytes": data, "path": f"{i}.png"}, "caption": captions, "img_id": str(i), "filename": f"{i}.png"})
    root = tmp_path_factory.mktemp("eval")
    path = retrieval_path(root, NAME)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return root


def test_actor_pool_matches_in_process(tiny_checkpoint, eval_dir):
    rows = embedding_rows(load_retrieval_set(retrieval_path(eval_dir, NAME)))
    pooled = embed_with_actor_pool(rows, str(tiny_checkpoint), num_actors=2, batch_size=4)
    local = embed_in_process(rows, Embedder(tiny_checkpoint, batch_size=32))
    assert pooled.keys.tolist() == local.keys.tolist() == list(range(rows.num_rows))
    assert pooled.errors == local.errors
    assert [bool(e) for e in pooled.errors] == [i == BROKEN for i in range(rows.num_rows)]
    assert not pooled.vectors[BROKEN].any()
    np.testing.assert_allclose(pooled.vectors, local.vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.delete(pooled.vectors, BROKEN, 0), axis=1), 1.0, atol=1e-5)


def test_metrics_logged_to_the_given_run(tiny_checkpoint, eval_dir, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    config = EvalConfig(batch_size=4, num_actors=1)

    metrics = evaluate_retrieval(tiny_checkpoint, eval_dir, config=config, name=NAME,
                                 tracking=(client.tracking_uri, run_id), report_path=tmp_path / "report.json", step=7)
    reference = evaluate_retrieval(tiny_checkpoint, eval_dir, config=config, name=NAME, use_ray=False)

    assert metrics == pytest.approx(reference, abs=1e-6)
    recalls = {f"eval/retrieval/{NAME}/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert recalls <= metrics.keys()
    assert all(0.0 <= metrics[k] <= 1.0 for k in recalls | {f"eval/retrieval/{NAME}/mean_recall"})
    assert metrics[f"eval/retrieval/{NAME}/failed_images"] == 1.0

    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no second run
    assert client.get_run(run_id).data.metrics == pytest.approx(metrics)
    assert {m.step for m in client.get_metric_history(run_id, f"eval/retrieval/{NAME}/i2t_r1")} == {7}
    artifacts = [a.path for a in client.list_artifacts(run_id, f"eval/retrieval/{NAME}")]
    assert artifacts == [f"eval/retrieval/{NAME}/report.json"]

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"] == metrics
    assert report["counts"] == {"images": 8, "captions": report["counts"]["captions"], "failed_images": 1}
    assert report["failures"][0]["img_id"] == str(BROKEN)
    assert report["timing"]["embeddings_per_s"] > 0
