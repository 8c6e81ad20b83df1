"""HTTP routes of Twinkle's own API, generated from `api.spec.API_METHODS`.

`POST /api/v1/twinkle/<method>` with a msgpack body {target_id, seq_id, args[, wait]} answers
{request_id} (with `wait` seconds, also the outcome if it is ready by then, as `retrieve` gives it);
`POST /api/v1/twinkle/retrieve` long-polls a result. Binary msgpack keeps tensors as raw bytes.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from twinkle import wire
from twinkle.api.spec import API_METHODS
from twinkle.errors import InvalidInputError
from twinkle.http.common import check_depth, context, read_body, tenant_of
from twinkle.http.offload import body_work
from twinkle.http.native import NativeAPI

router = APIRouter(prefix="/api/v1/twinkle")


def native(request: Request) -> NativeAPI:
    return NativeAPI(context(request))


async def read_msgpack(request: Request) -> dict:
    """The body as a msgpack map: at most `limits.max_body_bytes` (413), nested at most `max_json_depth`."""
    raw = await read_body(request)
    return await body_work(request, _msgpack_map, raw, context(request).config.limits.max_json_depth)


def _msgpack_map(raw: bytes, max_depth: int) -> dict:
    try:
        body = wire.loads(raw) if raw else {}
    except Exception:
        raise InvalidInputError("body is not valid msgpack (or nests too deeply)", field="body") from None
    if not isinstance(body, dict):
        raise InvalidInputError("body must be a msgpack map", field="body")
    check_depth(body, max_depth)
    return body


def msgpack_response(payload) -> Response:
    return Response(wire.dumps(payload), media_type=wire.CONTENT_TYPE)


def _route(method: str):
    async def handler(request: Request) -> Response:
        tenant = await tenant_of(request)
        body = await read_msgpack(request)
        reply = await native(request).submit(tenant, method, body.get("target_id"), body.get("seq_id"),
                                             body.get("args") or {}, wait=body.get("wait"))
        return msgpack_response(reply)

    # real classes, not strings: Ray Serve pickles this closure by value, without the module's globals
    handler.__annotations__ = {"request": Request, "return": Response}
    handler.__name__ = f"twinkle_{method}"
    handler.__doc__ = API_METHODS[method].doc
    return handler


for _method in API_METHODS:
    router.add_api_route(f"/{_method}", _route(_method), methods=["POST"], name=f"twinkle.{_method}")


@router.post("/retrieve")
async def retrieve(request: Request) -> Response:
    tenant = await tenant_of(request)
    body = await read_msgpack(request)
    if not isinstance(body.get("request_id"), str):
        raise InvalidInputError("missing request_id", field="request_id")
    return msgpack_response(await native(request).retrieve(tenant, body["request_id"], body.get("timeout")))


@router.post("/session")
async def create_session(request: Request) -> Response:
    tenant = await tenant_of(request)
    body = await read_msgpack(request)
    return msgpack_response(await native(request).create_session(tenant, body.get("metadata")))


@router.post("/session/{session_id}/heartbeat")
async def heartbeat(session_id: str, request: Request) -> Response:
    tenant = await tenant_of(request)
    return msgpack_response(await native(request).heartbeat(tenant, session_id))


@router.post("/session/{session_id}/finish")
async def finish(session_id: str, request: Request) -> Response:
    tenant = await tenant_of(request)
    return msgpack_response(await native(request).finish(tenant, session_id))
