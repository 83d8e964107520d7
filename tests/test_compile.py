"""The packed step with compiled transformer blocks (`cafe.compile`) against the same step in
eager mode, and no recompilation when the next batch has another layout. Slow: Inductor
compiles C++ kernels on the first step."""
import pytest
import torch
from torch._dynamo.utils import counters

from cafe.batch import Collator
from cafe.compile import compile_blocks, transformer_blocks
from cafe.losses import CafeLoss
from cafe.model import CafeModel, load_vlm
from tests.test_step_equivalence import make_examples

pytestmark = pytest.mark.slow


def step(model: CafeModel, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    terms = model(batch)
    terms.objective.backward()
    return terms.objective.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_compiled_blocks_match_eager(tiny_checkpoint, recompute):
    torch.manual_seed(0)
    vlm, processor = load_vlm(tiny_checkpoint)
    if recompute:
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = CafeModel(vlm, CafeLoss()).train()
    collate = Collator(processor)
    first, second = collate(make_examples(1, multimodal=True)), collate(make_examples(2, multimodal=False))
    assert first.input_ids.shape != second.input_ids.shape

    eager = [step(model, first), step(model, second)]
    assert compile_blocks(vlm) == len(transformer_blocks(vlm)) > 0
    compiled_first = step(model, first)
    graphs = counters["stats"]["unique_graphs"]
    compiled_second = step(model, second)
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch layout recompiled the blocks"

    for (loss, grads), (want_loss, want_grads) in zip((compiled_first, compiled_second), eager):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        scale = torch.stack([g.norm() for g in want_grads.values()]).max()
        for name, g in want_grads.items():
            err = (grads[name] - g).norm() / torch.maximum(g.norm(), 1e-3 * scale)
            assert err <= 1e-4, (name, err.item())
