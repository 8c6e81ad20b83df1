"""The Tinker wire protocol (`/api/v1/...`): service, sessions, models and training.

`forward_backward` takes protobuf (SDK >= 0.25) or JSON (older SDKs); everything else is JSON.
Mutating calls return a future id at once and run in the model's scheduler in seq_id order;
sampling is in `tinker_sampling`, results are fetched through `tinker_futures.retrieve_future`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid

from fastapi import APIRouter, Request
from pydantic import TypeAdapter

from twinkle import ids
from twinkle.api.spec import (CreateModelArgs, Empty, ForwardArgs, FromCheckpointArgs, LoadArgs, SaveArgs,
                              SaveSamplerArgs, StepArgs)
from twinkle.config import LimitsConfig
from twinkle.errors import InvalidInputError, NotFoundError, SessionExpiredError, TwinkleError, UnprocessableError
from twinkle.http import tinker_codec as codec
from twinkle.http.common import context, parse, read_body, read_json, resolve_checkpoint, tenant_of, tinker_path
from twinkle.http.offload import body_work
from twinkle.http.tinker_bodies import (AdamBody, CreateModelBody, CreateSessionBody, LoadWeightsBody, LoraBody,
                                        ModelIdBody, OptimStepBody, SaveWeightsBody, SessionIdBody)
from twinkle.http.tinker_futures import future_reply
from twinkle.paths import check_name
from twinkle.types import AdamParams, LoraConfig, SeqId
from twinkle.validation import validate_batch
from twinkle.vision import ImageLimits, resolve_images, vision_refusal

router = APIRouter(prefix="/api/v1")


# --------------------------------------------------------------- plumbing
_SEQ_ID = TypeAdapter(SeqId | None)


def _request_target(request: Request) -> tuple[str | None, int | None]:
    """(model_id, seq_id) of a training request, as its handler decoded them: a rejected body is never
    read, decompressed or parsed a second time (one that could not be parsed frees nothing)."""
    target = getattr(request.state, "target", None)
    if target is not None:
        return target
    data = getattr(request.state, "json_body", None)
    if not isinstance(data, dict):
        return None, None
    model_id = data.get("model_id")
    try:
        seq_id = _SEQ_ID.validate_python(data.get("seq_id"))  # what the body models accept
    except ValueError:
        seq_id = None
    return (model_id if isinstance(model_id, str) and model_id else None), seq_id


def frees_seq_on_rejection(handler):
    """A training request rejected with a 4xx still used up its seq_id on the client: tell the
    model's scheduler, so the requests after it are not held up waiting for it."""

    @functools.wraps(handler)
    async def wrapper(request: Request):
        try:
            return await handler(request)
        except TwinkleError:
            model_id, seq_id = _request_target(request)
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
         "trainable": True, "sampleable": True, "input_modalities": _modalities(ctx.model_info[m.name])}
        for m in ctx.config.models]}


def _modalities(info: dict) -> list[str]:
    """What a model's inputs may hold: image chunks only where the model has a vision tower."""
    return ["text", "image"] if info.get("vision") else ["text"]


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
    if body.train_vision and not info.get("vision"):
        raise InvalidInputError(vision_refusal(info.get("name") or info["base_model"]),
                                field="lora_config.train_vision")
    try:
        return LoraConfig(rank=body.rank, seed=body.seed, train_attn=body.train_attn, train_mlp=body.train_mlp,
                          train_unembed=body.train_unembed, train_vision=body.train_vision)
    except ValueError as exc:
        raise _pydantic_error(exc, "lora_config") from None


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
    model_id = ids.model_id(body.session_id, body.model_seq_id)
    args = CreateModelArgs(base_model=body.base_model, lora=_lora(body.lora_config, info))
    request_id = await ctx.submit(
        tenant, body.base_model, "create_model", model_id, args, seq_id=0, ordered=True,
        extra={"type": "CreateModel", "model_id": model_id},
        record={"session_id": body.session_id, "run_dir": ctx.run_dir(model_id), "user_metadata": body.user_metadata})
    return future_reply(request_id, model_id=model_id)


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
        "model_data": {"arch": info.get("arch"), "model_name": base_model, "tokenizer_id": tokenizer_id,
                       "input_modalities": _modalities(info)},
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
    return future_reply(request_id, model_id=body.model_id)


def _checked_data(parsed: dict, info: dict, limits: LimitsConfig, base_model: str) -> list:
    """The batch with its images resolved, once checked against the model and the server's limits."""
    data = resolve_images(parsed["data"], info.get("vision"), ImageLimits.of(limits), model=base_model)
    validate_batch(data, parsed["loss_fn"], parsed["loss_fn_config"], info["vocab_size"],
                   max_datums=limits.max_datums_per_request, max_tokens=limits.max_tokens_per_request,
                   max_context=info["max_context"])
    return data


async def _submit_forward(request: Request, parsed: dict) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    model_id, seq_id = parsed["model_id"], parsed["seq_id"]
    if not model_id:
        raise InvalidInputError("missing model_id", field="model_id")
    base_model = await ctx.model_owner(model_id, tenant)
    info = ctx.info(base_model)
    loss = parsed["loss_fn"]
    if not loss:
        raise InvalidInputError("missing loss_fn; e.g. cross_entropy", field="loss_fn")
    parsed["data"] = await body_work(request, _checked_data, parsed, info, ctx.config.limits, base_model)
    forward_only = parsed["forward_only"]
    args = ForwardArgs(data=parsed["data"], loss=loss, loss_config=parsed["loss_fn_config"])
    request_id = await ctx.submit(tenant, base_model, "forward" if forward_only else "forward_backward", model_id,
                                  args, seq_id=seq_id, ordered=seq_id is not None,
                                  extra={"type": "Forward" if forward_only else "ForwardBackward"})
    return future_reply(request_id, model_id=model_id)


@router.post("/forward_backward")
@frees_seq_on_rejection
async def forward_backward(request: Request) -> dict:
    limits = context(request).config.limits
    if codec.PROTOBUF in request.headers.get("content-type", ""):
        # decompressed once, streaming and capped; the tensors are decoded after the target is known
        message = await body_work(request, codec.decode_forward_backward_proto, await read_body(request),
                                  request.headers.get("content-encoding"), max_bytes=limits.max_body_bytes)
        request.state.target = (message.model_id or None, message.seq_id if message.seq_id >= 0 else None)
        parsed = await body_work(request, codec.forward_backward_from_proto, message,
                                 max_elements=limits.max_tensor_elements)
    else:
        parsed = await body_work(request, codec.parse_forward_backward_json, await read_json(request),
                                 "forward_backward_input", max_elements=limits.max_tensor_elements)
    return await _submit_forward(request, parsed)


@router.post("/forward")
@frees_seq_on_rejection
async def forward(request: Request) -> dict:
    parsed = await body_work(request, codec.parse_forward_backward_json, await read_json(request), "forward_input",
                             max_elements=context(request).config.limits.max_tensor_elements)
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
    return future_reply(request_id, model_id=body.model_id)


async def _submit_save(ctx, tenant: str, base_model: str, body: SaveWeightsBody, name: str, kind: str,
                       reply_type: str) -> dict:
    """A named checkpoint: full training state (weights) or adapter only (sampler_weights)."""
    args = SaveArgs(name=name, with_optimizer=kind == "weights", overwrite=body.overwrite or kind != "weights",
                    kind=kind)
    request_id = await ctx.submit(tenant, base_model, "save", body.model_id, args, seq_id=body.seq_id,
                                  ordered=body.seq_id is not None,
                                  extra={"type": reply_type, "path": tinker_path(body.model_id, kind, name)},
                                  record={"ttl_seconds": body.ttl_seconds, "user_metadata": body.user_metadata})
    return future_reply(request_id, model_id=body.model_id)


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
    session_id = ids.session_of(body.model_id)
    counter = body.sampling_session_seq_id
    if counter is None:
        counter = await ctx.db(ctx.store.next_counter, session_id, "snapshot")
    sampler_id = ids.sampler_id(session_id, counter)
    args = SaveSamplerArgs(sampler_id=sampler_id)
    request_id = await ctx.submit(tenant, base_model, "create_sampler_from_model", body.model_id, args,
                                  seq_id=body.seq_id, ordered=ordered,
                                  extra={"type": "SaveWeightsForSampler", "sampling_session_id": sampler_id},
                                  record={"session_id": session_id})
    return future_reply(request_id, model_id=body.model_id)


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
        model_id = ids.model_id(body.session_id, body.model_seq_id)
        args = FromCheckpointArgs(path=ckpt["folder"], with_optimizer=body.optimizer, base_model=base_model)
        request_id = await ctx.submit(
            tenant, base_model, "create_model_from_checkpoint", model_id, args, seq_id=0, ordered=True,
            extra={"type": "LoadWeights", "path": body.path, "model_id": model_id},
            record={"session_id": body.session_id, "run_dir": ctx.run_dir(model_id),
                    "user_metadata": body.user_metadata})
        return future_reply(request_id, model_id=model_id)
    base_model = await ctx.model_owner(body.model_id, tenant)
    ckpt = await resolve_checkpoint(ctx, body.path, tenant)
    args = LoadArgs(path=ckpt["folder"], with_optimizer=body.optimizer)
    request_id = await ctx.submit(tenant, base_model, "load", body.model_id, args, seq_id=body.seq_id,
                                  ordered=body.seq_id is not None,
                                  extra={"type": "LoadWeights", "path": body.path})
    return future_reply(request_id, model_id=body.model_id)

