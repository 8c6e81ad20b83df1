"""The per-base-model scheduler: a Ray actor that owns one model's workers and the order of work.

Requests of a training model run in `seq_id` order (clients may send them out of order, e.g. the
Tinker SDK sends a batch's first chunk last); a seq_id that never arrives is skipped after a grace
period. Work runs one item at a time on a dedicated thread through `ModelService`, the same code
as local mode, while the actor's event loop keeps accepting and queueing new requests, so the next
request starts the moment the worker is free. Finished results wake waiting long polls at once
(push, never poll) and are written to the store, so they survive a restart of the HTTP layer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import shutil
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinkle import wire
from twinkle.api.service import SNAPSHOT_PREFIX
from twinkle.checkpoint import folder_size
from twinkle.config import ModelConfig, TimeoutsConfig
from twinkle.errors import TwinkleError
from twinkle.paths import safe_join
from twinkle.store import Store
from twinkle.tiny import BUILTIN_MODELS
from twinkle.tiny.build import publish_to_hub_cache

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    """One request for the scheduler. `ordered` items of a target run in seq_id order."""

    request_id: str
    tenant: str
    method: str
    target_id: str | None
    args: Any
    seq_id: int | None = None
    ordered: bool = False
    record: dict = field(default_factory=dict)  # bookkeeping written to the store on success


@dataclass
class _TargetQueue:
    next_seq: int = 0
    buffer: dict[int, WorkItem] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    waiting_since: float | None = None


def tenant_dir(tenant: str) -> str:
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:16]


def run_dir_name(model_id: str) -> str:
    return "run-" + hashlib.sha256(model_id.encode()).hexdigest()[:20]


class ModelScheduler:
    """Ray actor (async). Create with `spawn_scheduler`; look up with `scheduler_name`."""

    def __init__(self, model: dict, state_dir: str, timeouts: dict, trust_remote_code: bool = False) -> None:
        logging.basicConfig(level=logging.INFO)
        self.model = ModelConfig.model_validate(model)
        self.timeouts = TimeoutsConfig.model_validate(timeouts)
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir / "twinkle.db")
        self.trust_remote_code = trust_remote_code
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheduler")
        self._service = None
        self._group = None
        self._queues: dict[str, _TargetQueue] = {}
        self._ready: asyncio.Queue | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._results: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._paths: dict[str, tuple[str, str]] = {}  # model_id -> (tenant, run_dir)
        self._last_used: dict[str, float] = {}
        self._last_activity = time.time()
        self._busy = False
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._known: OrderedDict[str, None] = OrderedDict()  # request ids accepted (dedupe)
        self._published = False
        self._timings: dict[str, deque] = {}  # recent execution times per method, for stats()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> dict:
        """Start the loops (and the workers if `preload`); returns the model's engine info."""
        if not self._started:
            self._started = True
            self._ready = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run_loop()), loop.create_task(self._sweep_loop())]
            await loop.run_in_executor(self._pool, self._make_service)
        if self.model.preload:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._ensure_engine)
        return await self.info()

    async def info(self) -> dict:
        info = dict(self._service.engine_info) if self._service and self._service.engine_info else {}
        if not info:
            info = await asyncio.get_running_loop().run_in_executor(self._pool, self._static_info)
        info.update(name=self.model.name, running=self._group is not None)
        if not self._published and self.model.source in BUILTIN_MODELS:
            self._published = True  # clients on this machine find the tokenizer by model name
            await asyncio.get_running_loop().run_in_executor(None, publish_to_hub_cache, self.model.source,
                                                             info["model_path"])
        return info

    def _static_info(self) -> dict:
        """Model facts without starting workers (config + tokenizer only)."""
        from transformers import AutoConfig

        from twinkle.modeling import resolve_model_path

        path = resolve_model_path(self.model.source, str(self.state_dir))
        cfg = AutoConfig.from_pretrained(path)
        return {"base_model": self.model.source, "model_path": path, "vocab_size": int(cfg.vocab_size),
                "max_context": int(self.model.max_context_length or getattr(cfg, "max_position_embeddings", 2048)),
                "arch": (cfg.architectures or ["?"])[0], "max_lora_rank": self.model.max_lora_rank}

    def _make_service(self) -> None:
        from twinkle.api.service import ModelService

        self._service = ModelService(
            self.model.name, None, self._checkpoint_path, offload_path=self._offload_path,
            allow_custom_loss=self.trust_remote_code, max_sampler_adapters=self.model.sampler.max_loaded_adapters,
            max_resident_models=self.model.max_adapters)

    def _ensure_engine(self) -> None:
        """Start the worker group if it is not running (first use, or after scaling to zero)."""
        if self._service.engine is not None:
            return
        from twinkle.actors.engine_proxy import RayEngine
        from twinkle.actors.group import ActorGroup
        from twinkle.actors.workers import TrainWorker
        from twinkle.engine import EngineConfig

        cfg = self.model
        engine_config = EngineConfig(
            base_model=cfg.source, state_dir=str(self.state_dir), dtype=cfg.dtype, device=cfg.device,
            max_lora_rank=cfg.max_lora_rank, max_adapters=cfg.max_adapters + cfg.sampler.max_loaded_adapters + 1,
            micro_batch_tokens=cfg.micro_batch_tokens, num_threads=cfg.num_threads)
        started = time.time()
        self._group = ActorGroup(TrainWorker, cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                                 gpus_per_worker=cfg.gpus_per_worker, strategy=cfg.placement_strategy,
                                 init_kwargs={"engine_config": engine_config})
        engine = RayEngine(self._group)
        if cfg.max_context_length:
            engine._info["max_context"] = cfg.max_context_length
        self._service.attach_engine(engine)
        log.info("%s: %d worker(s) ready in %.1fs", cfg.name, cfg.num_workers, time.time() - started)

    def _release_engine(self) -> None:
        engine = self._service.detach_engine()
        if engine is not None:
            engine.shutdown()
        self._group = None
        log.info("%s: released its workers (scale to zero)", self.model.name)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._service is not None and self._group is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._group.shutdown)
            self._group = None

    # ---------------------------------------------------------------- paths
    def _checkpoint_path(self, model_id: str, kind: str, name: str) -> Path:
        tenant, run_dir = self._paths_of(model_id)
        return safe_join(self.state_dir / "checkpoints", tenant_dir(tenant), run_dir, kind, name)

    def _offload_path(self, model_id: str) -> Path:
        tenant, run_dir = self._paths_of(model_id)
        return safe_join(self.state_dir / "offload", tenant_dir(tenant), run_dir)

    def _paths_of(self, model_id: str) -> tuple[str, str]:
        if model_id not in self._paths:
            row = self.store.get_model(model_id, None)
            if row is None:
                raise TwinkleError(f"no record of model {model_id!r}")
            self._paths[model_id] = (row["tenant"], row["run_dir"])
        return self._paths[model_id]

    # ------------------------------------------------------------ requests
    async def submit(self, item: WorkItem) -> None:
        """Queue a request; its result arrives through `wait` and the store.

        Submitting the same request_id again (a client retry) is a no-op: it never runs twice.
        """
        if item.request_id in self._known:
            return
        self._known[item.request_id] = None
        while len(self._known) > 100_000:
            self._known.popitem(last=False)
        self._last_activity = time.time()
        if item.method in ("create_model", "create_model_from_checkpoint"):
            self._paths[item.target_id] = (item.tenant, item.record["run_dir"])
        if not item.ordered or item.seq_id is None:
            self._ready.put_nowait(item)
            return
        queue = self._queues.setdefault(item.target_id, _TargetQueue())
        if item.seq_id < queue.next_seq:  # arrived after its gap was skipped: run it now
            self._ready.put_nowait(item)
            return
        queue.buffer[item.seq_id] = item
        self._drain(queue)

    async def skip(self, target_id: str, seq_id: int) -> None:
        """A request with this seq_id was rejected before reaching us: do not wait for it."""
        queue = self._queues.setdefault(target_id, _TargetQueue())
        if seq_id >= queue.next_seq:
            queue.skipped.add(seq_id)
            self._drain(queue)

    def _drain(self, queue: _TargetQueue) -> None:
        while True:
            if queue.next_seq in queue.buffer:
                self._ready.put_nowait(queue.buffer.pop(queue.next_seq))
            elif queue.next_seq in queue.skipped:
                queue.skipped.discard(queue.next_seq)
            else:
                break
            queue.next_seq += 1
        queue.waiting_since = time.time() if queue.buffer else None

    async def call(self, item: WorkItem, timeout: float | None = None) -> tuple[str, Any]:
        """Submit and wait for the outcome: ("done", payload) or ("failed", error dict)."""
        await self.submit(item)
        outcome = await self.wait(item.request_id, timeout)
        return outcome if outcome is not None else ("pending", None)

    async def wait(self, request_id: str, timeout: float | None) -> tuple[str, Any] | None:
        """The outcome of a request, waiting up to `timeout` seconds; None if still running.

        ("unknown", None) means this scheduler never received the request (it was restarted).
        """
        if request_id in self._results:
            return self._results[request_id]
        if request_id not in self._known:
            return "unknown", None
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(request_id)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[request_id]

    def _resolve(self, request_id: str, outcome: tuple[str, Any]) -> None:
        self._results[request_id] = outcome
        while len(self._results) > 4096:
            self._results.popitem(last=False)
        for future in self._waiters.pop(request_id, []):
            if not future.done():
                future.set_result(outcome)

    # ------------------------------------------------------------ execution
    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._ready.get()
            self._busy = True
            try:
                outcome = await loop.run_in_executor(self._pool, self._execute, item)
            finally:
                self._busy = False
            self._resolve(item.request_id, outcome)
            loop.run_in_executor(None, self._persist, item.request_id, outcome)

    def _execute(self, item: WorkItem) -> tuple[str, Any]:
        started = time.perf_counter()
        try:
            return self._run_item(item)
        finally:
            self._timings.setdefault(item.method, deque(maxlen=200)).append(time.perf_counter() - started)

    def _run_item(self, item: WorkItem) -> tuple[str, Any]:
        try:
            self._ensure_engine()
            if item.target_id and item.target_id in self._service.models:
                self._last_used[item.target_id] = time.time()
            result = self._service.call(item.method, item.target_id, item.args)
            self._record(item, result)
            return "done", (result.model_dump() if hasattr(result, "model_dump") else result)
        except Exception as exc:  # every failure becomes a failed future with a clear message
            return "failed", _error_dict(exc, item)

    def _persist(self, request_id: str, outcome: tuple[str, Any]) -> None:
        status, payload = outcome
        try:
            if status == "done":
                self.store.complete_future(request_id, wire.dumps(payload))
            else:
                self.store.fail_future(request_id, payload)
        except Exception:
            log.exception("could not store the result of %s", request_id)

    def _record(self, item: WorkItem, result) -> None:
        """Store bookkeeping for requests that create things clients will look up next."""
        rec = item.record
        if item.method in ("create_model", "create_model_from_checkpoint"):
            self.store.create_model(item.target_id, item.tenant, session_id=rec.get("session_id"),
                                    base_model=self.model.name, lora=result.lora.model_dump(),
                                    run_dir=rec["run_dir"], user_metadata=rec.get("user_metadata"))
        elif item.method == "save":
            kind = "training" if item.args.kind == "weights" else "sampler"
            self.store.add_checkpoint(item.target_id, f"{item.args.kind}/{item.args.name}", item.tenant, kind=kind,
                                      folder=result.path, size_bytes=folder_size(result.path),
                                      ttl_seconds=rec.get("ttl_seconds"), user_metadata=rec.get("user_metadata"))
        elif item.method in ("create_sampler", "create_sampler_from_model"):
            self.store.create_sampler(result.sampler_id, item.tenant, session_id=rec.get("session_id"),
                                      base_model=self.model.name, model_path=rec.get("tinker_path"),
                                      folder=result.model_path)
            if item.method == "create_sampler_from_model" and item.args.name is not None:
                # a named snapshot is a sampler checkpoint like any other
                self.store.add_checkpoint(item.target_id, f"sampler_weights/{item.args.name}", item.tenant,
                                          kind="sampler", folder=result.model_path,
                                          size_bytes=folder_size(result.model_path))
        elif item.method == "close_model":
            self.store.set_model_status(item.target_id, "unloaded")
            self._last_used.pop(item.target_id, None)

    # ----------------------------------------------------- idle management
    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeouts.sweep_interval_s)
            try:
                self._skip_stale_gaps()
                if not self._busy and self._ready.empty():
                    await loop.run_in_executor(self._pool, self._sweep_idle)
            except Exception:
                log.exception("sweep failed")

    def _skip_stale_gaps(self) -> None:
        now = time.time()
        for target_id, queue in self._queues.items():
            if queue.buffer and queue.waiting_since and now - queue.waiting_since > self.timeouts.seq_gap_s:
                log.warning("%s: seq_id %d never arrived; continuing with %d", target_id, queue.next_seq,
                            min(queue.buffer))
                queue.next_seq = min(queue.buffer)
                self._drain(queue)

    def _sweep_idle(self) -> None:
        if self._service is None or self._service.engine is None:
            return
        now = time.time()
        for model_id in self._service.resident_models:
            if now - self._last_used.get(model_id, now) > self.timeouts.adapter_idle_s:
                self._service.offload(model_id)
                self.store.set_model_status(model_id, "offloaded")
                log.info("%s: offloaded idle model %s", self.model.name, model_id)
        if not self._service.resident_models and now - self._last_activity > self.timeouts.model_idle_release_s:
            self._release_engine()

    async def end_session(self, model_ids: list[str]) -> None:
        """Their session ended: offload these models (they come back on their next request) and
        delete their unnamed sampler snapshots, which only that session's sampling clients used."""
        def work():
            for model_id in model_ids:
                if self._service is not None and self._service.engine is not None:
                    self._service.offload(model_id)
                    self.store.set_model_status(model_id, "offloaded")
                self._delete_snapshots(model_id)
        await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _delete_snapshots(self, model_id: str) -> None:
        if self._service is not None:
            self._service.delete_snapshots(model_id)
        # and any left by an earlier run of this scheduler (unnamed: no checkpoint record)
        try:
            tenant, run_dir = self._paths_of(model_id)
        except TwinkleError:
            return
        folder = safe_join(self.state_dir / "checkpoints", tenant_dir(tenant), run_dir, "sampler_weights")
        checkpoints, _ = self.store.list_checkpoints(tenant, model_id)
        named = {c["checkpoint_id"].split("/", 1)[1] for c in checkpoints
                 if c["checkpoint_id"].startswith("sampler_weights/")}
        for path in folder.glob(f"{SNAPSHOT_PREFIX}*"):
            if path.name not in named and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    async def stats(self) -> dict:
        return {
            "name": self.model.name,
            "running": self._group is not None,
            "queued": self._ready.qsize() if self._ready else 0,
            "busy": self._busy,
            "resident_models": self._service.resident_models if self._service else [],
            "waiting_for_seq": {t: q.next_seq for t, q in self._queues.items() if q.buffer},
            "execute_ms_p50": {m: round(1000 * sorted(d)[len(d) // 2], 2) for m, d in self._timings.items() if d},
        }


def _error_dict(exc: BaseException, item: WorkItem) -> dict:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, TwinkleError):
        return {**exc.to_dict(), "status_code": exc.status_code}
    log.error("%s %s failed:\n%s", item.method, item.request_id,
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return {"error": f"internal error while running {item.method} ({type(exc).__name__}); "
                     "the server log has the details", "type": "TwinkleError", "field": None,
            "category": "server", "status_code": 500}


def scheduler_name(model_name: str) -> str:
    return f"twinkle-scheduler:{model_name}"


def spawn_scheduler(model: ModelConfig, state_dir: str, timeouts: TimeoutsConfig, *, trust_remote_code: bool,
                    namespace: str):
    """Create the named, detached scheduler actor of a model on this node (next to the store)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(ModelScheduler)
    return actor_cls.options(
        name=scheduler_name(model.name), namespace=namespace, lifetime="detached", num_cpus=0,
        max_concurrency=100_000, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(model.model_dump(), state_dir, timeouts.model_dump(), trust_remote_code)
