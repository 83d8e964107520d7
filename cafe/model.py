"""Loading a LLaVA-OneVision checkpoint directory and the CAFe model around it.

`CafeModel.forward` is the fast CAFe step on a `PackedBatch`: the vision tower runs once per
distinct view (`cafe.vision`), the conversation and the query prompt share their prefix in one
packed forward through the base language model (attention computed unit by unit,
`cafe.attention`), and vocabulary logits are computed only where labels exist."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from cafe.attention import route_packed_attention
from cafe.batch import PackedBatch, pair_share
from cafe.losses import CachedGrads, CafeLoss, LossTerms
from cafe.prompts import IGNORE_INDEX
from cafe.vision import encode_distinct_views


def check_weight_files(checkpoint: Path) -> None:
    """Refuse a checkpoint whose safetensors files are cut short or garbled, in one line, before
    a pool of workers each fails to load it. A safetensors file is an 8-byte header length, a
    JSON header giving every tensor's byte range, then the data."""
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("its header runs past the end of the file")
                header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
        if 8 + header_len + end != size:
            raise ValueError(f"{path} is {size:,} bytes where its header promises {8 + header_len + end:,}: "
                             "the file is truncated or damaged; copy or export it again")


def claim_cpus(cpus: float) -> None:
    """Size torch's intra-op thread pool to the CPUs a Ray worker was granted. Torch sizes it by
    the machine's cores when it is imported before Ray sets OMP_NUM_THREADS, and two workers on
    two cores then run four busy threads and wait on each other."""
    torch.set_num_threads(max(1, math.floor(cpus)))


# the research code's mm_tunable_parts, as parameter-name prefixes of LlavaOnevisionForConditionalGeneration
TUNABLE_PARTS = {
    "mm_vision_tower": ("model.vision_tower.",),
    "mm_mlp_adapter": ("model.multi_modal_projector.", "model.image_newline"),
    "mm_language_model": ("model.language_model.", "lm_head."),
}


def set_tunable_parts(vlm: nn.Module, parts: list[str]) -> None:
    """Freeze every parameter outside `parts`; frozen ones get no gradient (and, left out of the
    optimizer's groups, no optimizer state)."""
    unknown = set(parts) - set(TUNABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown mm_tunable_parts {sorted(unknown)}; choose from {list(TUNABLE_PARTS)}")
    prefixes = tuple(prefix for part in parts for prefix in TUNABLE_PARTS[part])
    for name, param in vlm.named_parameters():
        param.requires_grad_(name.startswith(prefixes))


def load_vlm(checkpoint: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Model and processor from a local HF directory (no hub access)."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a LLaVA-OneVision checkpoint directory (no config.json)")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model, processor


class CafeModel(nn.Module):
    """The VLM plus the CAFe loss (whose temperature may be learnable)."""

    def __init__(self, vlm: LlavaOnevisionForConditionalGeneration, loss: CafeLoss, *, emb_type: str = "last",
                 lockstep_vision: bool = False) -> None:
        """Args:
            lockstep_vision: run the vision tower on every batch, a blank image when the batch
                has none, adding nothing. Under ZeRO-3 every rank must run the same modules in
                the same order (each gathers its parameters with the others), so a rank whose
                batch is text only would otherwise wait on a rank that is fetching the tower.
        """
        super().__init__()
        if emb_type not in ("last", "mean"):
            raise ValueError(f"emb_type {emb_type!r} is not one of ['last', 'mean']")
        self.vlm = vlm
        self.loss = loss
        self.emb_type = emb_type
        self.lockstep_vision = lockstep_vision

    def image_features(self, batch: PackedBatch) -> torch.Tensor | None:
        if batch.pixel_values is None:
            return None
        with encode_distinct_views(self.vlm.model.vision_tower):
            out = self.vlm.model.get_image_features(
                pixel_values=batch.pixel_values,
                image_sizes=batch.image_sizes,
                batch_num_images=batch.batch_num_images,
            )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        lengths = [f.shape[0] for f in features]
        if lengths != batch.tokens_per_image:
            raise ValueError(f"vision tower gave {lengths} tokens per image, the prompts hold {batch.tokens_per_image}")
        return torch.cat(list(features), dim=0)

    def _idle_vision(self, like: torch.Tensor) -> torch.Tensor:
        """Zero, from the vision tower and projector run on one blank image (`lockstep_vision`);
        in the graph, so the tower's parameters get their (zero) gradient on this rank too."""
        size = self.vlm.config.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=like.device, dtype=like.dtype)
        tower = self.vlm.model.vision_tower(blank).last_hidden_state
        return self.vlm.model.multi_modal_projector(tower).sum() * 0

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Last-layer hidden states (after the final norm) of the packed rows."""
        embeds = self.vlm.get_input_embeddings()(batch.input_ids)
        features = self.image_features(batch)
        if features is not None:  # index ops: their backward is a few times cheaper than masked_scatter's
            rows = batch.feature_index.flatten()
            at = (rows >= 0).nonzero().flatten()
            embeds = embeds.flatten(0, 1).index_copy(0, at, features.index_select(0, rows[at]).to(embeds.dtype))
            embeds = embeds.view(*batch.input_ids.shape, -1)
        elif self.lockstep_vision:
            embeds = embeds + self._idle_vision(embeds)
        language_model = self.vlm.model.language_model
        route_packed_attention(language_model.config)
        return language_model(
            inputs_embeds=embeds, attention_mask={"full_attention": batch.attention}, position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state

    def pool(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """L2-normalised embeddings in order (queries, then targets), in float32."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.emb_type == "last":
            pooled = flat[batch.emb_last].float()
        else:
            n = batch.emb_last.shape[0]
            sums = torch.zeros(n, flat.shape[-1], dtype=torch.float32, device=flat.device)
            sums = sums.index_add(0, batch.emb_owner, flat[batch.emb_positions].float())
            counts = torch.bincount(batch.emb_owner, minlength=n).clamp(min=1)
            pooled = sums / counts[:, None]
        return F.normalize(pooled, dim=-1)

    def lm_loss(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Mean next-token loss over the labelled tokens; 0, not NaN, for a batch whose answers
        were all cut away by `data.max_text_tokens` (divided without a device sync)."""
        labelled = batch.lm_targets != IGNORE_INDEX
        logits = self.vlm.lm_head(hidden[labelled])
        total = F.cross_entropy(logits.float(), batch.lm_targets[labelled], reduction="sum")
        return total / labelled.sum().clamp(min=1)

    def forward(self, batch: PackedBatch, rank: int = 0, world_size: int = 1, *,
                cached: CachedGrads | None = None) -> LossTerms:
        """The step's loss terms. With `cached` the batch is one GradCache chunk (`cafe.gradcache`):
        nothing is gathered, `objective` (and `loss`) is the chunk's surrogate, `lm_loss` the
        chunk's own mean, and `query` / `target` its embeddings. GradCache's passes come through
        here, not through other methods, because under ZeRO-3 a parameter used outside its own
        module's forward (`image_newline`) is fetched only within the engine's forward, and each
        backward must follow such a forward for gradients to accumulate."""
        hidden = self.hidden_states(batch)
        lm = self.lm_loss(hidden, batch) if self.loss.compute_language_loss else None
        query = target = None
        if self.loss.compute_contrastive_loss:  # the pairs only: examples without one have no embedding
            emb = self.pool(hidden, batch)
            query, target = emb[: batch.num_pairs], emb[batch.num_pairs :]
        if cached is not None:
            surrogate = cached.surrogate(lm, query, target, self.loss)
            return LossTerms(objective=surrogate, loss=surrogate, lm_loss=lm, con_loss=None, query=query, target=target)
        return self.loss(lm_loss=lm, query=query, target=target, rank=rank, world_size=world_size,
                         pair_share=pair_share([batch]))

    @torch.no_grad()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Embeddings of an embedding-only batch (`Collator.embedding_batch`)."""
        return self.pool(self.hidden_states(batch), batch)
