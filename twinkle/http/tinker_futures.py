"""Tinker futures: the reply a submitted request gets at once, and `retrieve_future`, which long-polls
for its outcome and renders it in the shape the SDK expects for that request type.

Forward/forward_backward and sample results are protobuf for SDK >= 0.25 and JSON for older SDKs;
everything else is JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from twinkle.http import tinker_codec as codec
from twinkle.http.common import context, parse, tenant_of
from twinkle.http.tinker_bodies import RetrieveBody

router = APIRouter(prefix="/api/v1")


def future_reply(request_id: str, **extra) -> dict:
    """The immediate answer to a submitted request: its future id and any ids the SDK reads from it."""
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}


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
