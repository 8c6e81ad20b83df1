"""Request bodies of the OpenAI-compatible routes, and what they ask of the sampler.

Fields follow OpenAI's API (plus vLLM's `top_k` and `stop_token_ids`, which clients send through
`extra_body`). Options this server cannot honour are refused by name instead of silently ignored,
so a client never gets a result computed differently from what it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from twinkle.errors import InvalidInputError
from twinkle.http.common import Body

MAX_TOP_LOGPROBS = 20  # OpenAI's own bound on alternatives per position
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 1024  # chat has no default in OpenAI's API (the rest of the context); bounded here


class StreamOptions(Body):
    include_usage: bool = False


class SamplingBody(Body):
    """Options both endpoints share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        """400 for options this server cannot honour (a result computed without them would mislead)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidInputError("is not supported by this server; leave it unset or 0", field=name)
        if self.logit_bias:
            raise InvalidInputError("is not supported by this server; leave it unset", field="logit_bias")
        if self.stop_token_ids and any(t < 0 for t in self.stop_token_ids):
            raise InvalidInputError("must be token ids (>= 0)", field="stop_token_ids")

    def stop_strings(self) -> list[str]:
        """The stop strings asked for (OpenAI allows one string or a list; empty ones mean nothing)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InvalidInputError(f"at most 4 stop sequences are allowed, got {len(stops)}", field="stop")
        return [s for s in stops if s]


class CompletionBody(SamplingBody):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (one choice set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise InvalidInputError("is not supported by this server; leave it false", field="echo")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise InvalidInputError("is not supported by this server; use n and choose among the choices",
                                    field="best_of")
        if self.suffix:
            raise InvalidInputError("(insertion) is not supported by this server; leave it unset", field="suffix")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidInputError("is an empty list; send text or token ids", field="prompt")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates take it: a role and a string (text parts joined)."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInputError(f"only text content parts are supported, got a {part.get('type')!r} part",
                                        field="messages.content")
            texts.append(part["text"])
        return {"role": role, "content": "".join(texts)}


class ChatBody(SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidInputError("tool calling is not supported by this server; leave tools unset", field="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidInputError("only {'type': 'text'} is supported by this server", field="response_format")
        if self.top_logprobs and not self.logprobs:
            raise InvalidInputError("needs logprobs: true", field="top_logprobs")

    def reply_limit(self) -> int | None:
        """max_completion_tokens (the current name) or max_tokens (the deprecated one)."""
        return self.max_completion_tokens or self.max_tokens
