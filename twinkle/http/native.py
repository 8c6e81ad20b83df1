"""Twinkle's own API served remotely: one handler for every method of `api.spec.API_METHODS`.

Used by the HTTP routes (`/api/v1/twinkle/<method>`) and by Ray-client callers through the ingress
deployment's handle, so both transports share the same checks, ids and exactly-once rules as the
Tinker routes. Checkpoint paths cross the boundary as `tinker://<run>/<kind>/<name>`; folders on the
server never leave it.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from twinkle import ids
from twinkle.api.spec import API_METHODS, SampleArgs
from twinkle.errors import InvalidInputError, NotFoundError, PermissionDeniedError, TwinkleError
from twinkle.http.common import resolve_checkpoint, tinker_path
from twinkle.http.context import ServerContext
from twinkle.paths import check_name
from twinkle.types import Datum
from twinkle.validation import check_seq_id, validate_batch, validate_sampling
from twinkle.vision import ImageLimits, resolve_images, vision_refusal


class NativeAPI:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------- sessions
    async def create_session(self, tenant: str, metadata: dict | None = None) -> dict:
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInputError(f"must be a map, got {type(metadata).__name__}", field="metadata")
        session_id = str(uuid.uuid4())
        await self.ctx.db(self.ctx.store.create_session, session_id, tenant, user_metadata=metadata,
                          sdk_version="twinkle")
        return {"session_id": session_id}

    async def heartbeat(self, tenant: str, session_id: str) -> dict:
        status = await self.ctx.db(self.ctx.store.heartbeat, session_id, tenant)  # an expired session comes back
        if status is None:
            raise NotFoundError(f"no session {session_id!r}", field="session_id")
        return {"status": "active" if status == "expired" else status}

    async def finish(self, tenant: str, session_id: str) -> dict:
        await self.ctx.require_session(session_id, tenant)
        await self.ctx.end_session(session_id, "finished")
        return {}

    # ---------------------------------------------------------------- calls
    async def submit(self, tenant: str, method: str, target_id: str | None, seq_id: int | None,
                     raw_args: dict, wait: float | None = None) -> dict:
        """Validate, translate paths, queue; returns {"request_id"}. Rejections free the seq_id.

        With `wait` (seconds), also waits up to that long for the outcome and adds what `retrieve`
        answers, so a call that finishes in time costs one round trip instead of two.
        """
        reply = await self._validated_submit(tenant, method, target_id, seq_id, raw_args, wait)
        if wait:
            reply.update(await self.retrieve(tenant, reply["request_id"], float(wait)))
        return reply

    async def _validated_submit(self, tenant: str, method: str, target_id: str | None, seq_id: int | None,
                                raw_args: dict, wait: Any = None) -> dict:
        spec = API_METHODS.get(method)
        if spec is None:
            raise NotFoundError(f"unknown API method {method!r}; known: {sorted(API_METHODS)}"[:300], field="method")
        if not isinstance(target_id, str) or not target_id:
            raise InvalidInputError("missing target id", field="target_id")
        seq_id = check_seq_id(seq_id)  # before anything: an invalid seq_id has nothing to free
        if raw_args is not None and not isinstance(raw_args, dict):
            raise InvalidInputError(f"must be a map of the method's arguments, got {type(raw_args).__name__}",
                                    field="args")
        base_model = None
        if spec.target == "model" and method not in ("create_model", "create_model_from_checkpoint"):
            base_model = await self.ctx.model_owner(target_id, tenant)
        try:
            if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                                     or not math.isfinite(wait) or wait < 0):
                raise InvalidInputError(f"must be a number of seconds >= 0, got {wait!r}", field="wait")
            args = spec.args.model_validate(raw_args or {})
            return await self._submit(tenant, spec, target_id, seq_id, args, base_model)
        except Exception as exc:
            if base_model is not None:
                await self.ctx.skip(base_model, target_id, seq_id)
            if isinstance(exc, TwinkleError):
                raise
            if hasattr(exc, "errors"):  # pydantic
                first = exc.errors()[0]
                raise InvalidInputError(first.get("msg", "invalid value"),
                                        field=".".join(str(p) for p in first.get("loc", ())) or "args") from None
            raise

    async def _own_new_id(self, tenant: str, target_id: str, kind: str) -> str:
        """A new model or sampler id must be <session_id><sep><n> of one of the tenant's sessions."""
        session_id = ids.session_of(target_id, kind)
        if session_id is None:
            raise InvalidInputError(f"{kind} ids look like <session_id>{ids.SEPARATORS[kind]}<n>", field="target_id")
        await self.ctx.require_session(session_id, tenant)
        return session_id

    async def _submit(self, tenant, spec, target_id, seq_id, args, base_model) -> dict:
        ctx, method = self.ctx, spec.name
        extra: dict[str, Any] = {"type": "native", "method": method}
        record: dict[str, Any] = {}
        ordered = spec.target == "model"
        if method in ("create_model", "create_model_from_checkpoint"):
            session_id = await self._own_new_id(tenant, target_id, "model")
            if method == "create_model_from_checkpoint":
                ckpt = await resolve_checkpoint(ctx, args.path, tenant)
                args = args.model_copy(update={"path": ckpt["folder"],
                                               "base_model": args.base_model or ckpt["base_model"]})
            base_model = args.base_model
            info = ctx.info(base_model)
            if method == "create_model" and args.lora.rank > info["max_lora_rank"]:
                raise InvalidInputError(f"rank {args.lora.rank} exceeds this model's maximum LoRA rank "
                                        f"{info['max_lora_rank']}", field="lora.rank")
            if method == "create_model" and args.lora.train_vision and not info.get("vision"):
                raise InvalidInputError(vision_refusal(base_model), field="lora.train_vision")
            seq_id = 0
            record = {"session_id": session_id, "run_dir": ctx.run_dir(target_id)}
        elif method == "create_sampler":
            session_id = await self._own_new_id(tenant, target_id, "sampler")
            if args.model_path:
                ckpt = await resolve_checkpoint(ctx, args.model_path, tenant, field="model_path")
                extra["tinker_path"] = args.model_path
                args = args.model_copy(update={"model_path": ckpt["folder"],
                                               "base_model": args.base_model or ckpt["base_model"]})
            if not args.base_model:
                raise InvalidInputError("give base_model or model_path", field="base_model")
            base_model = args.base_model
            ctx.info(base_model)
            record = {"session_id": session_id, "tinker_path": extra.get("tinker_path")}
        elif method == "sample":
            row = await ctx.db(ctx.store.get_sampler, target_id, tenant)
            if row is None:
                raise NotFoundError(f"no sampler {target_id!r}", field="sampler_id")
            base_model = row["base_model"]
            info = ctx.info(base_model)
            args = await self._with_images(args, info, base_model)
            validate_sampling(args.prompt_tokens, args.params, args.num_samples, info["vocab_size"],
                              info["max_context"], topk_prompt_logprobs=args.topk_prompt_logprobs,
                              topk_sample_logprobs=args.topk_sample_logprobs,
                              target_prompt_logprobs=args.target_prompt_logprobs,
                              prompt_alt_tokens_k=args.prompt_alt_tokens_k,
                              max_samples=ctx.config.limits.max_samples_per_request)
        elif method in ("forward", "forward_backward"):
            args = await self._with_images(args, ctx.info(base_model), base_model)
            if args.custom_loss is not None and not ctx.config.trust_remote_code:
                raise PermissionDeniedError(
                    "this server does not run client code; an operator can enable custom losses with "
                    "`trust_remote_code: true` in the server config", field="custom_loss")
            if args.custom_loss is None and args.loss is not None:
                limits = ctx.config.limits
                info = ctx.info(base_model)
                validate_batch(args.data, args.loss, args.loss_config, info["vocab_size"],
                               max_datums=limits.max_datums_per_request, max_tokens=limits.max_tokens_per_request,
                               max_context=info["max_context"])
        elif method == "save":
            check_name(args.name, "name")
            extra["tinker_path"] = tinker_path(target_id, args.kind, args.name)
        elif method == "load":
            ckpt = await resolve_checkpoint(ctx, args.path, tenant)
            args = args.model_copy(update={"path": ckpt["folder"]})
        elif method == "create_sampler_from_model":
            session_id = ids.session_of(target_id)
            if args.sampler_id is None:
                raise InvalidInputError("missing sampler_id", field="sampler_id")
            await self._own_new_id(tenant, args.sampler_id, "sampler")
            if args.name is not None:
                check_name(args.name, "name")
                extra["tinker_path"] = tinker_path(target_id, "sampler_weights", args.name)
            record = {"session_id": session_id, "tinker_path": extra.get("tinker_path")}
        if method == "close_model":
            ctx.forget_model(target_id)
        request_id = await ctx.submit(tenant, base_model, method, target_id, args, seq_id=seq_id,
                                      ordered=ordered, extra=extra, record=record)
        return {"request_id": request_id}

    async def _with_images(self, args, info: dict, base_model: str):
        """Datums (or a sample prompt) whose images are checked as the Tinker routes check them: the
        server's limits, a text-only model, each image's token count and placeholder run (the header
        reads run in a thread)."""
        limits = ImageLimits.of(self.ctx.config.limits)
        facts = info.get("vision")
        if isinstance(args, SampleArgs):
            if not args.images and facts is None:
                return args
            prompt = Datum(input_tokens=args.prompt_tokens, images=args.images)
            [prompt] = await asyncio.to_thread(resolve_images, [prompt], facts, limits, model=base_model,
                                               where="prompt")
            return args.model_copy(update={"prompt_tokens": prompt.input_tokens, "images": prompt.images})
        if not any(datum.images for datum in args.data) and facts is None:
            return args
        for i, datum in enumerate(args.data):
            for k, image in enumerate(datum.images):
                if not image.tokens:
                    raise InvalidInputError(
                        "the image's token count is 0: count it with the model's image processor so the loss "
                        "inputs line up (twinkle.chat.supervised_datum does, with image_processor=)",
                        field=f"data[{i}].images[{k}]")
        data = await asyncio.to_thread(resolve_images, args.data, facts, limits, model=base_model, datum_field=None)
        return args.model_copy(update={"data": data})

    async def retrieve(self, tenant: str, request_id: str, timeout: float | None = None) -> dict:
        """{"status": "pending"} | {"status": "done", "result": ...} | {"status": "failed", "error": {...}}."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout < 0):
            raise InvalidInputError(f"must be a number of seconds >= 0, got {timeout!r}"[:200], field="timeout")
        timeout = min(timeout or self.ctx.config.timeouts.long_poll_s, self.ctx.config.timeouts.long_poll_s)
        status, payload, extra = await self.ctx.wait_future(request_id, tenant, timeout)
        if status == "pending":
            return {"status": "pending"}
        if status == "failed":
            return {"status": "failed", "error": payload}
        return {"status": "done", "result": _public_result(payload, extra)}


def _public_result(payload: Any, extra: dict) -> Any:
    """Replace server folders in results with the tinker:// paths clients use."""
    method = extra.get("method")
    if method == "save" and isinstance(payload, dict):
        payload = {**payload, "path": extra["tinker_path"]}
    elif method in ("create_sampler", "create_sampler_from_model") and isinstance(payload, dict):
        payload = {**payload, "model_path": extra.get("tinker_path")}
    return payload
