"""A tiny random-initialised LLaVA-OneVision checkpoint built offline.

Real HF classes end to end (SigLIP vision tower, Qwen2 language model, LLaVA-OneVision
processor with a locally trained byte-level BPE tokenizer), saved with `save_pretrained`, so
every code path that takes a checkpoint directory works on it exactly as on a released one.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from cafe.prompts import CHAT_TEMPLATE, IMAGE_TOKEN, VIDEO_TOKEN

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN]


@dataclass(kw_only=True, slots=True)
class TinySpec:
    """Sizes of the tiny model; defaults build in about a second on one CPU core."""

    vocab_size: int = 512
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 96
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    seed: int = 0


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`; every byte is in the alphabet, so any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(out_dir: str | Path, corpus: Iterable[str], spec: TinySpec | None = None) -> Path:
    """Write a random-initialised LLaVA-OneVision checkpoint + processor into `out_dir`."""
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        video_token_id=video_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[spec.image_size, spec.image_size]],
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, crop_size=size, image_grid_pinpoints=config.image_grid_pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size, crop_size=size)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
