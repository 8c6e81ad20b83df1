"""The per-base-model scheduler: a Ray actor that owns one model's workers and the order of work.

It composes parts with one job each:
- `ordering.SeqOrdering` releases each model's requests in seq_id order;
- `lanes.TrainLane` gathers the released forward passes of all tenants into shared passes, and
  `lanes.SampleLane` batches sampling beside it, each on its own thread, fairly by tokens;
- `bookkeeping` declares what the store learns from each method's result;
- `supervisor.WorkerSupervisor` runs the worker group: started on use, released when idle,
  replaced when a worker dies (`recovery` finds each model's newest saved state);
- this class admits requests (exactly once, within each tenant's quota), runs batches through
  `ModelService` (the same code as local mode), wakes waiting long polls the moment a result is in
  (push, never poll) and stores results, so they survive a restart of the HTTP layer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import time
import traceback
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any

from twinkle import layout, wire
from twinkle.actors import bookkeeping, recovery, remote_backend
from twinkle.actors.lanes import Batch, SampleLane, TrainLane
from twinkle.actors.ordering import SeqOrdering
from twinkle.actors.progress import report_progress
from twinkle.actors.spans import Spans
from twinkle.actors.supervisor import WorkerSupervisor
from twinkle.actors.telemetry import Telemetry
from twinkle.actors.work import PASS_METHODS, STEP_METHODS, WorkItem
from twinkle.api.service import CREATE_MODEL_METHODS, Work
from twinkle.api.spec import API_METHODS, CreateModelArgs
from twinkle.config import LimitsConfig, ModelConfig, QuotasConfig, TimeoutsConfig
from twinkle.errors import QuotaExceededError, TwinkleError
from twinkle.ids import is_adhoc_sampler
from twinkle.store import Store
from twinkle.tiny import BUILTIN_MODELS
from twinkle.tiny.build import publish_to_hub_cache

log = logging.getLogger(__name__)
Outcome = tuple[str, Any]  # ("done", payload) | ("failed", error dict)
TOUCH_EVERY_S = 5.0  # how often a model's last_request_time is written while it is busy


class ModelScheduler:
    """Ray actor (async). Create with `spawn_scheduler`; look up with `scheduler_name`."""

    def __init__(self, model: dict, state_dir: str, timeouts: dict, trust_remote_code: bool = False,
                 quotas: dict | None = None, limits: dict | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.model = ModelConfig.model_validate(model)
        self.limits = LimitsConfig.model_validate(limits or {})  # the server's (images re-checked in workers)
        self.timeouts = TimeoutsConfig.model_validate(timeouts)
        self.quotas = QuotasConfig.model_validate(quotas or {})
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir / layout.STORE_FILE)
        self.trust_remote_code = trust_remote_code
        self._threads = {lane: concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=lane)
                         for lane in ("train", "sample", "text")}
        self._service = None
        self._workers: WorkerSupervisor | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._results: OrderedDict[str, Outcome] = OrderedDict()
        self._paths: dict[str, tuple[str, str]] = {}  # model_id -> (tenant, run_dir)
        self._last_used: dict[str, float] = {}
        self._last_touch: dict[str, float] = {}
        self._last_activity = time.time()
        self._known: OrderedDict[str, None] = OrderedDict()  # request ids accepted (dedupe)
        self._queued: Counter[str] = Counter()  # tenant -> requests accepted and not yet resolved
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._published = False
        self._timings: dict[str, deque] = {}  # recent execution times per batch kind, for stats()
        self._compute: dict[str, deque] = {}  # the workers' own seconds in those batches (no Ray hops)
        self._counters: Counter[str] = Counter()  # passes, requests in them, ... since the start
        self._ordering: SeqOrdering | None = None
        self._train: TrainLane | None = None
        self._sample: SampleLane | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._autosaved: dict[str, float] = {}  # model_id -> when its state was last saved
        self._persisting: set[asyncio.Future] = set()  # results being written to the store
        self._telemetry = Telemetry()  # queue waits, batch durations, tokens: for the operator's metrics
        self._accepted: dict[str, float] = {}  # request_id -> when it was queued (monotonic)
        self._spans = Spans()  # where each recent request's time went, for its reply's Server-Timing
        self._points: dict[str, dict] = {}  # request_id -> its run's metrics-history point, stored with it
        self._codec = None  # the model's TextCodec, loaded on the first `text` call

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> dict:
        """Start the lanes (and the workers if `preload`); returns the model's info."""
        loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            self._loop = loop
            time_sliced = self.model.batching == "time_sliced"
            self._train = TrainLane(self._executor("train"), self._resolve_item, budget=self.model.pass_tokens,
                                    max_models=self.model.max_adapters, time_sliced=time_sliced)
            self._sample = SampleLane(self._executor("sample"), self._resolve_item, budget=self.model.sample_tokens,
                                      time_sliced=time_sliced)
            self._ordering = SeqOrdering(self.timeouts.seq_gap_s, self._release)
            self._tasks = [loop.create_task(self._train.run_forever()), loop.create_task(self._sample.run_forever()),
                           loop.create_task(self._sweep_loop()),
                           loop.create_task(report_progress(self.model.name, lambda: self.stats(operator=True),
                                                            self.timeouts.progress_log_s))]
            await loop.run_in_executor(self._threads["train"], self._make_service)
            await loop.run_in_executor(None, self.store.fail_pending_futures, self.model.name, {
                "error": "the server restarted before this request ran; send it again", "category": "server",
                "status_code": 503})
        if self.model.preload:
            await loop.run_in_executor(self._threads["train"], self._workers.start)
        return await self.info()

    async def info(self) -> dict:
        info = dict(self._service.model_info) if self._service and self._service.model_info else {}
        if not info:
            info = await asyncio.get_running_loop().run_in_executor(self._threads["train"], self._static_info)
        info.update(name=self.model.name, running=bool(self._workers and self._workers.running))
        if self.model.max_context_length:
            info["max_context"] = self.model.max_context_length
        if not self._published and self.model.source in BUILTIN_MODELS:
            self._published = True  # clients on this machine find the tokenizer by model name
            await asyncio.get_running_loop().run_in_executor(None, publish_to_hub_cache, self.model.source,
                                                             info["model_path"])
        return info

    def _static_info(self) -> dict:
        """Model facts without starting workers (config + tokenizer only)."""
        from transformers import AutoConfig

        from twinkle.modeling import resolve_model_path
        from twinkle.vision import vision_facts

        path = resolve_model_path(self.model.source, str(self.state_dir))
        cfg = AutoConfig.from_pretrained(path)
        text = cfg.get_text_config()  # a vision-language model's language half
        return {"base_model": self.model.source, "model_path": path, "vocab_size": int(text.vocab_size),
                "max_context": int(getattr(text, "max_position_embeddings", 2048)),
                "arch": (cfg.architectures or ["?"])[0], "max_lora_rank": self.model.max_lora_rank,
                "vision": vision_facts(path)}

    def _make_service(self) -> None:
        from twinkle.api.service import ModelService

        self._service = ModelService(
            self.model.name, None, self._checkpoint_path, offload_path=self._offload_path,
            allow_custom_loss=self.trust_remote_code, max_sampler_adapters=self.model.sampler.max_loaded_adapters,
            max_resident_models=self.model.max_adapters,
            max_resident_per_tenant=lambda tenant: self.quotas.of(tenant).max_resident_adapters)
        self._workers = WorkerSupervisor(self.model, str(self.state_dir), self._service, recover=self._recover,
                                         loop=self._loop, rebuild_on=self._threads["train"],
                                         on_status=self.store.set_model_status, limits=self.limits)

    def _recover(self, model_id: str) -> tuple[Path | None, str]:
        tenant, run_dir = self._paths_of(model_id)
        candidates = [layout.offload_folder(self.state_dir, tenant, run_dir)]
        last = self.store.last_checkpoints(model_id).get("training")
        if last is not None:
            candidates.append(Path(last["folder"]))
        found = recovery.newest_state(candidates)
        live = self._service.models[model_id].step if model_id in self._service.models else None
        folder, saved = found if found else (None, None)
        return folder, recovery.recovery_note(folder, saved, live)

    def _adopt(self, model_id: str) -> None:
        """A model of this base model that the service does not know (the server restarted): take
        it on from the store, to be restored from its newest saved state on use."""
        row = self.store.get_model(model_id, None)
        if row is None or row["base_model"] != self.model.name or row["status"] == "unloaded":
            return
        self._paths[model_id] = (row["tenant"], row["run_dir"])
        folder, note = self._recover(model_id)
        args = recovery.adoption_args(folder, self.model.name) if folder is not None else None
        self._service.adopt(model_id, args or CreateModelArgs(base_model=self.model.name), row["tenant"], folder,
                            None if folder is not None else note)

    async def shutdown(self, drain_s: float = 30.0) -> None:
        """Stop cleanly: the batches running now finish and their results are stored (what ran is
        never reported as lost), queued requests stay queued in the store (a restarted server fails
        them as not run), every resident model is saved, and the workers stop."""
        lanes = [lane for lane in (self._train, self._sample) if lane is not None]
        for lane in lanes:
            lane.stop()
        if self._tasks:
            await asyncio.wait(self._tasks[:2], timeout=drain_s)  # the two lanes' loops
        for task in self._tasks:
            task.cancel()
        if self._persisting:
            await asyncio.wait(list(self._persisting), timeout=drain_s)
        if self._workers is not None and self._workers.running:
            await asyncio.get_running_loop().run_in_executor(self._threads["train"], self._workers.save_and_stop)

    # ---------------------------------------------------------------- paths
    def _checkpoint_path(self, model_id: str, kind: str, name: str) -> Path:
        tenant, run_dir = self._paths_of(model_id)
        return layout.checkpoint_folder(self.state_dir, tenant, run_dir, kind, name)

    def _offload_path(self, model_id: str) -> Path:
        tenant, run_dir = self._paths_of(model_id)
        return layout.offload_folder(self.state_dir, tenant, run_dir)

    def _paths_of(self, model_id: str) -> tuple[str, str]:
        if model_id not in self._paths:
            row = self.store.get_model(model_id, None)
            if row is None:
                raise TwinkleError(f"no record of model {model_id!r}")
            self._paths[model_id] = (row["tenant"], row["run_dir"])
        return self._paths[model_id]

    # ------------------------------------------------------------ requests
    async def submit(self, item: WorkItem) -> dict | None:
        """Queue a request; its result arrives through `wait` and the store.

        Submitting the same request_id again (a client retry) is a no-op: it never runs twice.
        Returns an error dict (and queues nothing) when the tenant's quota of queued requests is full.
        """
        if item.request_id in self._known:
            return None
        limit = self.quotas.of(item.tenant).max_queued_requests
        if self._queued[item.tenant] >= limit:
            error = QuotaExceededError(f"you have {limit} requests queued on {self.model.name}, this server's "
                                       "limit per tenant; wait for results before sending more", field="quota")
            return {**error.to_dict(), "status_code": error.status_code}
        self._known[item.request_id] = None
        while len(self._known) > 100_000:
            self._known.popitem(last=False)
        self._queued[item.tenant] += 1
        self._accepted[item.request_id] = time.monotonic()
        self._spans.accepted(item.request_id)
        self._last_activity = time.time()
        if item.method in CREATE_MODEL_METHODS:
            self._paths[item.target_id] = (item.tenant, item.record["run_dir"])
        if item.ordered and item.seq_id is not None and not self._ordering.knows(item.target_id):
            first = await asyncio.get_running_loop().run_in_executor(None, self.store.next_train_seq, item.target_id)
            self._ordering.begin(item.target_id, first)
        self._ordering.add(item)
        return None

    def _release(self, item: WorkItem) -> None:
        (self._sample if item.lane == "sample" else self._train).push(item)

    async def text(self, op: str, *args) -> Any:
        """Tokenizer work for the OpenAI-compatible routes (the HTTP layer loads no tokenizer): one of
        `TextCodec.OPERATIONS`, on its own thread so it never waits behind a training pass."""
        from twinkle.textcodec import TextCodec

        if op not in TextCodec.OPERATIONS:
            raise ValueError(f"unknown text operation {op!r}")
        loop = asyncio.get_running_loop()
        if self._codec is None:
            path = (await self.info())["model_path"]
            self._codec = await loop.run_in_executor(self._threads["text"], TextCodec.load, path)
        return await loop.run_in_executor(self._threads["text"], getattr(self._codec, op), *args)

    async def skip(self, target_id: str, seq_id: int) -> None:
        """A request with this seq_id was rejected before reaching us: do not wait for it."""
        self._ordering.skip(target_id, seq_id)

    async def call(self, item: WorkItem, timeout: float | None = None) -> Outcome:
        """Submit and wait for the outcome: ("done", payload) or ("failed", error dict)."""
        rejected = await self.submit(item)
        if rejected is not None:
            return "failed", rejected
        outcome = await self.wait(item.request_id, timeout)
        return outcome if outcome is not None else ("pending", None)

    async def wait(self, request_id: str, timeout: float | None, *, timed: bool = False):
        """The outcome of a request, waiting up to `timeout` seconds; None if still running.

        ("unknown", None) means this scheduler never received the request (it was restarted).
        With `timed`, returns (outcome, figures): the request's span (`spans.RequestSpan.figures`).
        """
        outcome = await self._wait(request_id, timeout)
        return (outcome, self._spans.figures(request_id)) if timed else outcome

    async def _wait(self, request_id: str, timeout: float | None) -> Outcome | None:
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

    def _resolve_item(self, item: WorkItem, outcome: Outcome) -> None:
        self._accepted.pop(item.request_id, None)
        self._queued[item.tenant] -= 1
        if self._queued[item.tenant] <= 0:
            del self._queued[item.tenant]
        self._results[item.request_id] = outcome
        while len(self._results) > 4096:
            self._results.popitem(last=False)
        self._spans.ready(item.request_id)
        for future in self._waiters.pop(item.request_id, []):
            if not future.done():
                future.set_result(outcome)
        persisting = asyncio.get_running_loop().run_in_executor(None, self._persist, item, outcome)
        self._persisting.add(persisting)
        persisting.add_done_callback(self._persisting.discard)

    def _persist(self, item: WorkItem, outcome: Outcome) -> None:
        status, payload = outcome
        try:
            point = self._points.pop(item.request_id, None)
            if status == "done":
                self.store.complete_future(item.request_id, wire.dumps(payload))
                if point is not None:
                    self.store.add_run_points([point])
            else:
                self.store.fail_future(item.request_id, payload)
            now = time.time()
            if item.target_id in self._paths and now - self._last_touch.get(item.target_id, 0.0) > TOUCH_EVERY_S:
                self._last_touch[item.target_id] = now
                self.store.touch_model(item.target_id)
        except Exception:
            log.exception("could not store the result of %s", item.request_id)

    # ------------------------------------------------------------ execution
    def _executor(self, lane: str):
        async def execute(batch: Batch) -> dict[str, Outcome]:
            return await asyncio.get_running_loop().run_in_executor(self._threads[lane], self._run_batch, batch)
        return execute

    def _run_batch(self, batch: Batch) -> dict[str, Outcome]:
        """Run a lane's batch on that lane's thread; one outcome per request, failures included."""
        started = time.perf_counter()
        began = time.monotonic()
        waits = [began - self._accepted.pop(item.request_id, began) for item in batch.items]
        request_ids = [item.request_id for item in batch.items]
        self._spans.started(request_ids, time.time())
        group = None
        remote_backend.start_compute_clock()
        try:
            with self._workers.using() as group:
                results = self._results_of(batch)
        except Exception as exc:  # the workers could not start or died: every request of the batch fails
            results = {item.request_id: exc for item in batch.items}
        compute_s = remote_backend.compute_seconds()
        self._spans.ran(request_ids, time.perf_counter() - started, compute_s)
        if compute_s is not None:
            self._compute.setdefault(batch.kind, deque(maxlen=200)).append(compute_s)
        losses = [r for r in results.values() if isinstance(r, BaseException) and recovery.is_worker_loss(r)]
        if losses:
            notes = self._workers.on_loss(group, losses[0])
            for item in batch.items:
                if isinstance(results[item.request_id], BaseException) and recovery.is_worker_loss(results[item.request_id]):
                    note = notes.get(item.target_id, "")
                    results[item.request_id] = TwinkleError(
                        "the worker running this request died and was restarted; the request did not run, send it "
                        "again" + (f" ({note})" if note else ""))
        outcomes = {}
        ran_s = time.perf_counter() - started
        train_tokens = sample_tokens = 0
        for item in batch.items:
            result = results[item.request_id]
            if isinstance(result, BaseException):
                outcomes[item.request_id] = ("failed", _error_dict(result, item))
                continue
            try:
                bookkeeping.record(self.store, item, result, self.model.name)
            except Exception as exc:
                outcomes[item.request_id] = ("failed", _error_dict(exc, item))
                continue
            outcomes[item.request_id] = ("done", result.model_dump() if hasattr(result, "model_dump") else result)
            train_tokens += item.cost if item.method in PASS_METHODS else 0
            sample_tokens += sum(len(s.tokens) for s in getattr(result, "sequences", None) or ())
            point = bookkeeping.history_point(item, result, step=self._step_of(item.target_id), seconds=ran_s,
                                              base_model=self.model.name)
            if point is not None:
                self._points[item.request_id] = point
        elapsed = time.perf_counter() - started
        self._timings.setdefault(batch.kind, deque(maxlen=200)).append(elapsed)
        self._telemetry.batch_done(batch.kind, elapsed, waits, train_tokens, sample_tokens)
        return outcomes

    def _step_of(self, model_id: str | None) -> int:
        """The optimizer steps a model has taken so far (0 if the service does not hold it)."""
        record = self._service.models.get(model_id) if self._service is not None and model_id else None
        return int(getattr(record, "step", 0) or 0)

    def _results_of(self, batch: Batch) -> dict[str, object]:
        service = self._service
        now = time.time()
        for item in batch.items:
            if item.target_id in service.models:
                self._last_used[item.target_id] = now
        for item in batch.items:
            if API_METHODS[item.method].target == "model" and item.method not in CREATE_MODEL_METHODS \
                    and item.target_id not in service.models:
                self._adopt(item.target_id)
        work = {item.request_id: Work(item.request_id, item.target_id, item.args, item.method) for item in batch.items}
        if batch.kind == "pass":
            models = len({item.target_id for item in batch.items})
            self._counters.update(train_passes=1, train_pass_requests=len(batch.items),
                                  shared_train_passes=int(models > 1))
            self._counters["max_models_per_pass"] = max(self._counters["max_models_per_pass"], models)
            return service.run_forward(list(work.values()))
        if batch.kind == "sample":
            self._counters.update(sample_batches=1, sample_requests=len(batch.items))
            results = service.run_samples(list(work.values()))
            for item in batch.items:
                if is_adhoc_sampler(item.target_id):  # an old SDK's one-request sampler
                    service.release_sampler(item.target_id)
            return results
        steps = [work[i.request_id] for i in batch.items if i.method in STEP_METHODS]
        results = service.run_steps(steps) if steps else {}
        self._autosave([w.target_id for w in steps if not isinstance(results.get(w.request_id), BaseException)])
        for item in batch.items:
            if item.method in STEP_METHODS:
                continue
            try:
                results[item.request_id] = service.call(item.method, item.target_id, item.args, item.tenant)
            except Exception as exc:
                results[item.request_id] = exc
        return results

    def _autosave(self, model_ids: list[str]) -> None:
        """Save the state of models that just stepped, after their first step and then every
        `autosave_s`, so a worker crash costs at most that much of their work."""
        every = self.timeouts.autosave_s
        if not every:
            return
        now = time.time()
        for model_id in dict.fromkeys(model_ids):
            if now - self._autosaved.get(model_id, 0.0) >= every and self._service.autosave(model_id):
                self._autosaved[model_id] = now

    # ----------------------------------------------------- idle management
    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeouts.sweep_interval_s)
            try:
                if self._train.idle() and self._sample.idle():
                    await loop.run_in_executor(self._threads["train"], self._sweep_idle)
            except Exception:
                log.exception("sweep failed")

    def _sweep_idle(self) -> None:
        service = self._service
        if service is None or service.backend is None:
            return
        now = time.time()
        for model_id in service.resident_models:
            if now - self._last_used.get(model_id, now) > self.timeouts.adapter_idle_s:
                service.offload(model_id)
                self.store.set_model_status(model_id, "offloaded")
                log.info("%s: offloaded idle model %s", self.model.name, model_id)
        if not service.resident_models and now - self._last_activity > self.timeouts.model_idle_release_s:
            self._workers.release_if_idle()

    async def end_session(self, model_ids: list[str]) -> None:
        """Their session ended: offload these models (they come back on their next request) and
        delete their unnamed sampler snapshots, which only that session's sampling clients used."""
        def work():
            for model_id in model_ids:
                if self._service is not None and self._service.backend is not None:
                    self._service.offload(model_id)
                    self.store.set_model_status(model_id, "offloaded")
                self._delete_snapshots(model_id)
        await asyncio.get_running_loop().run_in_executor(self._threads["train"], work)

    def _delete_snapshots(self, model_id: str) -> None:
        if self._service is not None:
            self._service.delete_snapshots(model_id)
        # and any left by an earlier run of this scheduler (unnamed: no checkpoint record)
        try:
            tenant, run_dir = self._paths_of(model_id)
        except TwinkleError:
            return
        folder = layout.sampler_weights_folder(self.state_dir, tenant, run_dir)
        checkpoints, _ = self.store.list_checkpoints(tenant, model_id)
        named = {c["checkpoint_id"].split("/", 1)[1] for c in checkpoints
                 if c["checkpoint_id"].startswith("sampler_weights/")}
        for path in folder.glob(f"{layout.SNAPSHOT_PREFIX}*"):
            if path.name not in named and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    async def stats(self, tenant: str | None = None, *, operator: bool = False) -> dict:
        """Queues, residency and batching figures. The ids listed are `tenant`'s own; the operator
        view lists every model and each tenant's queued requests."""
        service = self._service
        counters = self._counters

        def own(model_id: str) -> bool:
            return operator or (tenant is not None and self._paths.get(model_id, ("",))[0] == tenant)

        view = {
            "name": self.model.name,
            "running": bool(self._workers and self._workers.running),
            "device": service.model_info.get("device") if service else None,
            "dtype": self.model.dtype,
            "queued": (self._train.queued() + self._sample.queued()) if self._train else 0,
            "busy": bool(self._train and (self._train.busy or self._sample.busy)),
            "resident": len(service.resident_models) if service else 0,
            "resident_models": [m for m in service.resident_models if own(m)] if service else [],
            "waiting_for_seq": {t: s for t, s in self._ordering.waiting().items() if own(t)} if self._ordering else {},
            "offloads": service.offloads if service else 0,
            "restores": service.restores if service else 0,
            **{name: counters[name] for name in ("train_passes", "train_pass_requests", "shared_train_passes",
                                                 "max_models_per_pass", "sample_batches", "sample_requests")},
            "worker_losses": self._workers.losses if self._workers else 0,
            "rebuilding": bool(self._workers and self._workers.rebuilding),
            "execute_ms_p50": _p50_ms(self._timings),
            "compute_ms_p50": _p50_ms(self._compute),
            "queued_by_lane": {"train": self._train.queued(), "sample": self._sample.queued()} if self._train else {},
            "workers": {"backend": self.model.backend, "configured": self.model.num_workers,
                        "cpus_per_worker": self.model.cpus_per_worker, "gpus_per_worker": self.model.gpus_per_worker},
            "tokens_per_s": self._telemetry.snapshot()["tokens_per_s"],
        }
        if operator:
            view["telemetry"] = self._telemetry.snapshot()
            view["queued_by_tenant"] = dict(self._queued)
            view["lost_models"] = sorted(service.lost_models) if service else []
        return view


def _p50_ms(recent: dict[str, deque]) -> dict[str, float]:
    """The median of each batch kind's recent seconds, in milliseconds."""
    return {kind: round(1000 * sorted(d)[len(d) // 2], 2) for kind, d in recent.items() if d}


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
                    namespace: str, quotas: QuotasConfig | None = None, limits: LimitsConfig | None = None):
    """Create the named, detached scheduler actor of a model on this node (next to the store).

    `limits`: the server's request limits (default: LimitsConfig's); its image limits reach the workers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from twinkle.actors.runtime import REQUEST_PATH_ACTOR_OPTIONS

    node_id = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(ModelScheduler)
    return actor_cls.options(
        name=scheduler_name(model.name), namespace=namespace, lifetime="detached", num_cpus=0,
        max_concurrency=100_000, get_if_exists=True, **REQUEST_PATH_ACTOR_OPTIONS,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(model.model_dump(), state_dir, timeouts.model_dump(), trust_remote_code,
             (quotas or QuotasConfig()).model_dump(), (limits or LimitsConfig()).model_dump())
