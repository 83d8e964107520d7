"""Every prompt the method uses, in one place: chat template, embedding instructions,
conversation -> (input ids, labels on assistant tokens only)."""
from __future__ import annotations

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_EMBED_INSTRUCTION = "Compress this image in one word:"
TEXT_EMBED_INSTRUCTION = "Compress this sentence in one word:"
IGNORE_INDEX = -100

# Qwen2 / LLaVA-OneVision chat layout. Content is a plain string here (the image token is
# already in it), which keeps tokenisation identical between training and the processor.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
