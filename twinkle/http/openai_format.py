"""OpenAI's response objects and stream chunks, built from sampled choices.

Kept apart from the routes so the wire shapes (completion, chat.completion, their chunks, the
error object) live in one place and can be checked against OpenAI's documentation at a glance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from twinkle.errors import TwinkleError

# OpenAI's error `type` for each status; `code` narrows it where OpenAI's clients look for one
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class Choice:
    """One sampled continuation, ready to show: its text, the piece each token adds, and (when
    asked for) each token's text, logprob and top alternatives."""

    index: int
    text: str
    pieces: list[str]
    finish_reason: str  # "stop" or "length"
    tokens: list[str] | None = None
    logprobs: list[float] | None = None
    top: list[list[tuple[str, float]]] | None = None


def error_body(exc: TwinkleError) -> dict:
    """OpenAI's error object for a Twinkle error: the message says what was wrong, `param` where."""
    code = {401: "invalid_api_key", 404: "model_not_found" if exc.field == "model" else "not_found",
            429: "rate_limit_exceeded"}.get(exc.status_code)
    return {"error": {"message": exc.message if exc.field else str(exc), "param": exc.field, "code": code,
                      "type": ERROR_TYPES.get(exc.status_code, "server_error")}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --------------------------------------------------------------- completions
def _completion_logprobs(choice: Choice, start: int = 0, stop: int | None = None, offset: int = 0) -> dict | None:
    """The legacy completions logprobs object for tokens [start, stop)."""
    if choice.logprobs is None:
        return None
    stop = len(choice.pieces) if stop is None else stop
    offsets, at = [], offset
    for piece in choice.pieces[start:stop]:
        offsets.append(at)
        at += len(piece)
    return {"tokens": choice.tokens[start:stop], "token_logprobs": choice.logprobs[start:stop],
            "top_logprobs": [dict(alts) for alts in choice.top[start:stop]] if choice.top is not None else None,
            "text_offset": offsets}


def completion(request_id: str, created: int, model: str, choices: list[Choice], use: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c),
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": use}


def completion_chunks(request_id: str, created: int, model: str, choices: list[Choice],
                      use: dict | None) -> Iterator[dict]:
    """One chunk per token of each choice (tokens that add no text yet are sent only to carry
    their logprobs), a last chunk with the finish reason, then the usage chunk if asked for."""
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None}
    for c in choices:
        offset = 0
        for i, piece in enumerate(c.pieces):
            if piece or c.logprobs is not None:
                yield {**head, "choices": [{"index": c.index, "text": piece, "finish_reason": None,
                                            "logprobs": _completion_logprobs(c, i, i + 1, offset)}]}
            offset += len(piece)
        yield {**head, "choices": [{"index": c.index, "text": "", "logprobs": None,
                                    "finish_reason": c.finish_reason}]}
    if use is not None:
        yield {**head, "choices": [], "usage": use}


# ---------------------------------------------------------------------- chat
def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _chat_logprobs(choice: Choice, start: int = 0, stop: int | None = None) -> dict | None:
    if choice.logprobs is None:
        return None
    stop = len(choice.pieces) if stop is None else stop
    content = []
    for i in range(start, stop):
        entry = _token_entry(choice.tokens[i], choice.logprobs[i])
        entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in choice.top[i]] if choice.top is not None else []
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_completion(request_id: str, created: int, model: str, choices: list[Choice], use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                         "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason} for c in choices],
            "usage": use}


def chat_chunks(request_id: str, created: int, model: str, choices: list[Choice], use: dict | None) -> Iterator[dict]:
    """The role first, then one content delta per token, then the finish reason; usage last if asked."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    for c in choices:
        yield {**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
        for i, piece in enumerate(c.pieces):
            if piece or c.logprobs is not None:
                yield {**head, "choices": [{"index": c.index, "delta": {"content": piece},
                                            "logprobs": _chat_logprobs(c, i, i + 1), "finish_reason": None}]}
        yield {**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                    "finish_reason": c.finish_reason}]}
    if use is not None:
        yield {**head, "choices": [], "usage": use}


def sse(chunks: Iterator[dict]) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then `data: [DONE]`."""
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"
