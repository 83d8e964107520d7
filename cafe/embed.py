"""Batched embedding of images, texts or image+text inputs with the CAFe instruction prompts."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cafe.batch import Collator
from cafe.losses import CafeLoss
from cafe.model import CafeModel, load_vlm

EmbedInput = tuple[str | None, list[Image.Image]]  # (text or None, images)


class Embedder:
    """Holds one model for inference. Inputs are length-sorted into batches (prompts of one
    batch then have similar lengths) and no vocabulary logits are ever computed."""

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 emb_type: str = "last", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        vlm, self.processor = load_vlm(checkpoint, dtype=self.dtype)
        self.model = CafeModel(vlm, CafeLoss(), emb_type=emb_type).to(self.device).eval()
        self.collator = Collator(self.processor)
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, inputs: list[EmbedInput]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings, in input order."""
        if not inputs:
            raise ValueError("nothing to embed")
        cost = [len(text or "") + 1000 * len(images) for text, images in inputs]
        order = sorted(range(len(inputs)), key=cost.__getitem__)
        out = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.collator.embedding_batch([inputs[i] for i in chunk]).to(self.device)
            for i, row in zip(chunk, self.model.embed(batch).cpu()):
                out[i] = row
        return torch.stack(out)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.embed([(None, [img]) for img in images])

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.embed([(text, []) for text in texts])
