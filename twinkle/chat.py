"""Chat formatting through the tokenizer's own chat template.

Turns conversations into prompts for sampling and into supervised datums whose weights cover only
the assistant's reply. Works with any Hugging Face tokenizer that has a chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twinkle.types import Datum

Message = dict[str, str]


def encode_chat(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` formatted with the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def build_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """A sampling prompt: the conversation plus the opening of the assistant's turn."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)


def supervised_datum(tokenizer, messages: Sequence[Message]) -> Datum:
    """A next-token datum over the whole conversation, weighted 1 on the last assistant reply only."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply to learn")
    prompt = build_prompt(tokenizer, messages[:-1])
    full = encode_chat(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the prompt with the reply; cannot mask the prompt")
    weights = np.zeros(len(full), dtype=np.float32)
    weights[len(prompt):] = 1.0
    return Datum.from_sequence(full, weights.tolist())


def decode(tokenizer, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)
