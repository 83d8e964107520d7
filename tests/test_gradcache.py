"""GradCache (`cafe.gradcache`) against the unchunked packed step on the tiny model: the same
loss terms and the same gradient on every parameter, the learnable temperature (and sigmoid
bias) included, for even and uneven chunks, with either loss term switched off, with dropout
(each chunk's second forward replays its first's random state), and on two gloo ranks."""
import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cafe.batch import Collator, Example
from cafe.gradcache import chunked, gradcache_step
from cafe.losses import CafeLoss, ContrastiveLoss, LossTerms
from cafe.model import CafeModel, load_vlm
from cafe.prompts import IGNORE_INDEX
from tests.conftest import random_image

EXAMPLES = 6
CASES = {
    "both-terms": dict(),
    "sigmoid": dict(kind="sigmoid"),
    "lm-off": dict(compute_language_loss=False),
    "contrastive-off": dict(compute_contrastive_loss=False),
}


def make_examples(seed: int, n: int = EXAMPLES, unpaired: tuple[int, ...] = ()) -> list[Example]:
    """`n` examples; those in `unpaired` have no pair (they train the LM term only)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        n_images = 2 if i == 1 else 1
        images = [random_image(rng, rng.choice([64, 96, 128]), rng.choice([48, 64, 128])) for _ in range(n_images)]
        answer = " ".join(rng.choice(["red", "blue", "circle", "square", "left"]) for _ in range(rng.randint(2, 12)))
        messages = [{"role": "user", "content": "<image>\n" * n_images + "Describe the image"},
                    {"role": "assistant", "content": answer}]
        if i == 2:  # multi-turn: a chunk's share of labelled tokens differs from its share of examples
            messages += [{"role": "user", "content": "how many"}, {"role": "assistant", "content": "two"}]
        target_images = [random_image(rng, 64, 64)] if i == 4 else []
        if i in unpaired:
            answer, target_images = "", []
        examples.append(Example(images=images, messages=messages, target_text=answer, target_images=target_images))
    return examples


def build(checkpoint, *, kind="infonce", **flags) -> tuple[CafeModel, Collator]:
    vlm, processor = load_vlm(checkpoint)
    contrastive = ContrastiveLoss(kind=kind, temperature=0.1, learnable=True, sigmoid_bias=-2.0)
    loss = CafeLoss(alpha_lm=0.6, con_weight=1.3, contrastive=contrastive, **flags)
    model = CafeModel(vlm, loss).train()
    return model, Collator(processor, compute_language_loss=loss.compute_language_loss,
                           compute_contrastive_loss=loss.compute_contrastive_loss)


def gradients(model: CafeModel) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def unchunked(model, collator, examples, rank=0, world_size=1):
    terms = model(collator(examples), rank, world_size)
    terms.objective.backward()
    return terms, gradients(model)


def chunked_step(model, collator, examples, chunk_size, rank=0, world_size=1):
    terms = gradcache_step(model, [collator(c) for c in chunked(examples, chunk_size)], rank, world_size)
    return terms, gradients(model)


def assert_same_step(got, want):
    (got_terms, got_grads), (want_terms, want_grads) = got, want
    for name in ("objective", "loss", "lm_loss", "con_loss"):
        a, b = getattr(got_terms, name), getattr(want_terms, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert not a.requires_grad, name  # reported values are detached
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert got_grads.keys() == want_grads.keys()
    # judged against the gradient's overall scale, as tests/test_step_equivalence.py does: some
    # gradients (attention key biases) are zero in exact arithmetic and only float noise here
    scale = torch.stack([g.norm() for g in want_grads.values()]).max()
    for name, g in want_grads.items():
        err = (got_grads[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * scale)
        assert err <= 1e-4, (name, err.item(), g.norm().item())


# mixed pairs: chunks of 2 give a chunk without a pair (rows 2 and 3), chunks of 4 two pairs each
@pytest.mark.parametrize("unpaired", [(), (2, 3)], ids=["all-paired", "mixed-pairs"])
@pytest.mark.parametrize("chunk_size", [2, 4], ids=["chunks-2-2-2", "chunks-4-2"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcache_matches_the_unchunked_step(tiny_checkpoint, case, chunk_size, unpaired):
    model, collator = build(tiny_checkpoint, **CASES[case])
    examples = make_examples(1, unpaired=unpaired)
    want = unchunked(model, collator, examples)
    got = chunked_step(model, collator, examples, chunk_size)
    assert_same_step(got, want)
    share = (EXAMPLES - len(unpaired)) / EXAMPLES if model.loss.compute_contrastive_loss else None
    assert got[0].pair_share == want[0].pair_share == share
    grads = want[1]
    vision = [n for n in grads if ".vision_tower." in n]
    assert vision and all(grads[n].norm() > 0 for n in vision[:4])  # a real gradient everywhere it is compared
    if model.loss.compute_contrastive_loss:
        # the loss's own parameters are reached only through the cached parameter gradients
        for name in ("loss.contrastive.log_scale", "loss.contrastive.bias"):
            if name in grads:
                assert grads[name].abs().item() > 0 and name in got[1], name


def test_contrastive_only_gradient_flows_only_through_the_cached_embedding_gradients(tiny_checkpoint):
    """With the LM loss off every model gradient comes from the cached d loss / d embedding:
    ignoring it would leave them all zero."""
    model, collator = build(tiny_checkpoint, compute_language_loss=False)
    examples = make_examples(2)
    want = unchunked(model, collator, examples)
    got = chunked_step(model, collator, examples, 2)
    final_norm = "vlm.model.language_model.norm.weight"
    assert want[1][final_norm].norm() > 0
    torch.testing.assert_close(got[1][final_norm], want[1][final_norm], rtol=1e-4, atol=1e-7)


def test_chunk_lm_means_weigh_in_by_labelled_tokens(tiny_checkpoint):
    model, collator = build(tiny_checkpoint, compute_contrastive_loss=False)
    examples = make_examples(3)
    parts = [collator(c) for c in chunked(examples, 4)]
    counts = [int((p.lm_targets != IGNORE_INDEX).sum()) for p in parts]
    assert counts[0] / sum(counts) != 4 / 6  # so a per-example weighting would be wrong
    terms, _ = chunked_step(model, collator, examples, 4)
    with torch.no_grad():
        means = [model(p).lm_loss for p in parts]
    expected = sum(m * c for m, c in zip(means, counts)) / sum(counts)
    torch.testing.assert_close(terms.lm_loss, expected, rtol=1e-6, atol=0)


def test_dropout_draws_the_same_masks_in_both_forwards(tiny_checkpoint):
    """With dropout on, chunked differs from unchunked (other masks), but GradCache must equal
    the chunk-by-chunk step whose graphs are all kept: the same masks in the same order."""
    model, collator = build(tiny_checkpoint)
    for layer in model.vlm.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.3
    examples = make_examples(4)
    chunks = [collator(c) for c in chunked(examples, 2)]
    with torch.no_grad():
        assert not torch.equal(model.embed(chunks[0]), model.embed(chunks[0]))  # dropout is live

    torch.manual_seed(7)
    hidden = [model.hidden_states(c) for c in chunks]
    emb = [model.pool(h, c) for h, c in zip(hidden, chunks)]
    counts = [int((c.lm_targets != IGNORE_INDEX).sum()) for c in chunks]
    lm = sum(model.lm_loss(h, c) * n for h, c, n in zip(hidden, chunks, counts)) / sum(counts)
    query = torch.cat([e[: c.num_pairs] for e, c in zip(emb, chunks)])
    target = torch.cat([e[c.num_pairs :] for e, c in zip(emb, chunks)])
    kept = model.loss(lm_loss=lm, query=query, target=target)
    kept.objective.backward()
    want = (kept, gradients(model))

    torch.manual_seed(7)
    got = (gradcache_step(model, chunks), gradients(model))
    assert_same_step(got, want)


def test_backward_is_called_once_per_chunk_and_marks_the_last(tiny_checkpoint):
    model, collator = build(tiny_checkpoint)
    calls = []

    def backward(objective, last):
        calls.append(last)
        objective.backward()

    gradcache_step(model, [collator(c) for c in chunked(make_examples(5), 4)], backward=backward)
    assert calls == [False, True]


def test_chunked_splits_examples_in_order():
    assert chunked(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunked(list(range(5)), 0) == [list(range(5))]


WORLD = 2


def _worker(rank: int, store_path: str, checkpoint: str, out_dir: str, unpaired: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        model, collator = build(checkpoint)
        local = make_examples(6, unpaired=unpaired)[rank * 3 : (rank + 1) * 3]
        results = {"unchunked": unchunked(model, collator, local, rank, WORLD),
                   "gradcache": chunked_step(model, collator, local, 2, rank, WORLD)}
        torch.save({k: (vars(terms), grads) for k, (terms, grads) in results.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# mixed pairs: rank 0 holds two pairs, rank 1 none (it still joins every gather)
@pytest.mark.parametrize("unpaired", [(), (1, 3, 4, 5)], ids=["all-paired", "rank-without-pairs"])
def test_two_ranks_match_the_unchunked_step_on_each_rank(tiny_checkpoint, tmp_path, unpaired):
    """The global gather: each rank's GradCache step (chunks 2 + 1) equals its unchunked step, whose
    agreement with one process over the concatenated batch tests/test_gather.py checks."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tiny_checkpoint), str(tmp_path), unpaired), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        results = {k: (LossTerms(**terms), grads) for k, (terms, grads) in saved.items()}
        assert_same_step(results["gradcache"], results["unchunked"])
        # the objective carries the contrastive term times the world size
        terms = results["gradcache"][0]
        torch.testing.assert_close(terms.objective - terms.loss, terms.con_loss * 1.3 * (WORLD - 1))
