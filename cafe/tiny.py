"""Random-initialised LLaVA-OneVision checkpoints built offline (the tiny default, and real
sizes such as 0.5b for speed measurements).

Real HF classes end to end (SigLIP vision tower, Qwen2 language model, LLaVA-OneVision
processor with a locally trained byte-level BPE tokenizer), saved with `save_pretrained`, so
every code path that takes a checkpoint directory works on it exactly as on a released one.
"""
from __future__ import annotations

from collections.abc import Iterable
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

from cafe.config import TinySpec
from cafe.prompts import (
    CHAT_TEMPLATE,
    IMAGE_EMBED_INSTRUCTION,
    IMAGE_TOKEN,
    SYSTEM_PROMPT,
    TEXT_EMBED_INSTRUCTION,
    VIDEO_TOKEN,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN]


PRESETS = {
    "tiny": TinySpec(),
    # SigLIP-so400m + Qwen2-0.5B shapes, as in llava-onevision-qwen2-0.5b
    "0.5b": TinySpec(model_vocab_size=151936, image_size=384, patch_size=14, vision_hidden=1152,
                     vision_intermediate=4304, vision_layers=26, vision_heads=16, text_hidden=896,
                     text_intermediate=4864, text_layers=24, text_heads=14, text_kv_heads=2),
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` plus the fixed prompt text (so the chat scaffolding
    costs few tokens, as with a real tokenizer); every byte is in the alphabet, so any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the role names as the chat template writes them (after a special token: no leading space)
    roles = ["system\n", "user\n", "assistant\n"]
    scaffolding = [SYSTEM_PROMPT, IMAGE_EMBED_INSTRUCTION, TEXT_EMBED_INSTRUCTION, *roles] * 50
    tok.train_from_iterator([*scaffolding, *corpus], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


def build_random_model(corpus: Iterable[str],
                       spec: TinySpec) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random-initialised model and its processor, in memory."""
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,  # as in released LLaVA-OneVision: the pooling head is never used
    )
    text = Qwen2Config(
        vocab_size=max(spec.model_vocab_size, len(tokenizer)),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=32768,
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
        image_grid_pinpoints=[[spec.image_size, spec.image_size * k] for k in range(1, spec.crops_wide + 1)],
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
    return model, processor


def build_tiny_checkpoint(out_dir: str | Path, corpus: Iterable[str], spec: TinySpec | None = None) -> Path:
    """Write a random-initialised LLaVA-OneVision checkpoint + processor into `out_dir`."""
    model, processor = build_random_model(corpus, spec or TinySpec())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
