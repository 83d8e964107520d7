"""One model held for evaluation: embeddings, batched greedy generation, conversation NLL.

Every call sorts its inputs by length so a batch holds similar lengths, and restores the input
order on the way out. Embeddings and NLL go through the packed forward (no padding, vocabulary
logits only at labelled positions); generation uses the HF `generate` with left padding and
the KV cache, on prompts tokenised exactly as in training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cafe.batch import Collator, Example
from cafe.losses import CafeLoss
from cafe.model import CafeModel, load_vlm
from cafe.prompts import IGNORE_INDEX
from cafe.sequences import encode_generation_prompt, expand_image_tokens

EmbedInput = tuple[str | None, list[Image.Image]]  # (text or None, images)
Conversation = tuple[list[dict], list[Image.Image]]  # (role/content messages, images of the first user turn)


@dataclass(slots=True)
class ConversationLoss:
    nll: float  # summed over the assistant tokens, nats
    tokens: int  # assistant tokens scored


def _by_length(costs: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(costs)), key=costs.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class InferenceModel:
    """A `CafeModel` and its processor in eval mode. Build with `load` from a checkpoint, or
    around a live training model (`InferenceModel(model, processor)`)."""

    def __init__(self, model: CafeModel, processor, *, batch_size: int = 32,
                 gather_sharded: Callable[[list[torch.nn.Parameter]], AbstractContextManager] | None = None) -> None:
        """Args:
            gather_sharded: for a ZeRO-3 sharded model, a context that gathers the given
                parameters on every rank (`deepspeed.zero.GatheredParameters`). The packed
                forward reads a few parameters outside their own module's forward (LLaVA-OV's
                `image_newline`), where no ZeRO hook fetches them; generation then also keeps
                the ranks' decoding steps in lockstep.
        """
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.collator = Collator(processor, compute_contrastive_loss=False)
        self.batch_size = batch_size
        self.gather_sharded = gather_sharded
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    @classmethod
    def load(cls, checkpoint: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
             emb_type: str = "last", batch_size: int = 32) -> InferenceModel:
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        vlm, processor = load_vlm(checkpoint, dtype=dtype)
        model = CafeModel(vlm, CafeLoss(), emb_type=emb_type).to(device).eval()
        return cls(model, processor, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vlm.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.vlm.config.text_config.hidden_size

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the duration (a live training model goes back to train mode after).
        no_grad, not inference_mode: ZeRO-3 writes gathered weights into its parameters."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _batches(self, costs: Sequence[int], run: Callable[[list[int]], list], n: int) -> list:
        out: list = [None] * n
        # per batch: a forward's ZeRO hooks re-partition what the previous gather fetched
        outside = [p for m in (self.model, self.model.vlm, self.model.vlm.model) for p in m.parameters(recurse=False)]
        with self.evaluating():
            for chunk in _by_length(costs, self.batch_size):
                with self.gather_sharded(outside) if self.gather_sharded else nullcontext():
                    values = run(chunk)
                for i, value in zip(chunk, values):
                    out[i] = value
        return out

    def embed(self, inputs: list[EmbedInput]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings, in input order."""
        if not inputs:
            raise ValueError("nothing to embed")

        def run(chunk: list[int]) -> list[torch.Tensor]:
            batch = self.collator.embedding_batch([inputs[i] for i in chunk]).to(self.device, self.dtype)
            return list(self.model.embed(batch).float().cpu())

        costs = [len(text or "") + 1000 * len(images) for text, images in inputs]
        return torch.stack(self._batches(costs, run, len(inputs)))

    def conversation_loss(self, conversations: list[Conversation]) -> list[ConversationLoss]:
        """Summed NLL and token count over each conversation's assistant tokens."""

        def run(chunk: list[int]) -> list[ConversationLoss]:
            examples = [Example(images=conversations[i][1], messages=conversations[i][0], target_text=None)
                        for i in chunk]
            batch = self.collator(examples).to(self.device, self.dtype)
            hidden = self.model.hidden_states(batch)
            labelled = batch.lm_targets.flatten() != IGNORE_INDEX
            logits = self.model.vlm.lm_head(hidden.flatten(0, 1)[labelled]).float()
            nll = F.cross_entropy(logits, batch.lm_targets.flatten()[labelled], reduction="none")
            owner = batch.unit.flatten()[labelled]  # conversation-only batches: one unit per example
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device).index_add(0, owner, nll.double())
            counts = torch.bincount(owner, minlength=len(chunk))
            return [ConversationLoss(float(s), int(c)) for s, c in zip(sums.cpu(), counts.cpu())]

        costs = [sum(len(m["content"]) for m in messages) for messages, _ in conversations]
        return self._batches(costs, run, len(conversations))

    def _prompt_ids(self, question: str, num_images: int, per_image: list[int]) -> list[int]:
        seq = encode_generation_prompt(self.collator.pieces, question, list(range(num_images)))
        return expand_image_tokens(seq, self.processor.image_token_id, per_image)[0]

    def generate(self, prompts: list[EmbedInput], *, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers to single-turn prompts (question text, images), in input order."""
        if not prompts:
            raise ValueError("nothing to generate")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[-1]

        def run(chunk: list[int]) -> list[str]:
            image_inputs, per_image = self.collator.encode_images([prompts[i][1] for i in chunk])
            rows, first_image = [], 0
            for i in chunk:
                n = len(prompts[i][1])
                rows.append(self._prompt_ids(prompts[i][0], n, per_image[first_image : first_image + n]))
                first_image += n
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            extra = {}
            if image_inputs:
                extra = {"pixel_values": image_inputs["pixel_values"].to(self.device, self.dtype),
                         "image_sizes": image_inputs["image_sizes"].to(self.device)}
            out = self.model.vlm.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.stop_ids, pad_token_id=pad,
                                          synced_gpus=self.gather_sharded is not None, **extra)
            return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]

        costs = [len(text or "") + 1000 * len(images) for text, images in prompts]
        return self._batches(costs, run, len(prompts))
