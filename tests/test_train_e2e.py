"""Training on a local Ray cluster: 2 workers, DeepSpeed on CPU (gloo), MLflow logging, HF
export. Slow: each run starts workers and DeepSpeed engines."""
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from transformers import LlavaOnevisionForConditionalGeneration

from cafe.config import load_config
from cluster import jobs
from cluster.session import init_ray
from evaluation.run import evaluate_checkpoint
from trainers.run import FAIL_AT_STEP_ENV, build_trainer

pytestmark = pytest.mark.slow


# planted in the environment of the driver and every worker: none may reach MLflow or the logs
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY000001", "AWS_SECRET_ACCESS_KEY": "planted/secret/KEY+0000000001",
           "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-01"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    root = tmp_path_factory.mktemp("train")
    overrides = [
        f"output_dir={root}/out", f"model.checkpoint={root}/base", "model.pretrain_config=", f"data.raw_dir={root}/raw",
        f"data.train_dir={root}/train", f"data.quarantine_dir={root}/quarantine", f"data.eval_dir={root}/raw/eval",
        "data.dataset_yaml=configs/datasets/scenes.yaml", "data.scenes.train_images=64", "data.scenes.eval_images=16",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "train.batch_size=4", "train.log_every=1",
    ]
    cfg = load_config("configs/demo.yaml", overrides)
    init_ray(cfg)  # as `cafe` starts it: dashboard on 127.0.0.1 and the cluster's address recorded for Train
    jobs.prepare_scenes(cfg)
    jobs.ensure_checkpoint(cfg)
    summary = jobs.run_data(cfg)
    assert summary.written == 64 and summary.quarantined == 0
    yield root, overrides
    ray.shutdown()
    monkeypatch.undo()


# every run: 10 steps of 2 workers x 4 rows from the same seed, scored at 5 and 10
RUNS = {
    "zero0": ["train.zero_stage=0"],
    "zero2": ["train.zero_stage=2"],
    "zero3-offload": ["train.zero_stage=3", "train.offload_optimizer=true"],  # optimizer state in host memory
    "zero2-gradcache": ["train.zero_stage=2", "train.gradcache_chunk=2"],
    "zero2-compiled-frozen-tower": ["train.zero_stage=2", "model.compile_blocks=true",
                                    "model.mm_tunable_parts=[mm_mlp_adapter, mm_language_model]"],
}
STEPS, EVERY = 10, 5
FAIL_AT = 6  # the restarted run's last worker dies after this step; it resumes from step 4's checkpoint
# LM-only, not scored: one batch of 4 rows per worker against 2 micro-batches of 2
ACCUMULATION_RUNS = {
    "lm-only": ["train.zero_stage=2", "loss.compute_contrastive_loss=false", "eval.every_steps=0"],
    "lm-only-accumulated": ["train.zero_stage=2", "loss.compute_contrastive_loss=false", "eval.every_steps=0",
                            "train.grad_accum_steps=2"],
}


def train_runs(root, overrides, runs: dict[str, list[str]]) -> dict:
    """Each configuration trained once: name -> (config, MLflow run id, exported model, steps)."""
    done = {}
    for name, sets in runs.items():
        cfg = load_config("configs/demo.yaml", overrides + [f"name={name}", f"output_dir={root}/{name}",
                                                            f"train.max_steps={STEPS}", f"eval.every_steps={EVERY}",
                                                            *sets])
        run_id = jobs.open_run(cfg)
        model_dir, steps = jobs.train(cfg, run_id)
        done[name] = (cfg, run_id, model_dir, steps)
    return done


@pytest.fixture(scope="module")
def runs(prepared):
    return train_runs(*prepared, RUNS)


def curve(runs, name: str) -> dict[int, float]:
    """The run's training loss by step; a step logged twice (before a failure and again after
    the resume) counts with its last value."""
    cfg, run_id = runs[name][:2]
    return {m.step: m.value for m in MlflowClient(cfg.tracking.tracking_uri).get_metric_history(run_id, "train/loss")}


def test_zero_stages_and_gradcache_give_one_loss_curve(runs):
    """The same seed reads the same rows in the same order (trainers.shards) whatever the ZeRO
    stage: ZeRO 0, 2 and 3 (with the optimizer offloaded), and GradCache in chunks of 2, follow
    one loss curve (float tolerance: the reduction order differs between them)."""
    curves = {name: curve(runs, name) for name in ("zero0", "zero2", "zero3-offload", "zero2-gradcache")}
    assert list(curves["zero0"]) == list(range(1, STEPS + 1))
    assert curves["zero0"][1] != curves["zero0"][STEPS]  # it trained
    for name, losses in curves.items():
        assert losses == pytest.approx(curves["zero0"], rel=2e-3), name


def test_a_run_whose_worker_dies_resumes_exactly(prepared, runs, monkeypatch):
    """The last worker's process ends abruptly after step 6; Ray Train restarts the group from
    step 4's checkpoint (optimizer, scheduler, RNG, data position) and the run finishes with the
    configured steps, in one MLflow run, on the uninterrupted run's loss curve."""
    root, overrides = prepared
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(FAIL_AT))
    restarted = train_runs(root, overrides, {"zero2-restarted": ["train.zero_stage=2", "train.checkpoint_every=4",
                                                                 "train.max_failures=1"]})
    cfg, run_id, model_dir, steps = restarted["zero2-restarted"]
    assert (Path(cfg.output_dir) / f"failed_at_step_{FAIL_AT}").exists()  # the worker did die
    assert steps == STEPS
    client = MlflowClient(cfg.tracking.tracking_uri)
    keyed = client.search_runs([client.get_run(run_id).info.experiment_id],
                               filter_string="tags.`cafe.run_key` = 'zero2-restarted'")
    assert [r.info.run_id for r in keyed] == [run_id]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # 5 and 6, trained twice, logged once
    assert curve(restarted, "zero2-restarted") == pytest.approx(curve(runs, "zero2"), rel=1e-5)


def test_micro_batches_give_the_lm_loss_curve_of_the_whole_batch(prepared):
    """Gradient accumulation 2 x 2 per worker equals one batch of 4 for the LM term, step after step."""
    done = train_runs(*prepared, ACCUMULATION_RUNS)
    assert curve(done, "lm-only-accumulated") == pytest.approx(curve(done, "lm-only"), rel=1e-4)
    assert curve(done, "lm-only")[1] != curve(done, "lm-only")[STEPS]


@pytest.mark.parametrize("name", list(RUNS))
def test_deepspeed_run_logs_to_mlflow_and_exports_hf(prepared, runs, name):
    root, _ = prepared
    cfg, run_id, model_dir, steps = runs[name]
    assert steps == STEPS

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["train.zero_stage"] == str(cfg.train.zero_stage)
    assert run.data.params["model.compile_blocks"] == str(cfg.model.compile_blocks)
    for key in ("train/loss", "train/lm_loss", "train/con_loss", "train/lr", "train/grad_norm", "train/temperature",
                "train/samples_per_s", "train/tokens_per_s", "train/data_wait_fraction"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
        assert all(torch.isfinite(torch.tensor(m.value)) for m in history)
    # the scorecard on the live weights (every rank answering a share; ZeRO-3 gathers in step),
    # from the same requests as a checkpoint evaluation
    for key in ("eval/retrieval/scenes/i2t_r1", "eval/mmeb/scenes/overall", "eval/pope/scenes/f1",
                "eval/generation/scenes/caption_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [EVERY, STEPS], key
    assert {a.path for a in client.list_artifacts(run_id, "scorecards")} == {f"scorecards/step_{EVERY:07d}",
                                                                           f"scorecards/step_{STEPS:07d}"}
    # ... and the numbers equal those of the exported checkpoint scored in one process
    final = evaluate_checkpoint(cfg, model_dir, use_ray=False, report_dir=root / name / "check").metrics
    for key in ("eval/retrieval/scenes/i2t_r5", "eval/mmeb/scenes/overall", "eval/pope/scenes/f1",
                "eval/generation/scenes/caption_loss", "eval/generation/scenes/qa_exact_match"):
        assert client.get_metric_history(run_id, key)[-1].value == pytest.approx(final[key], rel=1e-4, abs=1e-5), key
    loss = client.get_metric_history(run_id, "train/loss")
    lm, con = (client.get_metric_history(run_id, k)[-1].value for k in ("train/lm_loss", "train/con_loss"))
    assert loss[-1].value == pytest.approx(lm + cfg.loss.con_weight * con, rel=1e-4)

    # the export is complete (a ZeRO-3 rank-0-only save would write empty tensors) and trained
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(cfg.model.checkpoint).state_dict()
    trained = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir).state_dict()
    assert base.keys() == trained.keys()
    assert all(trained[k].shape == base[k].shape for k in base)
    tower = {k for k in base if k.startswith("model.vision_tower.")}
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert len(changed - tower) > len(set(base) - tower) // 2
    if "mm_vision_tower" in cfg.model.mm_tunable_parts:
        assert len(changed & tower) > len(tower) // 2
    else:  # a frozen tower is bit-identical after training
        assert not changed & tower


def test_compiled_blocks_refused_under_zero3():
    cfg = load_config("configs/demo.yaml", ["train.zero_stage=3", "model.compile_blocks=true"])
    with pytest.raises(ValueError, match="zero_stage 0-2"):
        build_trainer(cfg, run_id="unused")


def test_no_secret_from_the_environment_reaches_mlflow_or_the_logs(prepared, runs, tmp_path):
    """Runs after the training runs above, in the same MLflow store and Ray session: params,
    tags, every artifact, and the run's output (the Ray workers' stdout/stderr files)."""
    root, _ = prepared
    planted = list(SECRETS.values())
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.exists():  # the cluster's token is a secret too
        planted.append(token_file.read_text().strip())
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 3
    texts = []
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=client.tracking_uri,
                                                         dst_path=str(tmp_path / run.info.run_id)))
        texts += [p.read_bytes().decode("utf-8", "replace") for p in local.rglob("*") if p.is_file()]
    assert {"cafe.git_commit", "ray.job_id"} <= runs[0].data.tags.keys()
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    outputs = [p for p in logs.glob("worker-*") if p.suffix in (".out", ".err")]
    assert outputs
    texts += [p.read_bytes().decode("utf-8", "replace") for p in outputs]
    leaks = [secret for secret in planted if any(secret in text for text in texts)]
    assert not leaks, f"{len(leaks)} planted secrets found in MLflow or the run's output"
