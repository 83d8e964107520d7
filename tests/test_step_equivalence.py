"""The packed CAFe step against the plain three-pass computation (the reference's way: a full
multimodal forward for the conversation, one for the image prompt, one for the text prompt,
the vision tower in each pass that has images, full-vocabulary logits everywhere)."""
import random

import pytest
import torch

from cafe.batch import Collator, Example
from cafe.losses import CafeLoss, ContrastiveLoss
from cafe.model import CafeModel, load_vlm
from cafe.prompts import IGNORE_INDEX
from cafe.reference import three_pass_inputs, three_pass_step
from tests.conftest import random_image


def make_examples(seed, *, multimodal, unpaired=()):
    """Four examples; those in `unpaired` have no pair (empty target text, no target image)."""
    rng = random.Random(seed)
    examples = []
    for i in range(4):
        n_images = 2 if i == 1 else 1  # a multi-image sample takes the vision tower's other path
        images = [random_image(rng, rng.choice([64, 96, 128]), rng.choice([48, 64, 128])) for _ in range(n_images)]
        answer = " ".join(rng.choice(["red", "blue", "circle", "square", "left"]) for _ in range(rng.randint(2, 12)))
        question = "<image>\n" * n_images + "Describe the image" + " please" * rng.randint(0, 3)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i == 2:  # multi-turn: labels on both answers
            messages += [{"role": "user", "content": "how many"}, {"role": "assistant", "content": "two"}]
        target_images = [random_image(rng, 64, 64)] if multimodal and i % 2 == 0 else []
        if i in unpaired:
            answer, target_images = "", []
        examples.append(Example(images=images, messages=messages, target_text=answer,
                                query_text="what is here" if multimodal and i == 3 else None,
                                target_images=target_images))
    return examples


@pytest.mark.parametrize("unpaired", [(), (1, 2)], ids=["all-paired", "mixed-pairs"])
@pytest.mark.parametrize("emb_type", ["last", "mean"])
@pytest.mark.parametrize("multimodal", [False, True], ids=["text-target", "image-in-target"])
def test_packed_step_matches_three_pass(tiny_checkpoint, emb_type, multimodal, unpaired):
    """Mixed pairs: the plain passes embed the paired examples alone, the LM pass takes every one."""
    torch.manual_seed(0)
    vlm, processor = load_vlm(tiny_checkpoint)
    loss = CafeLoss(con_weight=0.7, contrastive=ContrastiveLoss(temperature=0.1, learnable=True))
    model = CafeModel(vlm, loss, emb_type=emb_type).train()
    for p in model.parameters():  # dropout-free and deterministic already; make sure
        p.requires_grad_(True)
    examples = make_examples(1, multimodal=multimodal, unpaired=unpaired)
    batch = Collator(processor)(examples)

    fast = model(batch)
    fast.objective.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref = three_pass_step(model, three_pass_inputs(processor, examples, batch))
    ref.objective.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for name in ("lm_loss", "con_loss"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, a.item(), b.item())
    assert fast_grads.keys() == ref_grads.keys()
    # Attention key biases have a gradient that is zero in exact arithmetic (softmax ignores a
    # constant shift), so their float noise is judged against the gradient's overall scale.
    scale = torch.stack([g.norm() for g in ref_grads.values()]).max()
    for name, g in ref_grads.items():
        err = (fast_grads[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * scale)
        assert err <= 1e-4, (name, err.item(), g.norm().item())


def gradients(*modules) -> dict[str, torch.Tensor]:
    """Every gradient of the modules' parameters (the loss's log-scale as "temperature"), cleared after."""
    grads = {}
    for module in modules:
        for name, p in module.named_parameters():
            if p.grad is not None:
                grads["temperature" if name == "log_scale" else name] = p.grad.clone()
                p.grad = None
    return grads


@pytest.mark.parametrize("blank", ["", "  \n", None])
def test_an_example_without_a_pair_has_no_embedding_prompts(tiny_checkpoint, blank):
    """No image is ever paired with an empty text: the example keeps its conversation only."""
    _, processor = load_vlm(tiny_checkpoint)
    examples = make_examples(2, multimodal=False)
    examples[1].target_text = blank
    batch = Collator(processor)(examples)
    assert [sorted(entry) for entry in batch.sequences] == [
        ["conversation", "query", "target"], ["conversation"], ["conversation", "query", "target"],
        ["conversation", "query", "target"]]
    assert (batch.num_examples, batch.num_pairs, batch.emb_last.shape[0]) == (4, 3, 6)


def test_unpaired_rows_train_the_lm_term_only(tiny_checkpoint):
    """A mixed batch's step is the LM step over every row plus the contrastive step over the
    paired rows alone: the same values and the same gradient on every parameter."""
    torch.manual_seed(0)
    vlm, processor = load_vlm(tiny_checkpoint)
    contrastive = ContrastiveLoss(temperature=0.1, learnable=True)

    def step(examples, **flags):
        loss = CafeLoss(alpha_lm=0.6, con_weight=0.7, contrastive=contrastive, **flags)
        terms = CafeModel(vlm, loss).train()(Collator(processor, **flags)(examples))
        return terms

    examples = make_examples(1, multimodal=False, unpaired=(1, 2))
    mixed = step(examples)
    mixed.objective.backward()
    want = gradients(vlm, contrastive)

    lm = step(examples, compute_contrastive_loss=False)
    con = step([ex for ex in examples if ex.has_pair], compute_language_loss=False)
    (lm.objective + con.objective).backward()
    got = gradients(vlm, contrastive)

    torch.testing.assert_close(mixed.lm_loss, lm.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.con_loss, con.con_loss, rtol=1e-5, atol=1e-6)
    assert (mixed.pair_share, lm.pair_share, con.pair_share) == (0.5, None, 1.0)
    assert got.keys() == want.keys() and "temperature" in want
    scale = torch.stack([g.norm() for g in want.values()]).max()
    for name, g in want.items():
        err = (got[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * scale)
        assert err <= 1e-4, (name, err.item(), g.norm().item())


def test_a_contrastive_only_batch_without_pairs_still_runs_the_step(tiny_checkpoint):
    """LM term off and no pair in the batch: the conversations go through unlabelled, so the model
    runs (and, on several ranks, joins every collective) and each parameter gets a zero gradient."""
    vlm, processor = load_vlm(tiny_checkpoint)
    contrastive = ContrastiveLoss(learnable=True)
    model = CafeModel(vlm, CafeLoss(compute_language_loss=False, contrastive=contrastive)).train()
    batch = Collator(processor, compute_language_loss=False)(make_examples(3, multimodal=False, unpaired=range(4)))
    assert batch.num_pairs == 0 and (batch.lm_targets == IGNORE_INDEX).all() and batch.pixel_values is not None
    terms = model(batch)
    terms.objective.backward()
    assert terms.con_loss.item() == 0.0 and terms.pair_share == 0.0
    grads = gradients(vlm, contrastive)
    assert "temperature" in grads and any(".vision_tower." in name for name in grads)
    assert all(not g.any() for g in grads.values())


def test_a_batch_whose_answers_were_all_cut_has_a_zero_lm_term(tiny_checkpoint):
    """Every answer cut away by `data.max_text_tokens`: the LM term is 0 (not NaN, which would
    stop training as a non-finite loss) and the contrastive term still trains."""
    vlm, processor = load_vlm(tiny_checkpoint)
    model = CafeModel(vlm, CafeLoss(con_weight=0.5, contrastive=ContrastiveLoss())).train()
    batch = Collator(processor)(make_examples(4, multimodal=False))
    batch.lm_targets = torch.full_like(batch.lm_targets, IGNORE_INDEX)
    terms = model(batch)
    terms.objective.backward()
    assert terms.lm_loss.item() == 0.0 and torch.isfinite(terms.loss) and terms.con_loss.item() > 0
    grads = gradients(vlm)
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.any() for g in grads.values())


def test_packed_step_in_bfloat16(tiny_checkpoint):
    """The training dtype on GPUs: the packed step casts what it must (image features, pooled
    embeddings and logits to float32 for the losses) and lands near the float32 result."""
    examples = make_examples(1, multimodal=True)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        vlm, processor = load_vlm(tiny_checkpoint, dtype=dtype)
        model = CafeModel(vlm, CafeLoss()).train()
        batch = Collator(processor)(examples)
        fast = model(batch.to("cpu", dtype))
        fast.objective.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        ref = three_pass_step(model, {k: v.to("cpu", dtype)
                                      for k, v in three_pass_inputs(processor, examples, batch).items()})
        losses[dtype] = (fast, ref)
    for fast, ref in losses.values():
        assert fast.lm_loss.dtype == fast.con_loss.dtype == torch.float32
        torch.testing.assert_close(fast.lm_loss, ref.lm_loss.float(), rtol=1e-2, atol=0)
        torch.testing.assert_close(fast.con_loss, ref.con_loss, rtol=1e-2, atol=0)
    (full, _), (half, _) = losses[torch.float32], losses[torch.bfloat16]
    torch.testing.assert_close(half.lm_loss, full.lm_loss.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(half.con_loss, full.con_loss.detach(), rtol=2e-2, atol=0)


def test_vision_tower_encodes_each_distinct_view_once(tiny_checkpoint):
    """A square image's one anyres crop is its base view, and an image shown twice repeats all
    its views: the tower takes each distinct view once, and the features, and the tower's
    gradients, are those of encoding every view."""
    torch.manual_seed(0)
    vlm, processor = load_vlm(tiny_checkpoint)
    model = CafeModel(vlm, CafeLoss()).train()
    rng = random.Random(3)
    square, wide = random_image(rng, 64, 64), random_image(rng, 128, 64)
    examples = [Example(images=[img], messages=[{"role": "user", "content": "<image>\nDescribe"},
                                                {"role": "assistant", "content": "a shape"}], target_text="a shape")
                for img in (square, wide, square)]
    batch = Collator(processor)(examples)
    seen = []
    patches = vlm.model.vision_tower.embeddings.patch_embedding  # inside the tower's forward
    handle = patches.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    fast = model.image_features(batch)
    handle.remove()
    # views: square base, square crop (same), wide base, wide crop, square again (same two)
    assert seen == [3]
    fast.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in vlm.model.vision_tower.named_parameters() if p.grad is not None}
    model.zero_grad()
    every = vlm.model.get_image_features(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                                         batch_num_images=batch.batch_num_images).pooler_output
    every = torch.cat(list(every))
    every.square().sum().backward()
    assert torch.allclose(fast, every, atol=1e-6)
    every_grads = {n: p.grad for n, p in vlm.model.vision_tower.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == every_grads.keys() and fast_grads
    for name, grad in every_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name
