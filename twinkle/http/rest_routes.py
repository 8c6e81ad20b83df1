"""Tinker's REST routes: training runs and their checkpoints (list, delete, publish, TTL, copy)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Request

from twinkle import ids, wire
from twinkle.layout import tenant_dir
from twinkle.checkpoint import atomic_folder
from twinkle.errors import ConflictError, InvalidInputError, NotFoundError, UnprocessableError
from twinkle.http.common import Body, context, parse, resolve_checkpoint, tenant_of, tinker_path
from twinkle.paths import safe_join

router = APIRouter(prefix="/api/v1")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _str_metadata(metadata) -> dict[str, str] | None:
    return None if not metadata else {str(k): str(v) for k, v in dict(metadata).items()}


def checkpoint_json(row: dict) -> dict:
    segment, name = row["checkpoint_id"].split("/", 1)
    return {
        "checkpoint_id": row["checkpoint_id"],
        "checkpoint_type": row["kind"],
        "time": _iso(row["created_at"]),
        "tinker_path": tinker_path(row["run_id"], segment, name),
        "size_bytes": row["size_bytes"],
        "public": bool(row["public"]),
        "user_metadata": _str_metadata(row["user_metadata"]),
        "expires_at": _iso(row["expires_at"]),
    }


async def _training_run(ctx, model: dict) -> dict:
    last = await ctx.db(ctx.store.last_checkpoints, model["model_id"])
    return {
        "training_run_id": model["model_id"],
        "base_model": model["base_model"],
        "model_owner": model["tenant"],
        "is_lora": True,
        "corrupted": model["status"] == "lost",  # its worker died with it and nothing was saved
        "lora_rank": model["lora"].get("rank"),
        "last_request_time": _iso(model["last_request_at"]),
        "last_checkpoint": checkpoint_json(last["training"]) if "training" in last else None,
        "last_sampler_checkpoint": checkpoint_json(last["sampler"]) if "sampler" in last else None,
        "user_metadata": _str_metadata(model["user_metadata"]),
    }


async def _own_model(ctx, run_id: str, tenant: str) -> dict:
    model = await ctx.db(ctx.store.get_model, run_id, tenant)
    if model is None:
        raise NotFoundError(f"no training run {run_id!r}", field="training_run_id")
    return model


@router.get("/training_runs")
async def list_training_runs(request: Request, limit: int = 20, offset: int = 0) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    models, total = await ctx.db(ctx.store.list_models, tenant, limit, offset)
    runs = [await _training_run(ctx, m) for m in models]
    return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    return await _training_run(ctx, await _own_model(ctx, run_id, tenant))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_run_checkpoints(run_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    await _own_model(ctx, run_id, tenant)
    rows, total = await ctx.db(ctx.store.list_checkpoints, tenant, run_id)
    return {"checkpoints": [checkpoint_json(r) for r in rows],
            "cursor": {"offset": 0, "limit": len(rows), "total_count": total}}


@router.get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    rows, total = await ctx.db(ctx.store.list_checkpoints, tenant, None, limit, offset)
    return {"checkpoints": [checkpoint_json(r) for r in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


async def _own_checkpoint(ctx, run_id: str, checkpoint_id: str, tenant: str) -> dict:
    row = await ctx.db(ctx.store.get_checkpoint, run_id, checkpoint_id, tenant)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"no checkpoint {checkpoint_id!r} in run {run_id!r}", field="checkpoint_id")
    return row


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    if checkpoint_id.endswith("/publish"):
        await _own_checkpoint(ctx, run_id, checkpoint_id[: -len("/publish")], tenant)
        await ctx.db(ctx.store.update_checkpoint, run_id, checkpoint_id[: -len("/publish")], tenant, public=0)
        return {}
    row = await ctx.db(ctx.store.delete_checkpoint, run_id, checkpoint_id, tenant)
    if row is None:
        raise NotFoundError(f"no checkpoint {checkpoint_id!r} in run {run_id!r}", field="checkpoint_id")
    await asyncio.to_thread(shutil.rmtree, row["folder"], True)
    return {}


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def publish_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    if not checkpoint_id.endswith("/publish"):
        raise NotFoundError(f"unknown route for checkpoint {checkpoint_id!r}", field="path")
    checkpoint_id = checkpoint_id[: -len("/publish")]
    await _own_checkpoint(ctx, run_id, checkpoint_id, tenant)
    await ctx.db(ctx.store.update_checkpoint, run_id, checkpoint_id, tenant, public=1)
    return {}


class TtlBody(Body):
    ttl_seconds: int | None = None


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def set_checkpoint_ttl(run_id: str, checkpoint_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    if not checkpoint_id.endswith("/ttl"):
        raise NotFoundError(f"unknown route for checkpoint {checkpoint_id!r}", field="path")
    checkpoint_id = checkpoint_id[: -len("/ttl")]
    body = await parse(request, TtlBody)
    await _own_checkpoint(ctx, run_id, checkpoint_id, tenant)
    expires = time.time() + body.ttl_seconds if body.ttl_seconds else None
    await ctx.db(ctx.store.update_checkpoint, run_id, checkpoint_id, tenant, expires_at=expires)
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def checkpoint_subroute(run_id: str, checkpoint_id: str, request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    if checkpoint_id.endswith("/external_weights_urls"):
        await _own_checkpoint(ctx, run_id, checkpoint_id[: -len("/external_weights_urls")], tenant)
        raise UnprocessableError("this server keeps checkpoints on its own disk and has no download URLs; "
                                 "the folder is a standard PEFT adapter on the server", field="checkpoint_id")
    return checkpoint_json(await _own_checkpoint(ctx, run_id, checkpoint_id, tenant))


class WeightsInfoBody(Body):
    tinker_path: str


@router.post("/weights_info")
async def weights_info(request: Request) -> dict:
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, WeightsInfoBody)
    ckpt = await resolve_checkpoint(ctx, body.tinker_path, tenant, field="tinker_path")
    model = await ctx.db(ctx.store.get_model, ckpt["run_id"], None)
    lora = model["lora"] if model else {}
    return {"base_model": ckpt["base_model"], "is_lora": True, "optimizer_config": {"type": "adamw"},
            "lora_rank": lora.get("rank"), "train_unembed": lora.get("train_unembed"),
            "train_mlp": lora.get("train_mlp"), "train_attn": lora.get("train_attn")}


class CopyWeightsBody(Body):
    source_path: str
    destination_project_id: str | None = None  # accepted; this server has no projects
    session_id: str | None = None
    model_seq_id: int | None = None
    ttl_seconds: int | None = None


MAX_TTL_S = 10 * 365 * 24 * 3600


@router.post("/copy_weights")
async def copy_weights(request: Request) -> dict:
    """A checkpoint (own or public) copied into a new training run of the caller that cannot be
    trained on; files are hard links where the disk allows, so no bytes are duplicated."""
    tenant = await tenant_of(request)
    ctx = context(request)
    body = await parse(request, CopyWeightsBody)
    if body.ttl_seconds is not None and not 3600 <= body.ttl_seconds <= MAX_TTL_S:
        raise InvalidInputError("must be between 3600 (1 hour) and 10 years in seconds, or null",
                                field="ttl_seconds")
    source = await resolve_checkpoint(ctx, body.source_path, tenant, field="source_path")
    if body.session_id is not None:
        if body.model_seq_id is None:
            raise InvalidInputError("give model_seq_id with session_id", field="model_seq_id")
        await ctx.require_session(body.session_id, tenant)
        run_id = ids.model_id(body.session_id, body.model_seq_id)
        if await ctx.db(ctx.store.get_model, run_id, None) is not None:
            raise ConflictError(f"training run slot {run_id!r} is already used; pick another model_seq_id",
                                field="model_seq_id")
    else:
        run_id = f"copy-{uuid.uuid4().hex}"
    record, created = await ctx.db(ctx.store.create_future, uuid.uuid4().hex, tenant, kind="copy_weights",
                                   idempotency_key=request.headers.get("x-idempotency-key"))
    if not created and record.status == "done":  # a retry of a copy that already happened
        return wire.loads(record.result)
    segment, name = source["checkpoint_id"].split("/", 1)
    target = safe_join(ctx.state_dir / "checkpoints", tenant_dir(tenant), ctx.run_dir(run_id), segment, name)
    await asyncio.to_thread(_link_tree, source["folder"], target)
    source_model = await ctx.db(ctx.store.get_model, source["run_id"], None) or {}
    await ctx.db(ctx.store.create_model, run_id, tenant, session_id=body.session_id,
                 base_model=source["base_model"], lora=source_model.get("lora") or {}, run_dir=ctx.run_dir(run_id),
                 user_metadata={"copied_from": body.source_path})
    await ctx.db(ctx.store.set_model_status, run_id, "unloaded")  # a copy holds weights, not a live model
    await ctx.db(ctx.store.add_checkpoint, run_id, source["checkpoint_id"], tenant, kind=source["kind"],
                 folder=str(target), size_bytes=source["size_bytes"], ttl_seconds=body.ttl_seconds)
    reply = {"tinker_path": tinker_path(run_id, segment, name)}
    await ctx.db(ctx.store.complete_future, record.request_id, wire.dumps(reply))
    return reply


def _link_tree(source: str, target) -> None:
    """Hard-link every file of a checkpoint folder into `target` (copy where links fail)."""
    src = Path(source)
    with atomic_folder(target) as tmp:
        for path in src.rglob("*"):
            dest = tmp / path.relative_to(src)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)
