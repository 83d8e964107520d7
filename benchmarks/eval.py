"""Throughput of retrieval-evaluation embedding: the research code's loop (one image, then one
caption at a time, each through the processor and the full model with vocabulary logits and
every hidden state, in one process) against ours (length-sorted batches on a pool of warm Ray
Data actors, packed forward through the base model, no logits), on the same checkpoint and the
same held-out scenes, in one run. Each path runs twice and the second run is timed, as in the
anchor script; model loading is outside the timing on both sides (the pool keeps its actors
and their model warm across calls; its start-up is printed). Image decoding is inside it on
both sides. Ends with `speedup: N.NNx`.

    python benchmarks/eval.py --size tiny --images 100    # CPU
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from cafe.model import load_vlm
from cafe.prompts import chat_pieces, embedding_messages
from cafe.tiny import PRESETS, build_tiny_checkpoint
from evaluation.backends import ActorPool
from evaluation.requests import Request, decode_image
from evaluation.retrieval import load_retrieval_set, recall_at_k
from pipelines.scenes import scene_corpus, write_scene_dataset


@torch.inference_mode()
def reference_loop(vlm, processor, images: list[bytes], captions: list[str], device: str) -> np.ndarray:
    """One input at a time: decode, processor, full forward (logits, all hidden states), last token."""
    out = []
    inputs = [(None, decode_image(b, None)) for b in images] + [(c, None) for c in captions]
    for text, image in inputs:
        prompt = "".join(p for p, _ in chat_pieces(embedding_messages(text, 0 if image is None else 1),
                                                   add_generation_prompt=True))
        batch = processor(text=[prompt], images=None if image is None else [image], return_tensors="pt").to(device)
        hidden = vlm(**batch, output_hidden_states=True).hidden_states[-1]
        out.append(F.normalize(hidden[0, -1].float(), dim=-1).cpu())
    return torch.stack(out).numpy()


def timed(run):
    """(result, seconds) of the second of two runs: the first warms allocators and kernels, as
    the anchor script does for both of its loops."""
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--images", type=int, default=100, help="held-out scenes; 5 captions each")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--actors", type=int, default=0, help="0: one per CPU (one per GPU on a GPU machine)")
    args = parser.parse_args()

    use_gpu = torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    cpus = os.cpu_count() or 1
    actors = args.actors or (torch.cuda.device_count() if use_gpu else cpus)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_scene_dataset(tmp / "scenes", train_images=1, eval_images=args.images,
                                    image_size=args.image_size, seed=0)
        checkpoint = build_tiny_checkpoint(tmp / "model", scene_corpus(), PRESETS[args.size])
        data = load_retrieval_set(files["retrieval"])
        requests = [Request("embed", image=b) for b in data.images] + [Request("embed", text=c) for c in data.captions]

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        started = time.perf_counter()
        pool = ActorPool(num_actors=actors, cpus_per_actor=cpus / actors if not use_gpu else 1.0, use_gpu=use_gpu)
        backend = pool.backend(str(checkpoint), batch_size=args.batch)
        start_s = time.perf_counter() - started

        ours, ours_s = timed(lambda: backend(requests).embeddings)
        pool.close()
        ray.shutdown()
        vlm, processor = load_vlm(checkpoint, dtype=torch.bfloat16 if use_gpu else torch.float32)
        vlm.to(device).eval()
        reference, reference_s = timed(lambda: reference_loop(vlm, processor, data.images, data.captions, device))

    n = len(requests)
    ks = [1, 5, 10]
    num_images = len(data.images)
    score = {name: recall_at_k(torch.from_numpy(e[:num_images]), torch.from_numpy(e[num_images:]),
                               data.text_to_image, ks)
             for name, e in (("reference", reference), ("ours", ours))}
    machine = (torch.cuda.get_device_name() if use_gpu
               else f"CPU, {cpus} cores ({platform.processor() or platform.machine()})")
    print(f"size={args.size} images={num_images} captions={len(data.captions)} image_size={args.image_size} "
          f"device={machine} load={os.getloadavg()[0]:.2f}")
    print(f"reference one-at-a-time: {reference_s:.2f} s, {n / reference_s:.1f} embeddings/s")
    print(f"ours ({actors} actors, batch {args.batch}, warm pool, whose start and model load took {start_s:.1f} s, "
          f"untimed like the reference's model load): {ours_s:.2f} s, {n / ours_s:.1f} embeddings/s")
    print(f"same embeddings: max |difference| {np.abs(ours - reference).max():.2e}; "
          f"mean recall {score['reference']['mean_recall']:.4f} vs {score['ours']['mean_recall']:.4f}")
    print(f"speedup: {reference_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
