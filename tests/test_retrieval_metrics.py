"""Retrieval metrics against hand-worked cases and a sort-based reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from evaluation import retrieval
from evaluation.retrieval import modality_gap, recall_at_k, retrieval_ranks

E0, E1, E2 = torch.eye(3)
IMAGES = torch.stack([E0, E1, E2])
TWO_EACH = torch.tensor([0, 0, 1, 1, 2, 2])


def test_perfect_retrieval_is_one():
    metrics = recall_at_k(IMAGES, IMAGES[TWO_EACH], TWO_EACH, ks=(1, 5, 10))
    assert metrics == {k: 1.0 for k in ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]}


def test_image_hits_through_its_second_caption():
    first = torch.tensor([0.0, 0.6, 0.8])  # image 0's first caption looks like images 1 and 2
    texts = torch.stack([first, E0, E1, E1, E2, E2])
    i2t, t2i = retrieval_ranks(IMAGES, texts, TWO_EACH)
    assert i2t.tolist() == [0, 0, 0]  # image 0 (e0) finds caption 1 (e0) first
    assert t2i.tolist() == [2, 0, 0, 0, 0, 0]  # caption 0 scores its own image lowest of the three
    metrics = recall_at_k(IMAGES, texts, TWO_EACH, ks=(1, 2, 3))
    assert metrics["i2t_r1"] == 1.0
    assert metrics["t2i_r1"] == pytest.approx(5 / 6) and metrics["t2i_r2"] == pytest.approx(5 / 6)
    assert metrics["t2i_r3"] == 1.0


def test_miss_at_1_hit_at_5():
    a, b = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([0.8, 0.6, 0.0])
    texts = torch.stack([a, a, b, E1, E2, E2])  # image 1's caption b beats image 0's captions a
    i2t, t2i = retrieval_ranks(IMAGES, texts, TWO_EACH)
    assert i2t.tolist() == [1, 0, 0]
    assert t2i.tolist() == [1, 1, 1, 0, 0, 0]
    metrics = recall_at_k(IMAGES, texts, TWO_EACH, ks=(1, 5))
    assert metrics["i2t_r1"] == pytest.approx(2 / 3) and metrics["i2t_r5"] == 1.0
    assert metrics["t2i_r1"] == pytest.approx(0.5) and metrics["t2i_r5"] == 1.0
    assert metrics["mean_recall"] == pytest.approx((2 / 3 + 1 + 0.5 + 1) / 4)


def test_ties_count_against_the_query():
    same = torch.ones(3, 4) / 2
    i2t, t2i = retrieval_ranks(same, same[TWO_EACH], TWO_EACH)
    assert i2t.tolist() == [4, 4, 4]  # all four negatives tie with the positives
    assert t2i.tolist() == [2] * 6
    metrics = recall_at_k(same, same[TWO_EACH], TWO_EACH, ks=(1, 3, 5))
    assert metrics["i2t_r1"] == 0.0 and metrics["i2t_r3"] == 0.0 and metrics["i2t_r5"] == 1.0
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_r3"] == 1.0


def _sorted_ranks(image_emb, text_emb, text_to_image):
    """Plain reference: position of the first positive in the sorted score list."""
    sim = image_emb @ text_emb.T
    i2t = [next(p for p, t in enumerate(sim[i].argsort(descending=True)) if text_to_image[t] == i)
           for i in range(len(sim))]
    t2i = [(sim[:, t].argsort(descending=True) == text_to_image[t]).nonzero().item() for t in range(sim.shape[1])]
    return i2t, t2i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sorted_reference_in_chunks(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(23, 8, generator=gen), dim=-1)
    owners = torch.cat([torch.arange(23), torch.randint(0, 23, (40,), generator=gen)])
    texts = F.normalize(images[owners] + 0.8 * torch.randn(len(owners), 8, generator=gen), dim=-1)
    monkeypatch.setattr(retrieval, "CHUNK", 5)  # several chunks, a ragged last one
    i2t, t2i = retrieval_ranks(images, texts, owners)
    ref_i2t, ref_t2i = _sorted_ranks(images, texts, owners)
    assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i
    metrics = recall_at_k(images, texts, owners)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert 0.0 < metrics["i2t_r10"] < 1.0  # the case is neither trivial nor hopeless


def test_rejects_images_without_captions():
    with pytest.raises(ValueError, match="without captions"):
        recall_at_k(IMAGES, IMAGES[:2], torch.tensor([0, 1]))


def test_modality_gap():
    assert modality_gap(IMAGES, IMAGES[TWO_EACH]) == pytest.approx(0.0, abs=1e-7)
    assert modality_gap(E0.expand(3, 3), E1.expand(5, 3)) == pytest.approx(math.sqrt(2))
