"""Throughput of one CAFe training step: the plain three-pass step (the research code's way:
three full multimodal forwards, vision tower in each plus a pass on blank images,
full-vocabulary logits) against the packed step, on the same random-initialised model, batch
and optimizer, in one run. Ends with `speedup: N.NNx`.

    python benchmarks/step.py --size tiny                      # CPU
    python benchmarks/step.py --size 0.5b --batch 16 --crops 2  # GPU, bf16
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image

from cafe.attention import plan_packed_attention
from cafe.batch import Collator, Example
from cafe.losses import CafeLoss
from cafe.model import CafeModel
from cafe.reference import three_pass_inputs, three_pass_step
from cafe.tiny import PRESETS, build_random_model

WORDS = ("red green blue yellow purple orange circle square triangle star diamond small large top bottom "
         "left right center there is a the and of in with shape shapes image picture").split()
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_examples(batch: int, crops: int, image_size: int, answer_words: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for _ in range(batch):
        width = image_size * max(1, crops - 1)  # base view + (crops - 1) tiles side by side
        pixels = torch.randint(0, 256, (image_size, width, 3), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        image = Image.fromarray(pixels.to(torch.uint8).numpy())
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        answer = words(answer_words)
        messages = [{"role": "user", "content": "<image>\n" + words(12)}, {"role": "assistant", "content": answer}]
        examples.append(Example(images=[image], messages=messages, target_text=answer))
    return examples


def step_flops(model: CafeModel, batch) -> float:
    """Model FLOPs the job needs (fwd + bwd = 3x fwd): each visible token through its tower once,
    attention over the pairs the packed mask allows, logits at labelled positions."""
    cfg = model.vlm.config
    text, vision = cfg.text_config, cfg.vision_config
    lm_params = sum(p.numel() for n, p in model.vlm.model.language_model.named_parameters() if "embed" not in n)
    vision_params = sum(p.numel() for p in model.vlm.model.vision_tower.parameters())
    vision_tokens = batch.pixel_values.shape[0] * batch.pixel_values.shape[1] * (vision.image_size // vision.patch_size) ** 2
    text_tokens = int((batch.unit >= 0).sum())

    pairs = plan_packed_attention(batch.unit, batch.branch).pairs
    labelled = int((batch.lm_targets != -100).sum())
    forward = (2 * lm_params * text_tokens + 2 * vision_params * vision_tokens
               + 4 * text.hidden_size * text.num_hidden_layers * pairs + 2 * text.hidden_size * text.vocab_size * labelled)
    return 3.0 * forward


def time_steps(step_fn, optimizer, steps: int, device: torch.device) -> tuple[float, float, float]:
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        optimizer.zero_grad(set_to_none=True)
        step_fn().objective.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        terms = step_fn()
        terms.objective.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak, float(terms.loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crops", type=int, default=2, help="views per image: the base view + (crops-1) tiles")
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recompute", choices=["on", "off"], default=None,
                        help="activation recompute for the packed step (default: on for 0.5b, off for tiny); "
                             "the reference always uses it on 0.5b, as measured originally")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = PRESETS[args.size]
    spec.crops_wide = max(1, args.crops - 1)
    torch.manual_seed(0)
    with torch.device(device):
        vlm, processor = build_random_model(WORDS * 20, spec)
    vlm = vlm.to(device, dtype).train()
    vlm.config._attn_implementation = "sdpa"
    model = CafeModel(vlm, CafeLoss())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    examples = make_examples(args.batch, args.crops, spec.image_size, args.answer_words)

    started = time.perf_counter()
    batch = Collator(processor)(examples)
    collate_ms = (time.perf_counter() - started) * 1000
    packed = batch.to(device, dtype)
    reference_inputs = {k: v.to(device, dtype) for k, v in three_pass_inputs(processor, examples, batch).items()}

    big = args.size != "tiny"
    if big:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_s, ref_mem, ref_loss = time_steps(lambda: three_pass_step(model, reference_inputs, blank_image_pass=True),
                                          optimizer, args.steps, device)
    recompute = args.recompute or ("on" if big else "off")
    if recompute == "off":
        vlm.gradient_checkpointing_disable()
    else:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours_s, ours_mem, ours_loss = time_steps(lambda: model(packed), optimizer, args.steps, device)

    flops = step_flops(model, packed)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = lambda s: f"{flops / s / peak:.1%}" if peak else "n/a"  # noqa: E731
    pad = 1 - float((packed.unit >= 0).float().mean())
    print(f"device={name} size={args.size} batch={args.batch} crops={args.crops} dtype={dtype} "
          f"tokens/image={batch.tokens_per_image[0]} packed rows={tuple(packed.input_ids.shape)} padding={pad:.1%} "
          f"collate={collate_ms:.0f} ms (CPU, off the step) recompute(ours)={recompute}")
    print(f"{'step':<12}{'ms/step':>10}{'samples/s':>12}{'peak GiB':>10}{'MFU':>8}{'loss':>10}")
    for label, s, mem, loss in (("three-pass", ref_s, ref_mem, ref_loss), ("packed", ours_s, ours_mem, ours_loss)):
        print(f"{label:<12}{s * 1000:>10.1f}{args.batch / s:>12.1f}{mem:>10.1f}{mfu(s):>8}{loss:>10.4f}")
    print(f"speedup: {ref_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
