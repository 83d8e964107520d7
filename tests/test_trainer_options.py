"""The research code's training options as config keys: frozen parts, a vision-tower learning
rate, warmup as a ratio."""
import pytest
import torch

from cafe.batch import Collator
from cafe.config import load_config
from cafe.losses import CafeLoss, ContrastiveLoss
from cafe.model import CafeModel, load_vlm, set_tunable_parts
from tests.test_step_equivalence import make_examples
from trainers.loop import lr_lambda, param_groups, warmup_steps


def cafe_model(checkpoint, parts):
    vlm, processor = load_vlm(checkpoint)
    set_tunable_parts(vlm, parts)
    loss = CafeLoss(con_weight=0.5, contrastive=ContrastiveLoss(temperature=0.1, learnable=True))
    return CafeModel(vlm, loss), processor


def test_a_frozen_vision_tower_stays_bit_identical_and_has_no_optimizer_state(tiny_checkpoint):
    cfg = load_config(None, ["model.mm_tunable_parts=[mm_mlp_adapter, mm_language_model]"])
    model, processor = cafe_model(tiny_checkpoint, cfg.model.mm_tunable_parts)
    tower = {n: p.detach().clone() for n, p in model.vlm.model.vision_tower.named_parameters()}
    projector = {n: p.detach().clone() for n, p in model.vlm.model.multi_modal_projector.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=1e-2)
    batch = Collator(processor)(make_examples(0, multimodal=False))
    for _ in range(3):
        model(batch).objective.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.vlm.model.vision_tower.named_parameters():
        assert torch.equal(param, tower[name]) and param.grad is None, name
    assert not any(torch.equal(p, projector[n]) for n, p in model.vlm.model.multi_modal_projector.named_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer.isdisjoint(id(p) for p in model.vlm.model.vision_tower.parameters())
    assert all(id(p) not in optimizer.state for p in model.vlm.model.vision_tower.parameters())


def test_vision_tower_learning_rate_and_unknown_parts(tiny_checkpoint):
    cfg = load_config(None, ["train.lr=0.001", "train.vision_lr=0.0002", "loss.learnable_temperature=true"])
    model, _ = cafe_model(tiny_checkpoint, cfg.model.mm_tunable_parts)
    groups = param_groups(model, cfg)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[0.0002] == {id(p) for p in model.vlm.model.vision_tower.parameters()}
    assert by_lr[cfg.train.temperature_lr] == {id(p) for p in model.loss.parameters()}
    assert sum(len(ids) for ids in by_lr.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="not one of"):
        load_config(None, ["model.mm_tunable_parts=[mm_projector]"])


def test_warmup_as_a_ratio_of_the_run():
    assert warmup_steps(load_config(None, ["train.warmup_steps=7"]), 1000) == 7
    cfg = load_config(None, ["train.warmup_steps=7", "train.warmup_ratio=0.03"])
    assert warmup_steps(cfg, 1000) == 30
    factor = lr_lambda(warmup_steps(cfg, 1000), 1000)
    assert factor(0) == pytest.approx(1 / 30) and factor(29) == pytest.approx(1.0)
