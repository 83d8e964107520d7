"""Segment-wise packed attention (`cafe.attention`) against SDPA with the dense tree mask, and
the packed step under eager attention and activation recompute."""
import random

import pytest
import torch
import torch.nn.functional as F

from cafe.attention import (
    CONVERSATION,
    QUERY,
    TRUNK,
    packed_attention_forward,
    plan_packed_attention,
    route_packed_attention,
)
from cafe.batch import Collator, Example
from cafe.losses import CafeLoss
from cafe.model import CafeModel, load_vlm
from tests.conftest import random_image


def dense_tree_mask(unit: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) bool: a token sees earlier tokens of its own unit that are in the trunk or in
    its own branch; padding sees only itself. The definition `cafe.attention` must compute."""
    same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
    causal = position_ids[:, None, :] <= position_ids[:, :, None]
    visible_branch = (branch[:, None, :] == TRUNK) | (branch[:, None, :] == branch[:, :, None])
    allowed = same_unit & causal & visible_branch
    return (allowed | torch.eye(unit.shape[1], dtype=torch.bool))[:, None]


def rows_from_units(rows: list[list[list[tuple[int, int]]]]):
    """unit / branch / position tensors from rows of units, each unit a list of (branch, tokens)
    runs; rows are right-padded with -1 units. Branch positions continue from the trunk."""
    length = max(sum(n for unit in row for _, n in unit) for row in rows) + 2
    unit = torch.full((len(rows), length), -1)
    branch = torch.zeros_like(unit)
    position = torch.zeros_like(unit)
    u = 0
    for r, row in enumerate(rows):
        at = 0
        for runs in row:
            trunk = runs[0][1] if runs[0][0] == TRUNK else 0
            for b, n in runs:
                first = 0 if b == TRUNK else trunk
                unit[r, at : at + n], branch[r, at : at + n] = u, b
                position[r, at : at + n] = torch.arange(first, first + n)
                at += n
            u += 1
    return unit, branch, position


def collated_rows(multimodal: bool):
    rng = random.Random(0)
    examples = []
    for i in range(3):
        images = [random_image(rng, 64, 64)] * (1 + (i == 1))
        answer = " ".join(rng.choice(["red", "blue", "circle"]) for _ in range(2 + 3 * i))
        messages = [{"role": "user", "content": "<image>\n" * len(images) + "Describe"},
                    {"role": "assistant", "content": answer}]
        examples.append(Example(images=images, messages=messages, target_text=answer,
                                query_text="what is here" if multimodal and i == 2 else None,
                                target_images=[random_image(rng, 64, 64)] if multimodal and i == 0 else []))
    return examples


SYNTHETIC = [
    [[(TRUNK, 5), (CONVERSATION, 4), (QUERY, 3)], [(TRUNK, 3)]],  # unit with two branches, then a target
    # no trunk, 1-token spans
    [[(QUERY, 6)], [(CONVERSATION, 2), (QUERY, 2)], [(TRUNK, 1), (CONVERSATION, 1), (QUERY, 1)]],
]


@pytest.mark.parametrize("source", ["synthetic", "collated", "collated-multimodal", "embedding-only", "lm-only"])
def test_packed_attention_matches_dense_mask(tiny_checkpoint, source):
    if source == "synthetic":
        unit, branch, position = rows_from_units(SYNTHETIC)
    else:
        _, processor = load_vlm(tiny_checkpoint)
        examples = collated_rows(multimodal=source == "collated-multimodal")
        if source == "embedding-only":
            batch = Collator(processor).embedding_batch([(ex.target_text, ex.images) for ex in examples])
        else:
            batch = Collator(processor, compute_contrastive_loss=source != "lm-only")(examples)
        unit, branch, position = batch.unit, batch.branch, batch.position_ids
    rows, length = unit.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, h, length, 8, generator=g, dtype=torch.float64).requires_grad_(True)
               for h in (4, 2, 2))
    scale = 0.3

    module = torch.nn.Module()
    got, _ = packed_attention_forward(module, q, k, v, plan_packed_attention(unit, branch), scaling=scale)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_tree_mask(unit, branch, position), scale=scale,
                                          enable_gqa=True).transpose(1, 2)
    real = unit >= 0  # padding outputs are never read
    torch.testing.assert_close(got[real], want[real])
    weights = torch.randn(got.shape, generator=g, dtype=torch.float64) * real[..., None, None]
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["eager", "recompute"])
def test_packed_step_under_eager_and_recompute(tiny_checkpoint, variant):
    """Same losses and gradients as the plain sdpa packed step."""
    examples = collated_rows(multimodal=True)
    results = []
    for attn, recompute in (("sdpa", False), ("eager" if variant == "eager" else "sdpa", variant == "recompute")):
        torch.manual_seed(0)
        vlm, processor = load_vlm(tiny_checkpoint, attn_implementation=attn)
        if recompute:
            vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = CafeModel(vlm, CafeLoss()).train()
        terms = model(Collator(processor)(examples))
        terms.objective.backward()
        results.append((terms.objective.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        # float32 summation order differs between the kernels: judged against the gradient's scale
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=name)


def test_unsupported_attention_is_a_clear_error(tiny_checkpoint):
    vlm, _ = load_vlm(tiny_checkpoint)
    config = vlm.model.language_model.config
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa' or 'eager'"):
        route_packed_attention(config)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_plain_forward_unchanged_after_routing(tiny_checkpoint, attn):
    """The reference's ordinary forwards go through the routed model too: same hidden states."""
    vlm, _ = load_vlm(tiny_checkpoint, attn_implementation=attn)
    language_model = vlm.model.language_model
    ids, mask = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    before = language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    route_packed_attention(language_model.config)
    assert language_model.config._attn_implementation == f"cafe_packed_{attn}"
    torch.testing.assert_close(language_model(input_ids=ids, attention_mask=mask).last_hidden_state, before)
