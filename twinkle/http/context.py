"""What the ingress needs to serve a request: config, store, keys, and the model schedulers.

No model state lives here: futures, sessions and checkpoint records are in the store, training
state in the schedulers' workers. A restarted ingress rebuilds this from the store and by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from twinkle import wire
from twinkle.actors.scheduler import scheduler_name
from twinkle.actors.work import PASS_METHODS, WorkItem, future_kind
from twinkle.api.service import CREATE_MODEL_METHODS
from twinkle.config import ServerConfig
from twinkle.errors import (ConflictError, InvalidInputError, NotFoundError, QuotaExceededError,
                            ServerUnavailableError)
from twinkle.http.auth import KeyRing
from twinkle.http.offload import OFF_LOOP_BYTES, off_loop_if
from twinkle.http.ratelimit import RateLimiter
from twinkle.http.timing import note_span, on_scheduler
from twinkle.layout import run_dir_name
from twinkle.store import Store

log = logging.getLogger(__name__)


class ServerContext:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir).resolve()
        self.store = Store(self.state_dir / "twinkle.db")
        self.keys = KeyRing(config.resolved_keys(), config.resolved_admin_keys())
        self.rate = RateLimiter()
        self.schedulers: dict[str, Any] = {}
        self.model_info: dict[str, dict] = {}
        self._models: dict[str, tuple[str, str]] = {}  # model_id -> (tenant, base_model)
        self._futures: dict[str, tuple[str, str | None, dict]] = {}  # request_id -> (tenant, base, extra)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._janitor: asyncio.Task | None = None

    # -------------------------------------------------------------- startup
    async def ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            import ray

            for model in self.config.models:
                handle = await asyncio.to_thread(ray.get_actor, scheduler_name(model.name),
                                                 namespace=self.config.ray.namespace)
                self.schedulers[model.name] = handle
                self.model_info[model.name] = await handle.info.remote()
            self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())
            self._started = True

    async def db(self, fn, *args, **kwargs):
        """Run a store call off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def scheduler(self, base_model: str):
        handle = self.schedulers.get(base_model)
        if handle is None:
            raise InvalidInputError(f"unknown base model {base_model!r}; this server hosts "
                                    f"{sorted(self.schedulers)}", field="base_model")
        return handle

    def info(self, base_model: str) -> dict:
        self.scheduler(base_model)
        return self.model_info[base_model]

    # ---------------------------------------------------------------- owners
    async def require_session(self, session_id: str, tenant: str) -> dict:
        session = await self.db(self.store.get_session, session_id, tenant)
        if session is None:
            raise NotFoundError(f"no session {session_id!r}", field="session_id")
        return session

    async def model_owner(self, model_id: str, tenant: str) -> str:
        """The base model of a training model that belongs to `tenant` (404 otherwise)."""
        cached = self._models.get(model_id)
        if cached is not None:
            if cached[0] != tenant:
                raise NotFoundError(f"no model {model_id!r}", field="model_id")
            return cached[1]
        row = await self.db(self.store.get_model, model_id, tenant)
        if row is None or row["status"] == "unloaded":
            raise NotFoundError(f"no model {model_id!r}", field="model_id")
        self._models[model_id] = (tenant, row["base_model"])
        return row["base_model"]

    def forget_model(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    @staticmethod
    def run_dir(model_id: str) -> str:
        return run_dir_name(model_id)

    def tenant_for(self, headers) -> str:
        """The request's tenant, admitted under its requests-per-second quota."""
        tenant = self.keys.tenant_for(headers)
        self.rate.admit(tenant, self.config.quotas.of(tenant).max_requests_per_s)
        return tenant

    # --------------------------------------------------------------- futures
    async def submit(self, tenant: str, base_model: str, method: str, target_id: str | None, args, *,
                     seq_id: int | None = None, ordered: bool = False, extra: dict | None = None,
                     record: dict | None = None, idempotency_key: str | None = None) -> str:
        """Create (or find, for a retry) the durable future of a request and queue it."""
        scheduler = self.scheduler(base_model)
        await self._check_quota(tenant, method, args)
        kind = future_kind(method, ordered)
        extra = dict(extra or {})
        if seq_id is not None or idempotency_key:  # what tells a retry from a different request under its id
            extra["digest"] = await off_loop_if(_large_args(args), _digest_of, method, args)
        record_, _created = await self.db(
            self.store.create_future, uuid.uuid4().hex, tenant, kind=kind, target_id=target_id, seq_id=seq_id,
            base_model=base_model, extra=extra, idempotency_key=idempotency_key)
        request_id = record_.request_id
        if not _created and record_.extra.get("digest", extra.get("digest")) != extra.get("digest"):
            raise ConflictError(f"seq_id {seq_id} of {target_id} was already used by a different "
                                f"{_request_kind(record_.extra)} request; a retry must repeat that request exactly, "
                                "and a new request takes the next seq_id", field="seq_id")
        self._futures[request_id] = (tenant, base_model, record_.extra)
        if record_.status == "pending":  # re-submitting a retry is harmless: the scheduler dedupes
            item = WorkItem(request_id, tenant, method, target_id, args, seq_id=seq_id, ordered=ordered,
                            record=record or {})
            rejected = await on_scheduler(scheduler.submit.remote(item))
            if rejected is not None:  # over a quota: nothing was queued, and a retry starts afresh
                await self.db(self.store.delete_future, request_id)
                self._futures.pop(request_id, None)
                raise _error_from(rejected)
        return request_id

    async def _check_quota(self, tenant: str, method: str, args) -> None:
        """Refuse (429, naming the limit) what would take a tenant beyond its quota; the scheduler
        checks queued requests, the service keeps its share of resident adapters."""
        quota = self.config.quotas.of(tenant)
        if method in PASS_METHODS:
            tokens = sum(len(d.input_tokens) for d in args.data)
            if tokens > quota.max_tokens_per_request:
                raise QuotaExceededError(f"{tokens} tokens in one request exceed your limit of "
                                         f"{quota.max_tokens_per_request} per request on this server; split the "
                                         "batch into smaller requests", field="data")
        elif method == "save" or (method == "create_sampler_from_model" and args.name is not None):
            count, used = await self.db(self.store.checkpoint_usage, tenant)
            if count >= quota.max_checkpoints or used >= quota.max_checkpoint_bytes:
                raise QuotaExceededError(f"your checkpoints ({count}, {used / 2**20:.1f} MiB) reached this server's "
                                         f"limit of {quota.max_checkpoints} checkpoints or "
                                         f"{quota.max_checkpoint_bytes / 2**20:.0f} MiB per tenant; delete checkpoints "
                                         "you no longer need", field="quota")
        elif method in CREATE_MODEL_METHODS:
            live = await self.db(self.store.live_model_count, tenant)
            if live >= quota.max_models:
                raise QuotaExceededError(f"you hold {live} training models in active sessions, this server's limit "
                                         f"of {quota.max_models} per tenant; unload models or end sessions you no "
                                         "longer use", field="quota")

    async def call(self, tenant: str, base_model: str, method: str, target_id: str | None, args, *,
                   record: dict | None = None) -> Any:
        """Run a request through the model's queue and wait for its result (direct replies)."""
        item = WorkItem(uuid.uuid4().hex, tenant, method, target_id, args, record=record or {})
        status, payload = await on_scheduler(self.scheduler(base_model).call.remote(item))
        if status == "failed":
            raise _error_from(payload)
        return payload

    async def skip(self, base_model: str, target_id: str, seq_id: int | None) -> None:
        """A request was rejected before queueing: let later seq_ids of the model proceed."""
        if seq_id is not None and base_model in self.schedulers:
            await self.schedulers[base_model].skip.remote(target_id, seq_id)

    async def wait_future(self, request_id: str, tenant: str, timeout: float) -> tuple[str, Any, dict]:
        """(status, payload, extra): status is done, failed or pending."""
        cached = self._futures.get(request_id)
        if cached is None or cached[0] != tenant:
            record = await self.db(self.store.get_future, request_id, tenant)
            if record is None:
                raise NotFoundError(f"no future {request_id!r}", field="request_id")
            if record.status == "done":
                return "done", wire.loads(record.result), record.extra
            if record.status == "failed":
                return "failed", record.error, record.extra
            cached = (record.tenant, record.base_model, record.extra)
            self._futures[request_id] = cached
        _, base_model, extra = cached
        try:
            outcome, span = await on_scheduler(self.scheduler(base_model).wait.remote(request_id, timeout, timed=True))
        except Exception as exc:  # the scheduler actor is gone
            raise ServerUnavailableError(f"the {base_model} scheduler is unavailable: {type(exc).__name__}") from None
        if outcome is not None:
            note_span(span)
        if outcome is None:
            return "pending", None, extra
        status, payload = outcome
        if status == "unknown":
            record = await self.db(self.store.get_future, request_id, tenant)
            if record is not None and record.status == "done":
                return "done", wire.loads(record.result), record.extra
            if record is not None and record.status == "failed":
                return "failed", record.error, record.extra
            error = {"error": "the server restarted and lost this request before it ran; submit it again",
                     "category": "server"}
            await self.db(self.store.fail_future, request_id, error)
            return "failed", error, extra
        return status, payload, extra

    # ---------------------------------------------------------------- janitor
    async def _janitor_loop(self) -> None:
        """Expire silent sessions, drop old results and expired checkpoints."""
        timeouts = self.config.timeouts
        while True:
            await asyncio.sleep(timeouts.sweep_interval_s)
            try:
                now = time.time()
                for session in await self.db(self.store.stale_sessions, now - timeouts.session_timeout_s):
                    await self.end_session(session["session_id"], "expired")
                await self.db(self.store.purge_futures, now - timeouts.result_ttl_s)
                for ckpt in await self.db(self.store.expired_checkpoints, now):
                    await self.db(self.store.delete_checkpoint, ckpt["run_id"], ckpt["checkpoint_id"], ckpt["tenant"])
                    await asyncio.to_thread(_remove_tree, ckpt["folder"])
                if len(self._futures) > 200_000:
                    self._futures.clear()
            except Exception:
                log.exception("janitor sweep failed")

    async def end_session(self, session_id: str, status: str) -> None:
        """Mark a session ended and offload its models (they come back if used again)."""
        await self.db(self.store.set_session_status, session_id, status)
        by_model: dict[str, list[str]] = {}
        for model in await self.db(self.store.models_of_session, session_id):
            if model["status"] == "active":
                by_model.setdefault(model["base_model"], []).append(model["model_id"])
        for base_model, model_ids in by_model.items():
            if base_model in self.schedulers:
                await self.schedulers[base_model].end_session.remote(model_ids)


def _large_args(args) -> bool:
    """Whether hashing `args` is worth a thread: a big batch (~12 bytes a token) or one with images."""
    data = getattr(args, "data", None) or ()
    return sum(len(d.input_tokens) for d in data) * 12 > OFF_LOOP_BYTES or any(d.images for d in data)


def _digest_of(method: str, args) -> str:
    """A fingerprint of a request (its method and arguments), the same for every retry of it."""
    import hashlib

    payload = args.model_dump() if hasattr(args, "model_dump") else args
    return hashlib.sha256(method.encode() + b"\0" + wire.dumps(payload)).hexdigest()[:32]


def _request_kind(extra: dict) -> str:
    """What a future was for (the Tinker reply type, or the native method), to tell a retry from a clash."""
    return str(extra.get("method") or extra.get("type") or "unknown")


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _error_from(payload: dict):
    from twinkle.errors import error_from_dict

    return error_from_dict(payload, payload.get("status_code"))
