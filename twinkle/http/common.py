"""Helpers shared by the route modules: body parsing, tenant lookup, Tinker paths."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from twinkle.errors import InvalidInputError, NotFoundError
from twinkle.http.context import ServerContext

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
    return ctx.keys.tenant_for(request.headers)


async def read_json(request: Request) -> dict:
    raw = await request.body()
    limit = context(request).config.limits.max_body_bytes
    if len(raw) > limit:
        raise InvalidInputError(f"request body of {len(raw)} bytes exceeds the limit of {limit}", field="body")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInputError("body must be a JSON object", field="body")
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
