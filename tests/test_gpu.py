"""The CUDA path in one command where a GPU is lent (`make test-gpu`): the packed step against
the three-pass step in bf16, compiled blocks, a 1-worker NCCL DeepSpeed run with its HF export,
and evaluation on a GPU actor. Skipped, saying why, where there is no CUDA device."""
import numpy as np
import pytest
import torch

from cafe.batch import Collator
from cafe.compile import compile_blocks
from cafe.config import load_config
from cafe.inference import InferenceModel
from cafe.losses import CafeLoss, ContrastiveLoss
from cafe.model import CafeModel, load_vlm
from cafe.reference import three_pass_inputs, three_pass_step
from evaluation.backends import ActorPool, in_process
from tests.test_evaluation import requests  # noqa: F401 - the shared request fixture
from tests.test_step_equivalence import make_examples

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tier needs one")]
CUDA = torch.device("cuda")


def cuda_model(checkpoint, dtype=torch.bfloat16) -> tuple[CafeModel, object]:
    vlm, processor = load_vlm(checkpoint, dtype=dtype)
    loss = CafeLoss(con_weight=0.7, contrastive=ContrastiveLoss(temperature=0.1, learnable=True))
    return CafeModel(vlm, loss).to(CUDA).train(), processor


def grads(model: CafeModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_step_matches_three_pass_in_bf16_on_cuda(tiny_checkpoint):
    examples = make_examples(1, multimodal=True)
    model, processor = cuda_model(tiny_checkpoint)
    batch = Collator(processor)(examples)
    fast = model(batch.to(CUDA, torch.bfloat16))
    fast.objective.backward()
    fast_grads = grads(model)
    model.zero_grad()
    inputs = {k: v.to(CUDA, torch.bfloat16) for k, v in three_pass_inputs(processor, examples, batch).items()}
    ref = three_pass_step(model, inputs)
    ref.objective.backward()
    ref_grads = grads(model)
    torch.testing.assert_close(fast.lm_loss, ref.lm_loss.float(), rtol=2e-2, atol=0)
    torch.testing.assert_close(fast.con_loss, ref.con_loss.float(), rtol=2e-2, atol=0)
    assert fast_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():  # bf16 rounding: the direction must agree
        if g.norm() > 1e-3 * max(r.norm() for r in ref_grads.values()):
            assert torch.nn.functional.cosine_similarity(fast_grads[name].flatten(), g.flatten(), dim=0) > 0.98, name


def test_compiled_blocks_match_eager_on_cuda(tiny_checkpoint):
    model, processor = cuda_model(tiny_checkpoint)
    batch = Collator(processor)(make_examples(2, multimodal=False)).to(CUDA, torch.bfloat16)
    eager = model(batch).objective.detach()
    assert compile_blocks(model.vlm) > 0
    compiled = model(batch).objective.detach()
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=0)


def test_one_worker_nccl_deepspeed_run_exports_hf(tmp_path, tiny_checkpoint):
    import ray

    from cluster import jobs
    from cluster.session import init_ray

    cfg = load_config("configs/demo.yaml", [
        f"output_dir={tmp_path}/out", f"model.checkpoint={tiny_checkpoint}", "model.pretrain_config=",
        f"data.raw_dir={tmp_path}/raw", f"data.train_dir={tmp_path}/train", f"data.quarantine_dir={tmp_path}/q",
        f"data.eval_dir={tmp_path}/raw/eval", "data.scenes.train_images=32", "data.scenes.eval_images=8",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.use_gpu=true", "train.num_workers=1",
        "train.zero_stage=2", "train.batch_size=8", "train.max_steps=3", "train.log_every=1"])
    init_ray(cfg)
    try:
        jobs.ensure_training_data(cfg)
        model_dir, steps = jobs.train(cfg, jobs.open_run(cfg))
    finally:
        ray.shutdown()
    assert steps == 3
    trained = InferenceModel.load(model_dir, device="cuda")
    assert trained.model.vlm.dtype == torch.bfloat16


def test_evaluation_on_a_gpu_actor_matches_the_cpu(tiny_checkpoint, requests, ray_cluster):  # noqa: F811
    cpu = in_process(InferenceModel.load(tiny_checkpoint, dtype=torch.float32))(requests)
    pool = ActorPool(num_actors=1, use_gpu=True)
    gpu = pool.backend(str(tiny_checkpoint), batch_size=4)(requests)
    pool.close()
    assert gpu.errors == cpu.errors
    ok = [i for i, e in enumerate(cpu.errors) if not e and cpu.embeddings[i].any()]
    cosine = (gpu.embeddings[ok] * cpu.embeddings[ok]).sum(axis=1)  # both L2-normalised
    assert np.all(cosine > 0.99)
