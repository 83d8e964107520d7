"""Gradient accumulation (`cafe.accumulation`): micro-batches of one local batch give the LM
term and its gradient of the unsplit batch; with the contrastive term on, each micro-batch is
its own contrastive batch and the step is their mean."""
import pytest
import torch

from cafe.accumulation import accumulated_step
from cafe.gradcache import chunked
from cafe.prompts import IGNORE_INDEX
from tests.test_gradcache import assert_same_step, build, gradients, make_examples, unchunked


def accumulated(model, collator, examples, micro_size):
    terms = accumulated_step(model, [collator(c) for c in chunked(examples, micro_size)])
    return terms, gradients(model)


@pytest.mark.parametrize("micro_size", [3, 4, 2])
def test_lm_term_of_micro_batches_equals_the_unsplit_batch(tiny_checkpoint, micro_size):
    """2 x 3 (and 4 + 2, 3 x 2) equal one batch of 6: the micro-batches' token means weigh in by
    their shares of the labelled tokens (example 2 is multi-turn, so shares are uneven)."""
    model, collator = build(tiny_checkpoint, compute_contrastive_loss=False)
    examples = make_examples(seed=5)
    assert_same_step(accumulated(model, collator, examples, micro_size), unchunked(model, collator, examples))


# mixed pairs: two pairs in each half, or none in the second (its contrastive term is zero)
@pytest.mark.parametrize("unpaired", [(), (1, 4), (3, 4, 5)], ids=["all-paired", "mixed-pairs", "half-without-pairs"])
def test_with_the_contrastive_term_each_micro_batch_is_its_own_contrastive_batch(tiny_checkpoint, unpaired):
    model, collator = build(tiny_checkpoint)
    examples = make_examples(seed=6, unpaired=unpaired)
    halves = chunked(examples, 3)
    con = [model(collator(half)).con_loss.detach() for half in halves]
    whole_lm = model(collator(examples)).lm_loss.detach()
    terms, grads = accumulated(model, collator, examples, 3)
    torch.testing.assert_close(terms.con_loss, (con[0] + con[1]) / 2)
    assert terms.pair_share == (len(examples) - len(unpaired)) / len(examples)
    torch.testing.assert_close(terms.lm_loss, whole_lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.loss, model.loss.alpha_lm * whole_lm + model.loss.con_weight * terms.con_loss,
                               rtol=1e-5, atol=1e-6)
    # the gradient: each micro-batch's LM mean by its token share, its contrastive loss by 1/2
    labelled = [int((collator(h).lm_targets != IGNORE_INDEX).sum()) for h in halves]
    for half, tokens in zip(halves, labelled):
        out = model(collator(half))
        lm_part = model.loss.alpha_lm * out.lm_loss * tokens / sum(labelled)
        (lm_part + model.loss.con_weight * out.con_loss / 2).backward()
    want = gradients(model)
    assert grads.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_backward_marks_only_the_last_micro_batch(tiny_checkpoint):
    model, collator = build(tiny_checkpoint)
    calls = []
    accumulated_step(model, [collator(c) for c in chunked(make_examples(seed=7), 2)],
                     backward=lambda objective, last: (calls.append(last), objective.backward()))
    assert calls == [False, False, True]


def test_two_micro_batches_of_8_equal_one_batch_of_16_for_the_lm_term(tiny_checkpoint):
    model, collator = build(tiny_checkpoint, compute_contrastive_loss=False)
    examples = make_examples(seed=8, n=16)
    assert_same_step(accumulated(model, collator, examples, 8), unchunked(model, collator, examples))
