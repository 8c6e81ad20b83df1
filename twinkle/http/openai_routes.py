"""OpenAI-compatible sampling: `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

So any OpenAI client (the `openai` package, LangChain, evaluation harnesses) can sample a hosted base
model or a tenant's trained adapter, named by its `tinker://<run>/sampler_weights/<name>` path. The
requests run through the same sampling path as the Tinker SDK's: a one-request sampler in the model's
sampling lane, its queue, quotas and batching. Text work (prompt encoding, chat templates, decoding)
happens beside the model in its scheduler (`textcodec.TextCodec`); this layer loads no tokenizer.

Streaming sends server-sent events in OpenAI's chunk format, one chunk per sampled token, once the
sample is complete (the sampler returns whole sequences); the stream ends with `data: [DONE]`.
Errors use OpenAI's error object, so OpenAI clients raise their typed errors.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from twinkle import ids
from twinkle.api.spec import CreateSamplerArgs, SampleArgs
from twinkle.errors import InvalidInputError, NotFoundError, TwinkleError
from twinkle.http import openai_format as fmt
from twinkle.http.common import context, parse_tinker_path, read_json, resolve_checkpoint, tenant_of, validate_body
from twinkle.http.context import ServerContext
from twinkle.http.openai_bodies import (CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS, ChatBody,
                                        CompletionBody, SamplingBody)
from twinkle.types import SamplingParams
from twinkle.validation import validate_sampling

# Twinkle's field names in sampler errors -> the OpenAI request's parameter names
_PARAMS = {"num_samples": "n", "sampling_params.max_tokens": "max_tokens", "topk_sample_logprobs": "logprobs",
           "sampling_params.stop": "stop_token_ids", "base_model": "model", "model_path": "model"}


class OpenAIRoute(APIRoute):
    """A route whose errors answer in OpenAI's error shape (Twinkle's own routes keep theirs)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except TwinkleError as exc:
                if exc.field in _PARAMS:
                    exc.field = _PARAMS[exc.field]
                retry = getattr(exc, "retry_after_s", None)
                headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
                return JSONResponse(fmt.error_body(exc), status_code=exc.status_code, headers=headers)

        return route


router = APIRouter(prefix="/v1", route_class=OpenAIRoute)


# -------------------------------------------------------------------- models
@router.get("/models")
async def list_models(request: Request) -> dict:
    """The hosted base models and the caller's sampler checkpoints, each usable as `model`."""
    tenant = await tenant_of(request)
    ctx = context(request)
    return {"object": "list", "data": await _model_entries(ctx, tenant)}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    for entry in await _model_entries(ctx, tenant):
        if entry["id"] == model:
            return entry
    if model.startswith("tinker://"):  # another tenant's published checkpoint is usable, though not listed
        ckpt = await _sampler_checkpoint(ctx, tenant, model)
        return _checkpoint_entry(ckpt)
    raise _unknown_model(model)


async def _model_entries(ctx: ServerContext, tenant: str) -> list[dict]:
    now = int(time.time())
    entries = [{"id": name, "object": "model", "created": now, "owned_by": "twinkle", "root": name,
                "parent": None} for name in ctx.schedulers]
    rows = await ctx.db(_own_sampler_checkpoints, ctx, tenant)
    return entries + [_checkpoint_entry(row) for row in rows]


def _own_sampler_checkpoints(ctx: ServerContext, tenant: str) -> list[dict]:
    """The tenant's sampler checkpoints with their base models (runs in a thread: store reads)."""
    rows, _ = ctx.store.list_checkpoints(tenant)
    rows = [row for row in rows if row["kind"] == "sampler"]
    bases: dict[str, str | None] = {}
    for row in rows:
        if row["run_id"] not in bases:
            model = ctx.store.get_model(row["run_id"], None)
            bases[row["run_id"]] = model["base_model"] if model else None
        row["base_model"] = bases[row["run_id"]]
        row["tinker_path"] = f"tinker://{row['run_id']}/{row['checkpoint_id']}"
    return rows


def _checkpoint_entry(row: dict) -> dict:
    return {"id": row["tinker_path"], "object": "model", "created": int(row["created_at"]),
            "owned_by": row["tenant"], "root": row.get("base_model"), "parent": row.get("base_model")}


def _unknown_model(model: str) -> NotFoundError:
    return NotFoundError(f"the model {model!r} does not exist or is not yours; use a hosted base model or a "
                         "tinker://<run_id>/sampler_weights/<name> path you may read (GET /v1/models lists them)",
                         field="model")


async def _sampler_checkpoint(ctx: ServerContext, tenant: str, path: str) -> dict:
    _, checkpoint_id = parse_tinker_path(path, "model")
    if not checkpoint_id.startswith("sampler_weights/"):
        raise InvalidInputError(f"{path!r} holds training weights; sample from a sampler checkpoint "
                                "(save_weights_for_sampler gives a tinker://<run_id>/sampler_weights/<name> path)",
                                field="model")
    try:
        return await resolve_checkpoint(ctx, path, tenant, field="model")
    except NotFoundError:
        raise _unknown_model(path) from None


async def _resolve_model(ctx: ServerContext, tenant: str, model: str) -> tuple[str, dict | None]:
    """(base model, checkpoint record or None) of a request's `model`."""
    if model in ctx.schedulers:
        return model, None
    if not model.startswith("tinker://"):
        raise _unknown_model(model)
    ckpt = await _sampler_checkpoint(ctx, tenant, model)
    if ckpt["base_model"] not in ctx.schedulers:
        raise NotFoundError(f"{model!r} was trained on {ckpt['base_model']!r}, which this server no longer hosts",
                            field="model")
    return ckpt["base_model"], ckpt


# ------------------------------------------------------------------ sampling
async def _text(ctx: ServerContext, base_model: str, op: str, *args) -> Any:
    """Tokenizer work in the model's scheduler; a ValueError there (a chat the template refuses, say)
    is the caller's to fix."""
    try:
        return await ctx.scheduler(base_model).text.remote(op, *args)
    except ValueError as exc:  # Ray re-raises it as a subclass of the original, with the cause attached
        field = {"chat_prompt": "messages", "encode": "prompt"}.get(op)
        raise InvalidInputError(str(getattr(exc, "cause", None) or exc)[:500], field=field) from None


def _params(body: SamplingBody, prompt_len: int, max_context: int, default_max: int, stop) -> SamplingParams:
    room = max_context - prompt_len
    if room < 1:
        raise InvalidInputError(f"the prompt has {prompt_len} tokens; this model's context is {max_context} tokens",
                                field="prompt" if isinstance(body, CompletionBody) else "messages")
    asked = body.reply_limit() if isinstance(body, ChatBody) else body.max_tokens
    if asked is not None and asked > room:
        raise InvalidInputError(f"this model's context is {max_context} tokens and the prompt takes {prompt_len}, "
                                f"so at most {room} can be sampled; you asked for {asked}: lower it",
                                field="max_tokens")
    fields = {"max_tokens": asked or min(default_max, room), "stop": stop,
              "temperature": 1.0 if body.temperature is None else body.temperature,
              "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": -1 if body.top_k is None else body.top_k,
              "seed": body.seed}
    return validate_body(SamplingParams, fields)


async def _stop_spec(ctx: ServerContext, base_model: str, body: SamplingBody) -> tuple[Any, list[str]]:
    """What the sampler stops on, and the stop strings to cut the text at. The sampler takes either
    strings or token ids: with stop strings, the end tokens (and `stop_token_ids`) join them as text."""
    strings, token_ids = body.stop_strings(), list(body.stop_token_ids or [])
    if strings:
        return strings + await _text(ctx, base_model, "stop_texts", token_ids), strings
    if token_ids:
        return await _text(ctx, base_model, "end_token_ids") + token_ids, []
    return None, []


async def _sample(ctx: ServerContext, tenant: str, base_model: str, ckpt: dict | None, prompt: list[int],
                  params: SamplingParams, n: int, top_k: int) -> dict:
    """One prompt's samples through a one-request sampler (the same path as the Tinker SDK's)."""
    sampler_id = ids.adhoc_sampler_id(uuid.uuid4().hex)
    await ctx.call(tenant, base_model, "create_sampler", sampler_id,
                   CreateSamplerArgs(base_model=base_model, model_path=ckpt["folder"] if ckpt else None),
                   record={"session_id": None, "tinker_path": ckpt["tinker_path"] if ckpt else None})
    args = SampleArgs(prompt_tokens=prompt, params=params, num_samples=n, topk_sample_logprobs=top_k)
    return await ctx.call(tenant, base_model, "sample", sampler_id, args)


async def _run(ctx: ServerContext, tenant: str, body: SamplingBody, prompts: list[list[int]], base_model: str,
               ckpt: dict | None, *, default_max: int, logprobs: int | None) -> tuple[list[fmt.Choice], dict]:
    """Sample every prompt (concurrently), then render the choices: text, pieces, logprobs."""
    info = ctx.info(base_model)
    stop, cut_at = await _stop_spec(ctx, base_model, body)
    top_k = logprobs or 0
    jobs = []
    for prompt in prompts:
        params = _params(body, len(prompt), info["max_context"], default_max, stop)
        validate_sampling(np.asarray(prompt, dtype=np.int64), params, body.n, info["vocab_size"], info["max_context"],
                          topk_sample_logprobs=top_k, max_samples=ctx.config.limits.max_samples_per_request)
        jobs.append((prompt, params))
    results = await asyncio.gather(*(_sample(ctx, tenant, base_model, ckpt, prompt, params, body.n, top_k)
                                     for prompt, params in jobs))
    sequences = [seq for result in results for seq in result["sequences"]]
    rendered = await _text(ctx, base_model, "render_all", [s["tokens"] for s in sequences], cut_at,
                           list(body.stop_token_ids or []))
    names: dict[int, str] = {}
    if logprobs is not None:
        wanted = sorted({t for s in sequences for t in s["tokens"]}
                        | {t for s in sequences for alts in (s.get("topk_logprobs") or []) for t, _ in alts})
        names = dict(zip(wanted, await _text(ctx, base_model, "token_texts", wanted)))
    choices = []
    for index, (seq, text) in enumerate(zip(sequences, rendered)):
        kept = len(text.pieces)
        choice = fmt.Choice(index=index, text=text.text, pieces=text.pieces,
                            finish_reason="stop" if text.stop_hit or seq["stop_reason"] == "stop" else "length")
        if logprobs is not None:
            choice.tokens = [names[t] for t in seq["tokens"][:kept]]
            choice.logprobs = [float(lp) for lp in seq["logprobs"][:kept]]
            alternatives = seq.get("topk_logprobs") or [[]] * kept
            choice.top = [[(names[t], float(lp)) for t, lp in alts] for alts in alternatives[:kept]]
        choices.append(choice)
    use = fmt.usage(sum(len(p) for p in prompts), sum(len(s["tokens"]) for s in sequences))
    return choices, use


async def _begin(request: Request, model: type[SamplingBody]) -> tuple[str, Any, str, dict | None]:
    """Authenticate, parse and check the body, and resolve its model: (tenant, body, base model, checkpoint)."""
    tenant = await tenant_of(request)
    ctx = context(request)
    body = validate_body(model, await read_json(request))
    body.refuse_unsupported()
    base_model, ckpt = await _resolve_model(ctx, tenant, body.model)
    return tenant, body, base_model, ckpt


def _reply(body: SamplingBody, whole: Callable, chunks: Callable, choices: list[fmt.Choice], use: dict,
           prefix: str) -> Response | dict:
    request_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        return whole(request_id, created, body.model, choices, use)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = list(fmt.sse(chunks(request_id, created, body.model, choices, use if include_usage else None)))

    async def stream():
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/completions")
async def completions(request: Request) -> Any:
    """Text completion of a prompt (text or token ids, or a list of them) on a base model or adapter."""
    tenant, body, base_model, ckpt = await _begin(request, CompletionBody)
    ctx = context(request)
    prompts = [p if isinstance(p, list) else await _text(ctx, base_model, "encode", p) for p in body.prompts()]
    if any(not p for p in prompts):
        raise InvalidInputError("encodes to no tokens; send some text", field="prompt")
    choices, use = await _run(ctx, tenant, body, prompts, base_model, ckpt,
                              default_max=COMPLETION_DEFAULT_MAX_TOKENS, logprobs=body.logprobs)
    return _reply(body, fmt.completion, fmt.completion_chunks, choices, use, "cmpl")


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    """The assistant's reply to a conversation, formatted with the model's own chat template."""
    tenant, body, base_model, ckpt = await _begin(request, ChatBody)
    ctx = context(request)
    messages = [m.as_template_message() for m in body.messages]
    prompt = await _text(ctx, base_model, "chat_prompt", messages)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices, use = await _run(ctx, tenant, body, [prompt], base_model, ckpt, default_max=CHAT_DEFAULT_MAX_TOKENS,
                              logprobs=logprobs)
    return _reply(body, fmt.chat_completion, fmt.chat_chunks, choices, use, "chatcmpl")
