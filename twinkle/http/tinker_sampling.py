"""Tinker sampling: sampling sessions, sampler lookup and `asample`.

A sampler runs a base model, optionally with a saved adapter (`model_path`); `asample` queues the
request in the model's sampling lane and returns a future id for `retrieve_future`.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from twinkle import ids
from twinkle.api.spec import CreateSamplerArgs, SampleArgs
from twinkle.errors import InvalidInputError, NotFoundError
from twinkle.http import tinker_codec as codec
from twinkle.http.common import context, parse, resolve_checkpoint, tenant_of, validate_body
from twinkle.http.tinker_bodies import CreateSamplingSessionBody, SampleBody
from twinkle.http.tinker_futures import future_reply
from twinkle.types import Datum, SamplingParams
from twinkle.validation import validate_sampling
from twinkle.vision import ImageLimits, resolve_images

router = APIRouter(prefix="/api/v1")


async def _create_sampler(ctx, tenant: str, session_id: str | None, sampler_id: str, model_path: str | None,
                          base_model: str | None) -> str:
    folder = None
    if model_path:
        ckpt = await resolve_checkpoint(ctx, model_path, tenant, field="model_path")
        base_model = base_model or ckpt["base_model"]
        folder = ckpt["folder"]
    if not base_model:
        raise InvalidInputError("give base_model or model_path", field="base_model")
    ctx.info(base_model)
    await ctx.call(tenant, base_model, "create_sampler", sampler_id,
                   CreateSamplerArgs(base_model=base_model, model_path=folder),
                   record={"session_id": session_id, "tinker_path": model_path})
    return base_model


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, CreateSamplingSessionBody)
    await ctx.require_session(body.session_id, tenant)
    sampler_id = ids.sampler_id(body.session_id, body.sampling_session_seq_id)
    await _create_sampler(ctx, tenant, body.session_id, sampler_id, body.model_path, body.base_model)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    row = await ctx.db(ctx.store.get_sampler, sampler_id, tenant)
    if row is None:
        raise NotFoundError(f"no sampler {sampler_id!r}", field="sampler_id")
    return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}


def _sampling_params(raw: dict) -> SamplingParams:
    if not isinstance(raw, dict):
        raise InvalidInputError("must be an object", field="sampling_params")
    try:
        return validate_body(SamplingParams, {k: v for k, v in raw.items() if v is not None and k != "type"})
    except InvalidInputError as exc:
        raise InvalidInputError(exc.message, field=f"sampling_params.{exc.field}") from None


@router.post("/asample")
async def asample(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, SampleBody)
    prompt, images = codec.tokens_from_json_chunks(body.prompt, "prompt")  # checked before any sampler is made
    params = _sampling_params(body.sampling_params)
    if body.sampling_session_id:
        row = await ctx.db(ctx.store.get_sampler, body.sampling_session_id, tenant)
        if row is None:
            raise NotFoundError(f"no sampling session {body.sampling_session_id!r}", field="sampling_session_id")
        sampler_id, base_model = body.sampling_session_id, row["base_model"]
    else:  # SDKs before sampling sessions name the model in the request
        sampler_id = ids.adhoc_sampler_id(uuid.uuid4().hex)
        base_model = await _create_sampler(ctx, tenant, None, sampler_id, body.model_path, body.base_model)
    info = ctx.info(base_model)
    if images or info.get("vision"):  # image runs get the model's image token; bare text may not hold it
        limits = ImageLimits.of(ctx.config.limits)
        prompt_datum = resolve_images([Datum(input_tokens=prompt, images=images)], info.get("vision"), limits,
                                      model=base_model, where="prompt")[0]
        prompt, images = prompt_datum.input_tokens, prompt_datum.images
    targets = None
    if body.target_prompt_logprobs is not None:  # a sparse request's unlisted cells ask for nothing
        rows = max(len(prompt) - 1, 0)
        targets = codec.tensor_from_json(
            body.target_prompt_logprobs, "target_prompt_logprobs", sparse_fill=-1, rows=rows,
            budget=codec.ElementBudget(ctx.config.limits.max_tensor_elements),
            expected=f"must have shape [len(prompt) - 1, K] = [{rows}, K], got {{shape}}")
    validate_sampling(prompt, params, body.num_samples, info["vocab_size"], info["max_context"],
                      topk_prompt_logprobs=body.topk_prompt_logprobs, topk_sample_logprobs=body.topk_sample_logprobs,
                      target_prompt_logprobs=targets, prompt_alt_tokens_k=body.prompt_alt_tokens_k,
                      max_samples=ctx.config.limits.max_samples_per_request)
    args = SampleArgs(prompt_tokens=prompt, params=params, num_samples=body.num_samples,
                      include_prompt_logprobs=body.prompt_logprobs, topk_prompt_logprobs=body.topk_prompt_logprobs,
                      topk_sample_logprobs=body.topk_sample_logprobs, target_prompt_logprobs=targets,
                      prompt_alt_tokens_k=body.prompt_alt_tokens_k, images=images)
    request_id = await ctx.submit(tenant, base_model, "sample", sampler_id, args, seq_id=body.seq_id,
                                  extra={"type": "Sample", "last_n": body.prompt_logprobs_last_n})
    return future_reply(request_id, sample_sequence_ids=[f"{request_id}-{i}" for i in range(body.num_samples)])
