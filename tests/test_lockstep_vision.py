"""`CafeModel(lockstep_vision=True)` (ZeRO-3): a text-only batch still runs the vision tower, so
every rank runs the same modules; it changes no value and gives the tower zero gradients."""
import torch

from cafe.batch import Collator, Example
from cafe.losses import CafeLoss
from cafe.model import CafeModel, load_vlm


def test_text_only_batch_runs_the_tower_and_changes_nothing(tiny_checkpoint):
    vlm, processor = load_vlm(tiny_checkpoint)
    loss = CafeLoss(compute_contrastive_loss=False)
    plain, lockstep = CafeModel(vlm, loss), CafeModel(vlm, loss, lockstep_vision=True)
    collator = Collator(processor, compute_contrastive_loss=False)
    batch = collator([Example(images=[], messages=[{"role": "user", "content": "how many shapes"},
                                                   {"role": "assistant", "content": "two red circles"}],
                              target_text="two red circles")])
    calls = []
    vlm.model.vision_tower.register_forward_hook(lambda *_: calls.append("tower"))

    want = plain(batch).objective
    assert calls == []
    got = lockstep(batch).objective
    assert calls == ["tower"]
    torch.testing.assert_close(got, want)
    got.backward()
    tower = [p.grad for p in vlm.model.vision_tower.parameters()]
    assert all(g is not None and not g.any() for g in tower)
