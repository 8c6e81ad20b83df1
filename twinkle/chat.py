"""Chat formatting through the tokenizer's own chat template.

Turns conversations into prompts for sampling and into supervised datums whose weights cover only
the assistant's reply. Works with any Hugging Face tokenizer that has a chat template. Messages may
hold images (`{"type": "image", "image": ...}` parts, for a vision-language model): pass the model's
image processor and each image becomes a run of placeholder tokens (see twinkle/chat_images.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from twinkle import chat_images
from twinkle.chat_images import images_in, template_messages, widen_image_tokens
from twinkle.types import Datum, ImagePart

Message = dict[str, Any]  # {"role": ..., "content": str | list of {"type": "text" | "image", ...} parts}


class Prompt(list):
    """A sampling prompt: its token ids (it is a `list[int]`) and the images whose placeholder runs
    it holds, which `Sampler.sample` sends along."""

    def __init__(self, tokens: Iterable[int] = (), images: Sequence[ImagePart] = ()) -> None:
        super().__init__(int(t) for t in tokens)
        self.images: list[ImagePart] = list(images)

    def extended(self, tokens: Iterable[int]) -> "Prompt":
        """The prompt followed by `tokens` (e.g. a sampled reply, to score with compute_logprobs)."""
        return Prompt([*self, *tokens], self.images)


def encode_chat(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` formatted with the tokenizer's chat template (one token per image part)."""
    ids = tokenizer.apply_chat_template(template_messages(messages), tokenize=True,
                                        add_generation_prompt=add_generation_prompt, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def build_prompt(tokenizer, messages: Sequence[Message], *, image_processor=None,
                 image_token_id: int | None = None) -> Prompt:
    """A sampling prompt: the conversation plus the opening of the assistant's turn. With image parts,
    `image_processor` (the model's: `model.get_image_processor()`) counts each image's tokens."""
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    images = images_in(messages)
    if not images:
        return Prompt(ids)
    tokens, _, parts = widen_image_tokens(ids, [0.0] * len(ids), images, image_processor,
                                          chat_images.image_token_id(tokenizer, image_token_id))
    return Prompt(tokens, parts)


def supervised_datum(tokenizer, messages: Sequence[Message], *, image_processor=None,
                     image_token_id: int | None = None) -> Datum:
    """A next-token datum over the whole conversation, weighted 1 on the last assistant reply only
    (never on image tokens). Image parts need `image_processor`, as in `build_prompt`."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply to learn")
    prompt = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = encode_chat(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the prompt with the reply; cannot mask the prompt")
    weights = np.zeros(len(full), dtype=np.float32)
    weights[len(prompt):] = 1.0
    images = images_in(messages)
    if not images:
        return Datum.from_sequence(full, weights.tolist())
    tokens, widened, parts = widen_image_tokens(full, weights.tolist(), images, image_processor,
                                                chat_images.image_token_id(tokenizer, image_token_id))
    if parts[-1].position + parts[-1].tokens > len(tokens) - 1:
        raise ValueError("the conversation ends with an image; end it with the assistant's text reply")
    datum = Datum.from_sequence(tokens, widened)
    return datum.model_copy(update={"images": parts})


def decode(tokenizer, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)
