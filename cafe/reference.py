"""The plain three-pass CAFe step, as the research code computes it: one full multimodal
forward for the conversation (full-vocabulary logits, HF's loss), one for the image prompt,
one for the caption prompt, the vision tower inside every pass that has images. Kept as the
oracle the packed step is tested against, and as the baseline the step benchmark times."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cafe.batch import Example, PackedBatch
from cafe.losses import LossTerms
from cafe.model import CafeModel
from cafe.prompts import IGNORE_INDEX


@dataclass(slots=True)
class PassInputs:
    """Right-padded inputs of one full forward."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    vision: dict  # pixel_values, image_sizes, batch_num_images; empty for text-only passes

    def to(self, device, dtype=None) -> PassInputs:
        vision = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in self.vision.items()}
        labels = self.labels.to(device) if self.labels is not None else None
        return PassInputs(self.input_ids.to(device), self.attention_mask.to(device), labels, vision)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _pass_inputs(processor, sequences, image_groups, *, labels: bool) -> PassInputs:
    vision = {}
    flat = [img for group in image_groups for img in group]
    if flat:
        pixels = processor.image_processor(images=flat, return_tensors="pt")
        vision = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"],
                  "batch_num_images": torch.tensor([len(g) for g in image_groups if g])}
    return PassInputs(
        input_ids=_pad([s[0] for s in sequences], processor.tokenizer.pad_token_id),
        attention_mask=_pad([[1] * len(s[0]) for s in sequences], 0),
        labels=_pad([s[1] for s in sequences], IGNORE_INDEX) if labels else None,
        vision=vision,
    )


def three_pass_inputs(processor, examples: list[Example], batch: PackedBatch) -> dict[str, PassInputs]:
    """The three passes' inputs, from the same token sequences the packed batch holds: the
    conversations of every example, the prompts of the examples with a pair."""
    paired = [(ex, e) for ex, e in zip(examples, batch.sequences) if "target" in e]
    return {
        "conversation": _pass_inputs(processor, [e["conversation"] for e in batch.sequences],
                                     [ex.images for ex in examples], labels=True),
        "query": _pass_inputs(processor, [e["query"] for _, e in paired], [ex.images for ex, _ in paired],
                              labels=False),
        "target": _pass_inputs(processor, [e["target"] for _, e in paired], [ex.target_images for ex, _ in paired],
                               labels=False),
    }


def _embed(model: CafeModel, inputs: PassInputs) -> torch.Tensor:
    out = model.vlm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True,
                    **inputs.vision)
    hidden, mask = out.hidden_states[-1], inputs.attention_mask
    if model.emb_type == "last":
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled.float(), dim=-1)


def three_pass_step(model: CafeModel, inputs: dict[str, PassInputs], *, blank_image_pass: bool = False,
                    rank: int = 0, world_size: int = 1) -> LossTerms:
    """`blank_image_pass` also runs the vision tower on blank images during the caption pass, as
    the research code does; it changes no loss, only the cost (for the benchmark)."""
    conv = inputs["conversation"]
    lm = model.vlm(input_ids=conv.input_ids, attention_mask=conv.attention_mask, labels=conv.labels, **conv.vision).loss
    query = _embed(model, inputs["query"])
    if blank_image_pass and conv.vision:
        model.vlm.model.get_image_features(pixel_values=torch.zeros_like(conv.vision["pixel_values"]),
                                           image_sizes=conv.vision["image_sizes"])
    target = _embed(model, inputs["target"])
    return model.loss(lm_loss=lm, query=query, target=target, rank=rank, world_size=world_size)
