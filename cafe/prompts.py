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


def first_exchanges(messages: list[dict], n: int) -> list[dict]:
    """The conversation up to its n-th user turn and that turn's reply (system turns kept)."""
    kept, users = [], 0
    for message in messages:
        users += message["role"] == "user"
        if users > n:
            break
        kept.append(message)
    return kept


def chat_pieces(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The chat template as (text, is_assistant_content) pieces; joined they equal the template.

    Splitting at the role headers lets labels cover exactly the assistant content and its
    end-of-turn marker, never the headers."""
    pieces: list[tuple[str, bool]] = []
    if not messages or messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n", False))
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces.append(("<|im_start|>assistant\n", False))
            pieces.append((f"{content}<|im_end|>", True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def embedding_messages(text: str | None, num_images: int) -> list[dict]:
    """The user turn that asks for a one-word summary; its last token's state is the embedding.

    Image-only inputs get the image instruction; anything with text gets the sentence one.
    Images go first unless the text already holds their `<image>` tokens."""
    if not text and num_images == 0:
        raise ValueError("an embedding input needs text or at least one image")
    placed = text.count(IMAGE_TOKEN) if text else 0  # MMEB-style texts place their own image tokens
    if placed and placed != num_images:
        raise ValueError(f"text places {placed} image tokens for {num_images} images")
    parts = [] if placed else [IMAGE_TOKEN] * num_images
    if text:
        parts += [text, TEXT_EMBED_INSTRUCTION]
    else:
        parts.append(IMAGE_EMBED_INSTRUCTION)
    return [{"role": "user", "content": "\n".join(parts)}]


def question_messages(question: str, num_images: int) -> list[dict]:
    """A user turn asking `question` about the images; they go first, as in training rows,
    unless the question already places its image tokens."""
    if IMAGE_TOKEN in question:
        if question.count(IMAGE_TOKEN) != num_images:
            raise ValueError(f"question places {question.count(IMAGE_TOKEN)} image tokens for {num_images} images")
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": "\n".join([IMAGE_TOKEN] * num_images + [question])}]


def strip_image_tokens(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()
