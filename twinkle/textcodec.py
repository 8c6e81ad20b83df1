"""Text in, text out around the token sampler: what an OpenAI-style text API needs from a tokenizer.

The sampler works on token ids. A text API has to turn a prompt (plain text or a chat) into ids, and
the sampled ids back into text the way a client expects: the end-of-turn token left out, the text
cut before the first stop string, and streamed as per-token pieces that never split a character.
Plain Python over a Hugging Face tokenizer; no server code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twinkle.chat import build_prompt

REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a character split across tokens


@dataclass
class RenderedSample:
    """One sampled sequence as text.

    `pieces[i]` is the text token i adds (held back while it ends inside a character), so that
    `"".join(pieces) == text`; only the first `len(pieces)` tokens reach the text (later ones came
    after a stop string or are the end-of-turn token). `stop_hit` says a stop string or stop token
    ended it.
    """

    text: str
    pieces: list[str]
    stop_hit: bool


class TextCodec:
    """A model's tokenizer, seen through the operations a text-completion API performs."""

    # what a server may call on a codec it holds for others
    OPERATIONS = ("encode", "chat_prompt", "token_texts", "stop_texts", "end_token_ids", "render_all")

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = [int(t) for t in eos_token_ids]

    @classmethod
    def load(cls, model_path: str) -> "TextCodec":
        """The codec of a model folder (or Hub id); end tokens as the sampler uses them."""
        from twinkle.modeling import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        return cls(tokenizer, _eos_ids(model_path, tokenizer))

    def encode(self, text: str) -> list[int]:
        """A completion prompt, with the special tokens the tokenizer adds to any text."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """A chat prompt through the model's chat template, ending with the opening of the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions with plain text")
        return build_prompt(self.tokenizer, messages)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own (special tokens shown), as logprob listings name them."""
        return [self.tokenizer.decode([int(t)], skip_special_tokens=False) for t in token_ids]

    def end_token_ids(self) -> list[int]:
        """The tokens the sampler stops at by default (end of turn, end of text)."""
        return list(self.eos_token_ids)

    def stop_texts(self, extra_token_ids: Sequence[int] = ()) -> list[str]:
        """The end tokens (and `extra_token_ids`) as text: stop strings that keep them stopping when
        a request's own stop strings replace the sampler's default end tokens."""
        return [t for t in self.token_texts([*self.eos_token_ids, *extra_token_ids]) if t]

    def render(self, tokens: Sequence[int], stop: Sequence[str] = (),
               stop_token_ids: Sequence[int] = ()) -> RenderedSample:
        """The text of sampled `tokens`: cut at the first stop string, end tokens dropped."""
        tokens = [int(t) for t in tokens]
        enders = set(self.eos_token_ids) | {int(t) for t in stop_token_ids}
        stop_hit = False
        for i, token in enumerate(tokens):  # text ends before the first end token
            if token in enders:
                tokens, stop_hit = tokens[:i], True
                break
        pieces = self._pieces(tokens)
        text = "".join(pieces)
        cut = min((pos for pos in (text.find(s) for s in stop if s) if pos >= 0), default=-1)
        if cut >= 0:
            text, stop_hit = text[:cut], True
            kept, length = [], 0
            for piece in pieces:
                if length >= cut:
                    break
                kept.append(piece[: max(0, cut - length)])
                length += len(piece)
            pieces = kept
        return RenderedSample(text=text, pieces=pieces, stop_hit=stop_hit)

    def _pieces(self, tokens: list[int]) -> list[str]:
        """The text each token adds. Each step decodes a short window (the previous token or few, as
        context: some tokenizers drop a word's leading space when it is decoded alone), so a long
        sample costs linear time, not quadratic; a token that ends inside a character adds ""."""
        pieces: list[str] = []
        start = shown = 0  # the window begins at `start`; tokens before `shown` are in `pieces`
        for i in range(len(tokens)):
            before = self.tokenizer.decode(tokens[start:shown], skip_special_tokens=True)
            now = self.tokenizer.decode(tokens[start:i + 1], skip_special_tokens=True)
            if now.endswith(REPLACEMENT) and i + 1 < len(tokens):
                pieces.append("")  # a character split across tokens: wait for its last byte
                continue
            pieces.append(now[len(before):])
            start, shown = shown, i + 1
        return pieces

    def render_all(self, samples: Sequence[Sequence[int]], stop: Sequence[str] = (),
                   stop_token_ids: Sequence[int] = ()) -> list[RenderedSample]:
        """`render` of every sample of a request in one call (one hop when the codec is remote)."""
        return [self.render(tokens, stop, stop_token_ids) for tokens in samples]


def _eos_ids(model_path: str, tokenizer) -> list[int]:
    """End tokens as the sampling backend reads them: the generation config first, then the tokenizer."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # the model ships no generation config
        ids = None
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if i is not None]
