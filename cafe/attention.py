"""Attention over packed CAFe rows that scores only the pairs the tree mask allows.

As a dense (L, L) mask per row (`tests/test_packed_attention.py` builds one), SDPA would score every pair
of a row although fewer than half are allowed: units sit side by side in a row, and a unit's
query branch sits beside its conversation. Here a unit's trunk and first branch form one causal
sequence; those sequences are batched by length and run through causal SDPA without a mask
(the fast kernel path). A unit's other branches (the query prompt beside the conversation)
attend to [trunk keys, own keys] in one small masked SDPA. Token order inside a unit is position
order (`cafe.batch`), so this equals masked attention with the dense mask on every real token;
padding tokens get a zero output, which nothing reads.

The language model reaches this through `AttentionInterface`: `route_packed_attention` renames its
attention implementation to a registered wrapper that takes `PackedAttention` plans as the
attention mask and hands every other call (plain forwards through the same model) to the
implementation the model was loaded with.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TRUNK, CONVERSATION, QUERY = 0, 1, 2  # branch ids inside a unit (`cafe.batch`)
BASES = ("sdpa", "eager")
LENGTH_RATIO = 0.8  # causal sequences shorter than this fraction of their batch's longest start a new batch
# PyTorch's CPU flash kernel scores whole key blocks (up to 512 keys) even under is_causal, so a
# causal sequence costs L^2; in query blocks it costs about L^2 / 2 + L * block / 2.
CPU_QUERY_BLOCK = 64


@dataclass(frozen=True, slots=True)
class AttentionCall:
    """One SDPA call: `sequences` rows of `queries` query tokens against `keys` key tokens."""

    sequences: int
    queries: int
    keys: int
    mask: torch.Tensor | None  # (sequences, 1, queries, keys) bool; None: causal


@dataclass(frozen=True, slots=True)
class PackedAttention:
    """Where each attention call of a packed forward takes its tokens from, built once per batch
    (by the collator) and shared by every layer. Queries (and keys) of all calls are gathered
    with one index each, so autograd scatters each gradient back once, not once per call."""

    calls: list[AttentionCall]  # causal length batches, then the branch call if any
    query_index: torch.Tensor  # (sum of sequences * queries,) token of each gathered query, calls in order
    key_index: torch.Tensor  # (sum of sequences * keys,) token of each gathered key / value
    output: torch.Tensor  # (rows * length,) row of the concatenated outputs for each token; padding: the zero row
    pairs: int  # (query, key) pairs the mask allows, padding aside: the attention work

    def to(self, device: torch.device | str) -> PackedAttention:
        calls = [AttentionCall(c.sequences, c.queries, c.keys, None if c.mask is None else c.mask.to(device))
                 for c in self.calls]
        return PackedAttention(calls=calls, query_index=self.query_index.to(device),
                               key_index=self.key_index.to(device), output=self.output.to(device), pairs=self.pairs)


def _runs(unit: torch.Tensor, branch: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(unit, branch, start, length) of each run of equal unit and branch, in flat token order."""
    rows, length = unit.shape
    u, b = unit.flatten(), branch.flatten()
    change = torch.ones_like(u, dtype=torch.bool)
    change[1:] = (u[1:] != u[:-1]) | (b[1:] != b[:-1])
    change[::length] = True
    starts = change.nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([u.numel()])])
    return list(zip(u[starts].tolist(), b[starts].tolist(), starts.tolist(), (ends - starts).tolist()))


def _padded(spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """Token indices of each (start, length) span, right-padded by repeating its last token."""
    steps = torch.arange(width)
    return torch.stack([start + steps.clamp(max=n - 1) for start, n in spans])


def _unit_spans(unit: torch.Tensor, branch: torch.Tensor):
    """Per unit, (start, length) of its causal sequence (trunk + first branch), and
    (trunk start, trunk length, start, length) of each further branch."""
    sequences: list[tuple[int, int]] = []
    branches: list[tuple[int, int, int, int]] = []
    runs = [r for r in _runs(unit, branch) if r[0] >= 0]
    seen: set[int] = set()
    i = 0
    while i < len(runs):
        u, b, start, n = runs[i]
        if u in seen:
            raise ValueError(f"unit {u} is not contiguous in its row")
        seen.add(u)
        j = i + 1
        while j < len(runs) and runs[j][0] == u:
            j += 1
        trunk = n if b == TRUNK else 0
        own = runs[i + 1 : j] if trunk else runs[i:j]
        if any(r[1] == TRUNK for r in own):
            raise ValueError(f"unit {u} has trunk tokens after a branch")
        sequences.append((start, trunk + (own[0][3] if own else 0)))
        branches += [(start, trunk, s, m) for _, _, s, m in own[1:]]
        i = j
    return sequences, branches


def _length_batches(sequences: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Longest first; a sequence much shorter than its batch's longest starts a new batch."""
    batches: list[list[tuple[int, int]]] = []
    for span in sorted(sequences, key=lambda span: -span[1]):
        if not batches or span[1] < LENGTH_RATIO * batches[-1][0][1]:
            batches.append([])
        batches[-1].append(span)
    return batches


def plan_packed_attention(unit: torch.Tensor, branch: torch.Tensor) -> PackedAttention:
    """The attention plan of packed rows (`PackedBatch.unit` / `.branch`), on their device.
    The collator builds it on the CPU, so the step never waits for a device-to-host copy."""
    device, unit, branch = unit.device, unit.cpu(), branch.cpu()
    sequences, branches = _unit_spans(unit, branch)
    output = torch.full((unit.numel(),), -1, dtype=torch.long)
    calls: list[AttentionCall] = []
    query_index: list[torch.Tensor] = []
    key_index: list[torch.Tensor] = []
    offset = 0  # outputs are concatenated in call order, each call's (sequences, width) flattened

    def place(spans: list[tuple[int, int]], width: int) -> None:
        nonlocal offset
        for slot, (start, n) in enumerate(spans):
            output[start : start + n] = torch.arange(n) + offset + slot * width
        offset += len(spans) * width

    for spans in _length_batches(sequences):
        width = spans[0][1]
        index = _padded(spans, width)
        calls.append(AttentionCall(len(spans), width, width, None))
        query_index.append(index)
        key_index.append(index)
        place(spans, width)

    if branches:
        own = [(s, n) for _, _, s, n in branches]
        width = max(n for _, n in own)
        trunk_width = max(t for _, t, _, _ in branches)
        queries = _padded(own, width)
        keys = queries
        if trunk_width:  # a trunk of length 0 takes one masked key, so the index stays in the unit
            trunk_keys = _padded([(ts, max(t, 1)) for ts, t, _, _ in branches], trunk_width)
            keys = torch.cat([trunk_keys, queries], dim=1)
        trunk_lengths = torch.tensor([t for _, t, _, _ in branches])
        sees_trunk = torch.arange(trunk_width)[None, None, :] < trunk_lengths[:, None, None]
        sees_own = torch.ones(width, width, dtype=torch.bool).tril()
        mask = torch.cat([sees_trunk.expand(-1, width, -1), sees_own.expand(len(branches), -1, -1)], dim=2)
        calls.append(AttentionCall(len(branches), width, keys.shape[1], mask[:, None].to(device)))
        query_index.append(queries)
        key_index.append(keys)
        place(own, width)
    output[output < 0] = offset  # padding: the zero row after every output

    pairs = sum(n * (n + 1) // 2 for _, n in sequences) + sum(t * n + n * (n + 1) // 2 for _, t, _, n in branches)
    return PackedAttention(
        calls=calls,
        query_index=torch.cat([i.flatten() for i in query_index]).to(device),
        key_index=torch.cat([i.flatten() for i in key_index]).to(device),
        output=output.to(device),
        pairs=pairs,
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, scale, dropout) -> torch.Tensor:
    """SDPA over one call's gathered tokens (flat, (tokens, heads, dim)); (tokens, heads, dim) out."""
    def sequences(x, width):
        return x.view(call.sequences, width, *x.shape[1:]).transpose(1, 2)

    sdpa = partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scale, enable_gqa=True)
    q, k, v = sequences(q, call.queries), sequences(k, call.keys), sequences(v, call.keys)
    if call.mask is not None:  # SDPA's fused CUDA kernels take a mask or grouped KV heads, not both
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if call.mask is not None or q.device.type != "cpu" or call.queries <= 2 * CPU_QUERY_BLOCK:
        out = sdpa(q, k, v, attn_mask=call.mask, is_causal=call.mask is None)
    else:  # causal on CPU: query blocks, each against the keys up to its end (lower-right causal mask)
        blocks = []
        for start, q_block in zip(range(0, call.queries, CPU_QUERY_BLOCK), q.split(CPU_QUERY_BLOCK, dim=2)):
            end = start + q_block.shape[2]
            causal = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)
            blocks.append(sdpa(q_block, k[:, :, :end], v[:, :, :end], attn_mask=causal))
        out = torch.cat(blocks, dim=2)
    return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])


@torch.compiler.disable  # plan-driven Python control flow: compiled blocks run it eagerly, without recompiling
def packed_attention_forward(module, query, key, value, plan: PackedAttention, *, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: (rows, heads, length, dim) in, (rows, length, heads, dim) out."""
    rows, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * length, x.shape[1], dim) for x in (query, key, value))
    q = q.index_select(0, plan.query_index).split([c.sequences * c.queries for c in plan.calls])
    k, v = (x.index_select(0, plan.key_index).split([c.sequences * c.keys for c in plan.calls]) for x in (k, v))
    outs = [_attend(*qkv, call, scaling, dropout) for *qkv, call in zip(q, k, v, plan.calls)]
    outs.append(query.new_zeros(1, heads, dim))
    return torch.cat(outs).index_select(0, plan.output).view(rows, length, heads, dim), None


def _wrapper(base: str):
    def forward(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, PackedAttention):
            return packed_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if base == "eager":  # each model defines its own eager function, next to its attention module
            return sys.modules[type(module).__module__].eager_attention_forward(
                module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return forward


for _base in BASES:
    AttentionInterface.register(f"cafe_packed_{_base}", _wrapper(_base))
    AttentionMaskInterface.register(f"cafe_packed_{_base}", ALL_MASK_ATTENTION_FUNCTIONS[_base])


def route_packed_attention(config: PretrainedConfig) -> None:
    """Make a language model (by its config) accept `PackedAttention` plans as attention masks."""
    name = config._attn_implementation
    if name.startswith("cafe_packed_"):
        return
    if any(kind != "full_attention" for kind in config.layer_types):
        raise ValueError(f"packed CAFe batches need full attention in every layer, not {set(config.layer_types)}")
    if name not in BASES:
        raise ValueError(f"packed CAFe batches need attn_implementation 'sdpa' or 'eager', not {name!r}")
    config._attn_implementation = f"cafe_packed_{name}"
