"""The offline tiny checkpoint is a real LLaVA-OneVision HF directory: it reloads with the
stock classes, keeps its weights, its processor agrees with its vision tower on image token
counts, it generates, and it is reproducible from its seed."""
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from cafe.prompts import embedding_messages
from cafe.tiny import TinySpec, build_tiny_checkpoint
from tests.conftest import random_image, tiny_corpus


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint, local_files_only=True, output_loading_info=True
    )
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, local_files_only=True)
    return model.eval(), processor, info


def test_reload_keeps_every_weight(tiny_checkpoint, loaded, tmp_path):
    model, processor, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    # saving the reloaded model again writes back exactly the tensors that were built
    model.save_pretrained(tmp_path)
    built, resaved = load_file(tiny_checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert built.keys() == resaved.keys() and len(built) > 50
    for name, tensor in built.items():
        assert torch.equal(tensor, resaved[name]), name
    # and the loaded parameters are those tensors (embedding table, tied head, vision patches)
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed, built["language_model.model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, embed)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       built["vision_tower.embeddings.patch_embedding.weight"])
    assert torch.equal(model.model.image_newline, built["image_newline"])
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


@pytest.mark.parametrize("size", [(64, 64), (96, 48), (40, 100), (128, 128)])
def test_processor_expands_image_to_vision_tower_token_count(loaded, size):
    model, processor, _ = loaded
    image = random_image(random.Random(sum(size)), *size)
    prompt = processor.apply_chat_template(embedding_messages(None, 1), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert placeholders == features[0].shape[0] >= TinySpec().image_size // TinySpec().patch_size
    with torch.no_grad():  # the model's own check that features fill the placeholders exactly
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_generate_produces_new_tokens(loaded):
    model, processor, _ = loaded
    image = random_image(random.Random(0), 80, 64)
    messages = [{"role": "user", "content": "<image>\nWhat shapes are in the image?"}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 4)
    assert torch.equal(out[0, :prompt_len], inputs["input_ids"][0])
    new = out[0, prompt_len:]
    assert ((new >= 0) & (new < len(processor.tokenizer))).all()
    assert isinstance(processor.tokenizer.decode(new), str)


def _build(path, seed: int):
    return build_tiny_checkpoint(path, tiny_corpus(), TinySpec(seed=seed))


def test_same_seed_builds_identical_checkpoints(tmp_path):
    a, b, c = _build(tmp_path / "a", 0), _build(tmp_path / "b", 0), _build(tmp_path / "c", 1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
