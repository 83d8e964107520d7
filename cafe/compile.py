"""torch.compile applied from outside the model: each transformer block on its own.

A block is compiled with dynamic shapes, so the packed row's length (which changes every
batch) does not recompile it. Inductor fuses what eager mode runs as separate memory-bound
kernels: RMSNorm, rotary embeddings, SiLU * up-projection, residual adds, and their
backward. Packed attention stays outside the compiled graphs (`cafe.attention`): its calls
follow each batch's layout, which would otherwise recompile the block for every batch.
"""
from __future__ import annotations

from torch import nn


def transformer_blocks(vlm: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model and the encoder layers of the vision tower."""
    return [*vlm.model.language_model.layers, *vlm.model.vision_tower.encoder.layers]


def compile_blocks(vlm: nn.Module) -> int:
    """Compile every transformer block of a LLaVA-OneVision model in place; the number compiled.

    Compilation happens lazily, at each block's first call, so the first step pays for it."""
    blocks = transformer_blocks(vlm)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
