"""The Tinker wire protocol (`/api/v1/...`): sessions, training, sampling and futures.

Heavy calls (`forward_backward`, results of forward/sample) are protobuf for SDK >= 0.25 and JSON
for older SDKs; everything else is JSON. Mutating calls return a future id at once and run in the
model's scheduler in seq_id order; `retrieve_future` long-polls for the result.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from twinkle.api.spec import (CreateModelArgs, CreateSamplerArgs, Empty, ForwardArgs, FromCheckpointArgs, LoadArgs,
                              SampleArgs, SaveArgs, SaveSamplerArgs, StepArgs)
from twinkle.errors import InvalidInputError, NotFoundError, SessionExpiredError, TwinkleError, UnprocessableError
from twinkle.http import tinker_codec as codec
from twinkle.http.common import (Body, context, parse, read_json, resolve_checkpoint, tenant_of, tinker_path,
                                 validate_body)
from twinkle.paths import check_name
from twinkle.types import AdamParams, LoraConfig, SamplingParams
from twinkle.validation import validate_batch, validate_sampling

router = APIRouter(prefix="/api/v1")


# ------------------------------------------------------------------ bodies
class CreateSessionBody(Body):
    tags: list[str] = []
    user_metadata: dict | None = None
    sdk_version: str | None = None


class SessionIdBody(Body):
    session_id: str


class LoraBody(Body):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraBody | None = None
    optimizer_config: dict | None = None
    user_metadata: dict | None = None


class ModelIdBody(Body):
    model_id: str
    seq_id: int | None = None


class AdamBody(Body):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepBody(Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamBody | None = None
    optimizer_params: dict | None = None


class SaveWeightsBody(Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict | None = None
    sampling_session_seq_id: int | None = None
    kind: str | None = None


class LoadWeightsBody(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict | None = None


class CreateSamplingSessionBody(Body):
    session_id: str
    sampling_session_seq_id: int = 0
    model_path: str | None = None
    base_model: str | None = None


class SampleBody(Body):
    sampling_session_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = 1
    prompt: dict
    sampling_params: dict = {}
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0


class RetrieveBody(Body):
    request_id: str
    allow_metadata_only: bool = False


# --------------------------------------------------------------- plumbing
def _future_reply(request_id: str, **extra) -> dict:
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}


async def _request_target(request: Request) -> tuple[str | None, int | None]:
    """(model_id, seq_id) of a training request, read from its raw body (protobuf or JSON)."""
    raw = await request.body()  # cached by Starlette: the handler has already read it
    try:
        if codec.PROTOBUF in request.headers.get("content-type", ""):
            message = codec.pb().ForwardBackwardRequest()
            message.ParseFromString(codec.maybe_decompress(raw, request.headers.get("content-encoding")))
            return message.model_id or None, int(message.seq_id)
        data = json.loads(raw) if raw else {}
        seq_id = data.get("seq_id")
        return data.get("model_id"), seq_id if isinstance(seq_id, int) else None
    except Exception:
        return None, None


def frees_seq_on_rejection(handler):
    """A training request rejected with a 4xx still used up its seq_id on the client: tell the
    model's scheduler, so the requests after it are not held up waiting for it."""

    @functools.wraps(handler)
    async def wrapper(request: Request):
        try:
            return await handler(request)
        except TwinkleError:
            model_id, seq_id = await _request_target(request)
            if model_id and seq_id is not None:
                ctx = context(request)
                try:
                    tenant = ctx.keys.tenant_for(request.headers)
                    await ctx.skip(await ctx.model_owner(model_id, tenant), model_id, seq_id)
                except TwinkleError:
                    pass
            raise

    return wrapper


def _pydantic_error(exc: Exception, field: str) -> InvalidInputError:
    first = exc.errors()[0] if hasattr(exc, "errors") and exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return InvalidInputError(first.get("msg", str(exc)), field=f"{field}.{loc}" if loc else field)


# --------------------------------------------------------------- service
@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(request: Request) -> dict:
    await tenant_of(request)
    return {"parallel_fwdbwd_chunks": True}


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request) -> dict:
    await tenant_of(request)
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/telemetry")
async def telemetry(request: Request) -> dict:
    await tenant_of(request)
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
async def server_capabilities(request: Request) -> dict:
    await tenant_of(request)
    ctx = context(request)
    return {"supported_models": [
        {"model_name": m.name, "max_context_length": ctx.model_info[m.name].get("max_context"),
         "trainable": True, "sampleable": True} for m in ctx.config.models]}


# -------------------------------------------------------------- sessions
@router.post("/create_session")
async def create_session(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, CreateSessionBody)
    session_id = str(uuid.uuid4())
    await ctx.db(ctx.store.create_session, session_id, tenant, tags=body.tags, user_metadata=body.user_metadata,
                 sdk_version=body.sdk_version)
    info = None if not ctx.keys.open else "this Twinkle server runs without API keys (loopback only)"
    return {"session_id": session_id, "type": "create_session", "info_message": info}


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, SessionIdBody)
    status = await ctx.db(ctx.store.heartbeat, body.session_id, tenant)  # an expired session comes back
    if status is None:
        raise NotFoundError(f"no session {body.session_id!r}", field="session_id")
    if status not in ("active", "expired"):
        raise SessionExpiredError(f"session {body.session_id} is {status}; create a new one", field="session_id")
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    await ctx.require_session(session_id, tenant)
    await ctx.end_session(session_id, "finished")
    return {}


@router.get("/sessions")
async def list_sessions(request: Request, limit: int = 20, offset: int = 0) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    return {"sessions": await ctx.db(ctx.store.list_sessions, tenant, limit, offset)}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    session = await ctx.require_session(session_id, tenant)
    models = await ctx.db(ctx.store.models_of_session, session_id)
    samplers = await ctx.db(ctx.store.samplers_of_session, session_id)
    metadata = json.loads(session["user_metadata"]) if session.get("user_metadata") else None
    return {"training_run_ids": [m["model_id"] for m in models], "sampler_ids": samplers, "user_metadata": metadata}


# ---------------------------------------------------------------- models
def _lora(body: LoraBody | None, info: dict) -> LoraConfig:
    body = body or LoraBody()
    if body.rank > info["max_lora_rank"]:
        raise InvalidInputError(f"rank {body.rank} exceeds this model's maximum LoRA rank {info['max_lora_rank']}",
                                field="lora_config.rank")
    try:
        return LoraConfig(rank=body.rank, seed=body.seed, train_attn=body.train_attn, train_mlp=body.train_mlp,
                          train_unembed=body.train_unembed)
    except ValueError as exc:
        raise _pydantic_error(exc, "lora_config") from None


def _model_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


@router.post("/create_model")
async def create_model(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, CreateModelBody)
    await ctx.require_session(body.session_id, tenant)
    info = ctx.info(body.base_model)
    optimizer_type = (body.optimizer_config or {}).get("type", "adamw")
    if optimizer_type != "adamw":
        raise UnprocessableError(f"optimizer {optimizer_type!r} is not supported; use adamw", field="optimizer_config")
    model_id = _model_id(body.session_id, body.model_seq_id)
    args = CreateModelArgs(base_model=body.base_model, lora=_lora(body.lora_config, info))
    request_id = await ctx.submit(
        tenant, body.base_model, "create_model", model_id, args, seq_id=0, ordered=True,
        extra={"type": "CreateModel", "model_id": model_id},
        record={"session_id": body.session_id, "run_dir": ctx.run_dir(model_id), "user_metadata": body.user_metadata})
    return _future_reply(request_id, model_id=model_id)


@router.post("/get_info")
async def get_info(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, ModelIdBody)
    base_model = await ctx.model_owner(body.model_id, tenant)
    row = await ctx.db(ctx.store.get_model, body.model_id, tenant)
    info = ctx.info(base_model)
    tokenizer_id = info["model_path"]
    return {
        "type": "get_info",
        "model_id": body.model_id,
        "model_data": {"arch": info.get("arch"), "model_name": base_model, "tokenizer_id": tokenizer_id},
        "is_lora": True,
        "lora_rank": row["lora"]["rank"],
        "model_name": base_model,
        "optimizer_config": {"type": "adamw"},
    }


@router.post("/unload_model")
@frees_seq_on_rejection
async def unload_model(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, ModelIdBody)
    base_model = await ctx.model_owner(body.model_id, tenant)
    request_id = await ctx.submit(tenant, base_model, "close_model", body.model_id, Empty(), seq_id=body.seq_id,
                                  ordered=body.seq_id is not None,
                                  extra={"type": "UnloadModel", "model_id": body.model_id})
    ctx.forget_model(body.model_id)
    return _future_reply(request_id, model_id=body.model_id)


async def _submit_forward(request: Request, parsed: dict) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    model_id, seq_id = parsed["model_id"], parsed["seq_id"]
    if not model_id:
        raise InvalidInputError("missing model_id", field="model_id")
    base_model = await ctx.model_owner(model_id, tenant)
    info = ctx.info(base_model)
    limits = ctx.config.limits
    loss = parsed["loss_fn"]
    if not loss:
        raise InvalidInputError("missing loss_fn; e.g. cross_entropy", field="loss_fn")
    validate_batch(parsed["data"], loss, parsed["loss_fn_config"], info["vocab_size"],
                   max_datums=limits.max_datums_per_request, max_tokens=limits.max_tokens_per_request)
    forward_only = parsed["forward_only"]
    args = ForwardArgs(data=parsed["data"], loss=loss, loss_config=parsed["loss_fn_config"])
    request_id = await ctx.submit(tenant, base_model, "forward" if forward_only else "forward_backward", model_id,
                                  args, seq_id=seq_id, ordered=seq_id is not None,
                                  extra={"type": "Forward" if forward_only else "ForwardBackward"})
    return _future_reply(request_id, model_id=model_id)


@router.post("/forward_backward")
@frees_seq_on_rejection
async def forward_backward(request: Request) -> dict:
    content_type = request.headers.get("content-type", "")
    if codec.PROTOBUF in content_type:
        raw = await request.body()
        limit = context(request).config.limits.max_body_bytes
        if len(raw) > limit:
            raise InvalidInputError(f"request body of {len(raw)} bytes exceeds the limit of {limit}", field="body")
        parsed = codec.parse_forward_backward_proto(raw, request.headers.get("content-encoding"))
    else:
        parsed = codec.parse_forward_backward_json(await read_json(request), "forward_backward_input")
    return await _submit_forward(request, parsed)


@router.post("/forward")
@frees_seq_on_rejection
async def forward(request: Request) -> dict:
    parsed = codec.parse_forward_backward_json(await read_json(request), "forward_input")
    return await _submit_forward(request, parsed)


@router.post("/optim_step")
@frees_seq_on_rejection
async def optim_step(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, OptimStepBody)
    base_model = await ctx.model_owner(body.model_id, tenant)

    def check() -> AdamParams:
        if body.optimizer_params is not None and body.adam_params is None:
            raise UnprocessableError(f"optimizer {body.optimizer_params.get('type')!r} is not supported; "
                                     "send adam_params", field="optimizer_params")
        params = body.adam_params or AdamBody()
        try:
            return AdamParams(**params.model_dump())
        except ValueError as exc:
            raise _pydantic_error(exc, "adam_params") from None

    adam = check()
    request_id = await ctx.submit(tenant, base_model, "step", body.model_id, StepArgs(optimizer=adam),
                                  seq_id=body.seq_id, ordered=body.seq_id is not None, extra={"type": "OptimStep"})
    return _future_reply(request_id, model_id=body.model_id)


async def _submit_save(ctx, tenant: str, base_model: str, body: SaveWeightsBody, name: str, kind: str,
                       reply_type: str) -> dict:
    """A named checkpoint: full training state (weights) or adapter only (sampler_weights)."""
    args = SaveArgs(name=name, with_optimizer=kind == "weights", overwrite=body.overwrite or kind != "weights",
                    kind=kind)
    request_id = await ctx.submit(tenant, base_model, "save", body.model_id, args, seq_id=body.seq_id,
                                  ordered=body.seq_id is not None,
                                  extra={"type": reply_type, "path": tinker_path(body.model_id, kind, name)},
                                  record={"ttl_seconds": body.ttl_seconds, "user_metadata": body.user_metadata})
    return _future_reply(request_id, model_id=body.model_id)


@router.post("/save_weights")
@frees_seq_on_rejection
async def save_weights(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, SaveWeightsBody)
    base_model = await ctx.model_owner(body.model_id, tenant)
    name = check_name(body.path or f"checkpoint-{int(time.time())}", "path")
    return await _submit_save(ctx, tenant, base_model, body, name, "weights", "SaveWeights")


@router.post("/save_weights_for_sampler")
@frees_seq_on_rejection
async def save_weights_for_sampler(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, SaveWeightsBody)
    base_model = await ctx.model_owner(body.model_id, tenant)
    ordered = body.seq_id is not None
    if body.path:  # named: a sampler checkpoint others can load by path
        name = check_name(body.path, "path")
        return await _submit_save(ctx, tenant, base_model, body, name, "sampler_weights", "SaveWeightsForSampler")
    # unnamed (save_weights_and_get_sampling_client): a snapshot and a sampler for it
    session_id = body.model_id.split(":train:")[0]
    counter = body.sampling_session_seq_id
    if counter is None:
        counter = await ctx.db(ctx.store.next_counter, session_id, "snapshot")
    sampler_id = f"{session_id}:sample:{counter}"
    args = SaveSamplerArgs(sampler_id=sampler_id)
    request_id = await ctx.submit(tenant, base_model, "create_sampler_from_model", body.model_id, args,
                                  seq_id=body.seq_id, ordered=ordered,
                                  extra={"type": "SaveWeightsForSampler", "sampling_session_id": sampler_id},
                                  record={"session_id": session_id})
    return _future_reply(request_id, model_id=body.model_id)


@router.post("/save_weights_external")
async def save_weights_external(request: Request) -> dict:
    await tenant_of(request)
    raise UnprocessableError("external weights are not supported by this server; use save_state or "
                             "save_weights_for_sampler, whose folders are standard PEFT adapters", field="path")


@router.post("/load_weights")
@frees_seq_on_rejection
async def load_weights(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, LoadWeightsBody)
    if body.model_id is None:  # create-via-load: the model's first request (seq 0)
        if body.session_id is None or body.model_seq_id is None:
            raise InvalidInputError("give model_id, or session_id and model_seq_id", field="model_id")
        await ctx.require_session(body.session_id, tenant)
        ckpt = await resolve_checkpoint(ctx, body.path, tenant)
        base_model = body.base_model or ckpt["base_model"]
        ctx.info(base_model)
        model_id = _model_id(body.session_id, body.model_seq_id)
        args = FromCheckpointArgs(path=ckpt["folder"], with_optimizer=body.optimizer, base_model=base_model)
        request_id = await ctx.submit(
            tenant, base_model, "create_model_from_checkpoint", model_id, args, seq_id=0, ordered=True,
            extra={"type": "LoadWeights", "path": body.path, "model_id": model_id},
            record={"session_id": body.session_id, "run_dir": ctx.run_dir(model_id),
                    "user_metadata": body.user_metadata})
        return _future_reply(request_id, model_id=model_id)
    base_model = await ctx.model_owner(body.model_id, tenant)
    ckpt = await resolve_checkpoint(ctx, body.path, tenant)
    args = LoadArgs(path=ckpt["folder"], with_optimizer=body.optimizer)
    request_id = await ctx.submit(tenant, base_model, "load", body.model_id, args, seq_id=body.seq_id,
                                  ordered=body.seq_id is not None,
                                  extra={"type": "LoadWeights", "path": body.path})
    return _future_reply(request_id, model_id=body.model_id)


# -------------------------------------------------------------- sampling
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
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
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
    if body.sampling_session_id:
        row = await ctx.db(ctx.store.get_sampler, body.sampling_session_id, tenant)
        if row is None:
            raise NotFoundError(f"no sampling session {body.sampling_session_id!r}", field="sampling_session_id")
        sampler_id, base_model = body.sampling_session_id, row["base_model"]
    else:  # SDKs before sampling sessions name the model in the request
        sampler_id = f"adhoc:{uuid.uuid4().hex}"
        base_model = await _create_sampler(ctx, tenant, None, sampler_id, body.model_path, body.base_model)
    info = ctx.info(base_model)
    targets = None
    if body.target_prompt_logprobs is not None:  # a sparse request's unlisted cells ask for nothing
        targets = codec.tensor_from_json(body.target_prompt_logprobs, "target_prompt_logprobs", sparse_fill=-1)
    prompt = codec.tokens_from_json_chunks(body.prompt, "prompt")
    params = _sampling_params(body.sampling_params)
    validate_sampling(prompt, params, body.num_samples, info["vocab_size"], info["max_context"],
                      topk_prompt_logprobs=body.topk_prompt_logprobs, topk_sample_logprobs=body.topk_sample_logprobs,
                      target_prompt_logprobs=targets, prompt_alt_tokens_k=body.prompt_alt_tokens_k,
                      max_samples=ctx.config.limits.max_samples_per_request)
    args = SampleArgs(prompt_tokens=prompt, params=params, num_samples=body.num_samples,
                      include_prompt_logprobs=body.prompt_logprobs, topk_prompt_logprobs=body.topk_prompt_logprobs,
                      topk_sample_logprobs=body.topk_sample_logprobs, target_prompt_logprobs=targets,
                      prompt_alt_tokens_k=body.prompt_alt_tokens_k)
    request_id = await ctx.submit(tenant, base_model, "sample", sampler_id, args, seq_id=body.seq_id,
                                  extra={"type": "Sample", "last_n": body.prompt_logprobs_last_n})
    return _future_reply(request_id, sample_sequence_ids=[f"{request_id}-{i}" for i in range(body.num_samples)])


# --------------------------------------------------------------- futures
def _sdk_version(request: Request) -> tuple[int, ...] | None:
    raw = request.headers.get("x-stainless-package-version", "")
    try:
        return tuple(int(part) for part in raw.split(".")[:2])
    except ValueError:
        return None


def _wants_protobuf(request: Request) -> bool:
    """SDK >= 0.25 only reads protobuf results; older SDKs (which also accept protobuf) get JSON."""
    if codec.PROTOBUF not in request.headers.get("accept", ""):
        return False
    version = _sdk_version(request)
    return version is None or version >= (0, 25)


def _result_response(request: Request, payload: Any, extra: dict) -> Response:
    kind = extra.get("type")
    if kind in ("ForwardBackward", "Forward"):
        if _wants_protobuf(request):
            return Response(codec.forward_output_proto(payload), media_type=codec.PROTOBUF)
        return JSONResponse(codec.forward_output_json(payload))
    if kind == "Sample":
        last_n = extra.get("last_n")
        if _wants_protobuf(request):
            return Response(codec.sample_output_proto(payload, prompt_logprobs_last_n=last_n),
                            media_type=codec.PROTOBUF)
        return JSONResponse(codec.sample_output_json(payload, prompt_logprobs_last_n=last_n))
    if kind == "CreateModel":
        return JSONResponse({"model_id": extra["model_id"], "type": "create_model"})
    if kind == "OptimStep":
        return JSONResponse({"metrics": {k: float(v) for k, v in payload.get("metrics", {}).items()}})
    if kind in ("SaveWeights",):
        return JSONResponse({"path": extra["path"], "type": "save_weights"})
    if kind == "SaveWeightsForSampler":
        if "sampling_session_id" in extra:
            return JSONResponse({"sampling_session_id": extra["sampling_session_id"]})
        return JSONResponse({"path": extra["path"]})
    if kind == "LoadWeights":
        return JSONResponse({k: extra[k] for k in ("path", "model_id") if k in extra})
    if kind == "UnloadModel":
        return JSONResponse({"model_id": extra["model_id"], "type": "unload_model"})
    return JSONResponse(_plain(payload))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, RetrieveBody)
    status, payload, extra = await ctx.wait_future(body.request_id, tenant, ctx.config.timeouts.long_poll_s)
    if status == "pending":
        return JSONResponse({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
    if status == "failed":
        return JSONResponse({"error": payload.get("error", "request failed"),
                             "category": payload.get("category", "unknown")})
    return _result_response(request, payload, extra)
