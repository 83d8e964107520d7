"""From decoded examples to one packed CAFe batch.

Per example the step needs three sequences: the conversation (labels on assistant tokens),
the query embedding prompt (the images, or `multimodal_input`'s user turn) and the target
embedding prompt (the pair text, or the assistant turn). The conversation and the query
prompt start with the same tokens (system, user header, image tokens), so they become one
*unit*: a shared trunk plus two branches that each attend to the trunk and to themselves.
The target prompt is a unit of its own. Units sit side by side in one row, so there is no
padding, and every image is encoded once however many sequences show it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from cafe.attention import CONVERSATION, QUERY, TRUNK, PackedAttention, plan_packed_attention
from cafe.prompts import IGNORE_INDEX, IMAGE_TOKEN, first_exchanges, strip_image_tokens
from cafe.sequences import (
    PieceTokenizer,
    Sequence,
    encode_conversation,
    encode_embedding_prompt,
    expand_image_tokens,
)


@dataclass(slots=True)
class Example:
    """One training row, decoded. `query_text=None` embeds the images alone (the default
    image<->caption pairing); `target_images` only occur with `multimodal_input`. Without a
    target (no text, or blank, and no image) the example has no pair: it trains the LM term
    and takes no part in the contrastive term."""

    images: list[Image.Image]
    messages: list[dict]
    target_text: str | None
    query_text: str | None = None
    target_images: list[Image.Image] = field(default_factory=list)

    @property
    def has_pair(self) -> bool:
        return bool(self.target_images) or bool(self.target_text and self.target_text.strip())


@dataclass(slots=True)
class PackedBatch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length) positions as each sequence would see them alone
    unit: torch.Tensor  # (rows, length) unit id, -1 on padding
    branch: torch.Tensor  # (rows, length) TRUNK / CONVERSATION / QUERY (target units: TRUNK)
    feature_index: torch.Tensor  # (rows, length) row of the concatenated image features, -1 for text
    lm_targets: torch.Tensor  # (rows, length) next-token label at each position, IGNORE_INDEX elsewhere
    emb_last: torch.Tensor  # (2 * pairs,) flat position of each embedding's last token: queries then targets
    emb_positions: torch.Tensor  # flat positions of every embedding-prompt token (for mean pooling)
    emb_owner: torch.Tensor  # which embedding each of those positions belongs to
    pixel_values: torch.Tensor | None  # (images, crops, 3, H, W)
    image_sizes: torch.Tensor | None  # (images, 2)
    batch_num_images: list[int]  # images per prompt group, as the vision tower expects
    tokens_per_image: list[int]
    num_examples: int
    num_pairs: int  # examples in the contrastive term (those with a pair); an embedding-only batch has none
    attention: PackedAttention  # which tokens attend to which: built here, on the CPU, once per batch
    # unpacked sequences (expanded), kept for the plain three-pass reference and for debugging
    sequences: list[dict[str, tuple[list[int], list[int], list[int]]]]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        moved = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if (dtype is not None and value.is_floating_point()) else None)
            elif isinstance(value, PackedAttention):
                value = value.to(device)
            moved[name] = value
        return PackedBatch(**moved)


def tokens_per_image(processor, image_inputs: dict) -> list[int]:
    """How many `<image>` tokens each image expands to: the processor's own rule."""
    n = len(image_inputs["image_sizes"])
    return [len(processor.replace_image_token(image_inputs, i)) // len(IMAGE_TOKEN) for i in range(n)]


def _common_prefix(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    # each branch keeps at least one token of its own, so every sequence ends in its branch
    return min(n, len(a) - 1, len(b) - 1)


class Collator:
    """Turns examples into a `PackedBatch`. Runs in data-loader workers (CPU only)."""

    def __init__(self, processor, *, compute_language_loss: bool = True, compute_contrastive_loss: bool = True,
                 max_text_tokens: int = 0, max_turns: int = 0) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pieces = PieceTokenizer(processor.tokenizer)  # the same texts come back every batch and epoch
        self.image_token_id = processor.image_token_id
        self.with_lm = compute_language_loss
        self.with_con = compute_contrastive_loss
        self.max_text_tokens = max_text_tokens
        self.max_turns = max_turns
        self.truncated = 0  # sequences cut to max_text_tokens so far (the loop reports them)

    def encode_images(self, groups: list[list[Image.Image]]) -> tuple[dict | None, list[int]]:
        flat = [img for group in groups for img in group]
        if not flat:
            return None, []
        inputs = dict(self.processor.image_processor(images=flat, return_tensors="pt"))
        inputs["batch_num_images"] = [len(g) for g in groups if g]
        return inputs, tokens_per_image(self.processor, inputs)

    def __call__(self, examples: list[Example]) -> PackedBatch:
        paired = [self.with_con and ex.has_pair for ex in examples]
        # The LM term off and no pair: nothing to learn, but the step (and every collective in it)
        # must still run, so the conversations go through without labels.
        idle = not (self.with_lm or any(paired))
        groups: list[list[Image.Image]] = []
        seqs: list[dict[str, Sequence]] = []
        next_image = 0
        for ex, with_pair in zip(examples, paired):
            images = ex.images if self.with_lm or with_pair or idle else []  # none that no sequence shows
            own = list(range(next_image, next_image + len(images)))
            next_image += len(images)
            groups.append(images)
            target_images = ex.target_images if with_pair else []
            tgt = list(range(next_image, next_image + len(target_images)))
            next_image += len(target_images)
            groups.append(target_images)
            entry = {}
            if self.with_lm or idle:
                conversation = self._conversation(ex.messages, own)
                entry["conversation"] = conversation if self.with_lm else _unlabelled(conversation)
            if with_pair:
                query_text = ex.query_text
                if not own and not query_text:  # a text-only row: its user turn is the query
                    query_text = strip_image_tokens(next(m["content"] for m in ex.messages if m["role"] == "user"))
                entry["query"] = self._embedding_prompt(query_text, own)
                entry["target"] = self._embedding_prompt(ex.target_text, tgt)
            seqs.append(entry)
        return self._finish(groups, seqs)

    def embedding_batch(self, inputs: list[tuple[str | None, list[Image.Image]]]) -> PackedBatch:
        """Pack embedding prompts only (text and/or images each), e.g. for evaluation."""
        groups, seqs, next_image = [], [], 0
        for text, images in inputs:
            slots = list(range(next_image, next_image + len(images)))
            next_image += len(images)
            groups.append(images)
            seqs.append({"query": encode_embedding_prompt(self.pieces, text, slots)})
        return self._finish(groups, seqs)

    def _finish(self, groups, seqs) -> PackedBatch:
        image_inputs, per_image = self.encode_images(groups)
        expanded = [{k: expand_image_tokens(s, self.image_token_id, per_image) for k, s in entry.items()}
                    for entry in seqs]
        if self.max_text_tokens:
            for entry in expanded:
                if "conversation" in entry:
                    entry["conversation"] = self._cut_conversation(*entry["conversation"])
        return self._pack(expanded, image_inputs, per_image)

    def _conversation(self, messages: list[dict], images: list[int]) -> Sequence:
        """The conversation, cut to its first `max_turns` exchanges; it shows the images whose
        `<image>` placeholders it keeps (the query prompt still shows them all)."""
        if self.max_turns:
            messages = first_exchanges(messages, self.max_turns)
            images = images[: sum(m["content"].count(IMAGE_TOKEN) for m in messages)]
        return encode_conversation(self.pieces, messages, images)

    def _cut_conversation(self, ids: list[int], labels: list[int], owner: list[int]) -> tuple[list, list, list]:
        """A conversation past max_text_tokens loses its tail (the research code's model_max_length
        truncation, counted in text tokens so an image's features stay whole)."""
        text = 0
        for end, who in enumerate(owner):
            text += who < 0
            if text > self.max_text_tokens:
                self.truncated += 1
                return ids[:end], labels[:end], owner[:end]
        return ids, labels, owner

    def _embedding_prompt(self, text: str | None, slots: list[int]) -> Sequence:
        """An embedding prompt whose text is cut until the prompt fits max_text_tokens."""
        seq = encode_embedding_prompt(self.pieces, text, slots)
        excess = self._text_tokens(seq) - self.max_text_tokens if self.max_text_tokens else 0
        if excess <= 0:
            return seq
        self.truncated += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        while excess > 0 and ids:  # re-encoding cut text can merge differently: cut until it fits
            ids = ids[: max(0, len(ids) - excess)]
            seq = encode_embedding_prompt(self.pieces, self.tokenizer.decode(ids) or None, slots)
            excess = self._text_tokens(seq) - self.max_text_tokens
        return seq

    def _text_tokens(self, seq: Sequence) -> int:
        return sum(1 for t in seq.ids if t != self.image_token_id)

    def _pack(self, expanded, image_inputs, per_image) -> PackedBatch:
        offsets = [0]
        for n in per_image:
            offsets.append(offsets[-1] + n)
        units: list[list[tuple]] = []  # per unit: (token, position, branch, feature row, lm target)
        query_units, target_units, emb_spans = [], [], []  # emb_spans: unit-local token indices
        for entry in expanded:
            conv, query = entry.get("conversation"), entry.get("query")
            tokens: list[tuple] = []
            if conv:
                trunk = _common_prefix(list(zip(conv[0], conv[2])), list(zip(query[0], query[2]))) if query else 0
                lm = conv[1][1:] + [IGNORE_INDEX]  # position j predicts token j + 1
                tokens += _unit_tokens(conv, 0, trunk, TRUNK, offsets, lm)
                tokens += _unit_tokens(conv, trunk, len(conv[0]), CONVERSATION, offsets, lm)
            if query:
                trunk = trunk if conv else 0
                start = len(tokens)
                tokens += _unit_tokens(query, trunk, len(query[0]), QUERY, offsets)
                query_units.append(len(units))
                emb_spans.append(list(range(trunk)) + list(range(start, len(tokens))))
            units.append(tokens)
            if "target" in entry:
                target = entry["target"]
                target_units.append(len(units))
                units.append(_unit_tokens(target, 0, len(target[0]), TRUNK, offsets))
        emb_spans += [list(range(len(units[u]))) for u in target_units]
        return self._row(units, query_units + target_units, emb_spans, image_inputs, per_image, expanded,
                         num_pairs=len(target_units))

    def _row(self, units, emb_units, emb_spans, image_inputs, per_image, expanded, *, num_pairs: int) -> PackedBatch:
        # Every unit side by side in one row: no padding at all. Attention never crosses units
        # (`cafe.attention` runs each unit's sequences on their own), so the row's length costs
        # nothing by itself.
        unit_start = [0]
        for tokens in units[:-1]:
            unit_start.append(unit_start[-1] + len(tokens))
        packed = torch.tensor([[t for tokens in units for t in tokens]], dtype=torch.long)  # (1, tokens, 5)
        input_ids, position_ids, branch, feature_index, lm_targets = packed.unbind(-1)
        unit_ids = torch.tensor([[u for u, tokens in enumerate(units) for _ in tokens]], dtype=torch.long)
        branch = branch.contiguous()
        emb_last, emb_positions, emb_owner = [], [], []
        for e, (u, span) in enumerate(zip(emb_units, emb_spans)):
            flat = [unit_start[u] + k for k in span]
            emb_last.append(flat[-1])
            emb_positions += flat
            emb_owner += [e] * len(flat)
        return PackedBatch(
            input_ids=input_ids.contiguous(),
            position_ids=position_ids.contiguous(),
            unit=unit_ids,
            branch=branch,
            feature_index=feature_index.contiguous(),
            lm_targets=lm_targets.contiguous(),
            emb_last=torch.tensor(emb_last, dtype=torch.long),
            emb_positions=torch.tensor(emb_positions, dtype=torch.long),
            emb_owner=torch.tensor(emb_owner, dtype=torch.long),
            pixel_values=image_inputs["pixel_values"] if image_inputs else None,
            image_sizes=image_inputs["image_sizes"] if image_inputs else None,
            batch_num_images=image_inputs["batch_num_images"] if image_inputs else [],
            tokens_per_image=per_image,
            num_examples=len(expanded),
            num_pairs=num_pairs,
            attention=plan_packed_attention(unit_ids, branch),
            sequences=expanded,
        )


def _unlabelled(seq: Sequence) -> Sequence:
    return Sequence(seq.ids, [IGNORE_INDEX] * len(seq.ids), seq.image_slots)


def pair_share(batches: list[PackedBatch]) -> float:
    """The share of the batches' examples that take part in the contrastive term."""
    return sum(b.num_pairs for b in batches) / sum(b.num_examples for b in batches)


def _unit_tokens(seq, start: int, stop: int, branch: int, offsets: list[int],
                 lm: list[int] | None = None) -> list[tuple]:
    """Tokens start..stop of an expanded sequence as packed-token tuples. An image's tokens are
    contiguous in a sequence, so its k-th token takes row offsets[image] + k of the features."""
    ids, _, owner = seq
    out = []
    first_seen: dict[int, int] = {}
    for j in range(stop):
        image = owner[j]
        if image >= 0:
            first_seen.setdefault(image, j)
        if j < start:
            continue
        row = offsets[image] + j - first_seen[image] if image >= 0 else -1
        out.append((ids[j], j, branch, row, lm[j] if lm is not None else IGNORE_INDEX))
    return out
