"""Helpers shared by the route modules: body parsing, tenant lookup, Tinker paths."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from twinkle.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from twinkle.http.context import ServerContext
from twinkle.http.offload import body_work

T = TypeVar("T", bound=BaseModel)
TINKER_SCHEME = "tinker://"
CHECKPOINT_KINDS = {"weights": "training", "sampler_weights": "sampler"}


class Body(BaseModel):
    """A request body: unknown keys (such as the SDK's `type`) are ignored."""

    model_config = ConfigDict(extra="ignore")


_context: ServerContext | None = None


def install_context(ctx: ServerContext) -> None:
    """Called once per ingress replica (Ray Serve rebuilds the app object in the replica)."""
    global _context
    _context = ctx


def context(request: Request | None = None) -> ServerContext:
    if _context is None:
        raise RuntimeError("the Twinkle ingress is not initialised")
    return _context


async def tenant_of(request: Request) -> str:
    ctx = context(request)
    await ctx.ensure_started()
    return ctx.tenant_for(request.headers)


def body_too_large(size: int | str, limit: int, what: str = "request body") -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} of {size} bytes exceeds this server's limit of {limit} bytes "
                             "(limits.max_body_bytes); send smaller requests", field="body")


async def read_body(request: Request) -> bytes:
    """The raw body, read at most once and never beyond `limits.max_body_bytes` (413 past it)."""
    cached = getattr(request.state, "raw_body", None)
    if cached is not None:
        return cached
    limit = context(request).config.limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    request.state.raw_body = raw
    request._body = raw  # Starlette's own cache: a later request.body() answers the same bytes
    return raw


def check_depth(data, max_depth: int, field: str = "body") -> None:
    """Refuse containers nested deeper than `max_depth` (iteratively: no recursion on hostile input)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise InvalidInputError(f"is nested more than {max_depth} levels deep (limits.max_json_depth)",
                                    field=field)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


async def read_json(request: Request) -> dict:
    """The body as a JSON object, parsed once (cached on `request.state.json_body`)."""
    cached = getattr(request.state, "json_body", None)
    if cached is not None:
        return cached
    raw = await read_body(request)
    data = await body_work(request, _json_object, raw, context(request).config.limits.max_json_depth) if raw else {}
    request.state.json_body = data
    return data


def _json_object(raw: bytes, max_depth: int) -> dict:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"body is not valid JSON: {exc}", field="body") from None
    except RecursionError:
        raise InvalidInputError(f"is nested more than {max_depth} levels deep (limits.max_json_depth)",
                                field="body") from None
    if not isinstance(data, dict):
        raise InvalidInputError("body must be a JSON object", field="body")
    check_depth(data, max_depth)
    return data


def validate_body(model: type[T], data: dict) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInputError(f"{first.get('msg', 'invalid value')} (got {first.get('input')!r})"[:500],
                                field=field) from None


async def parse(request: Request, model: type[T]) -> T:
    return validate_body(model, await read_json(request))


def tinker_path(run_id: str, segment: str, name: str) -> str:
    return f"{TINKER_SCHEME}{run_id}/{segment}/{name}"


def parse_tinker_path(path: str, field: str = "path") -> tuple[str, str]:
    """tinker://<run_id>/<weights|sampler_weights>/<name> -> (run_id, "<segment>/<name>")."""
    if not isinstance(path, str) or not path.startswith(TINKER_SCHEME):
        raise InvalidInputError(f"expected a tinker://<run_id>/weights/<name> path, got {path!r}", field=field)
    parts = path[len(TINKER_SCHEME):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
        raise InvalidInputError(f"expected tinker://<run_id>/weights|sampler_weights/<name>, got {path!r}",
                                field=field)
    return parts[0], f"{parts[1]}/{parts[2]}"


async def resolve_checkpoint(ctx: ServerContext, path: str, tenant: str, field: str = "path") -> dict:
    """The checkpoint record behind a tinker:// path, if the tenant may read it (own or public)."""
    run_id, checkpoint_id = parse_tinker_path(path, field)
    record = await ctx.db(ctx.store.get_checkpoint, run_id, checkpoint_id, tenant)
    if record is None:
        raise NotFoundError(f"no checkpoint {path!r}", field=field)
    model = await ctx.db(ctx.store.get_model, run_id, None)
    record["base_model"] = model["base_model"] if model else None
    record["tinker_path"] = path
    return record
