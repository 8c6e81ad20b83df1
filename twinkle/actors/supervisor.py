"""A model's worker group over its lifetime: started on first use, kept while in use, released
when idle (scale to zero), and replaced the moment a worker dies.

The supervisor owns the group; `ModelService` owns what runs on it. When a worker dies, the
service is told to give up the lost backend (each resident model comes back from its newest saved
state, or is marked lost) and a new group starts at once, so the next request does not wait for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twinkle.actors import recovery
from twinkle.api.service import ModelService, RecoverFn
from twinkle.config import LimitsConfig, ModelConfig

log = logging.getLogger(__name__)


class WorkerSupervisor:
    def __init__(self, model: ModelConfig, state_dir: str, service: ModelService, *, recover: RecoverFn,
                 loop: asyncio.AbstractEventLoop, rebuild_on: concurrent.futures.Executor,
                 on_status: Callable[[str, str], None], limits: LimitsConfig | None = None) -> None:
        self.model = model
        self.limits = limits or LimitsConfig()  # the server's; the workers re-check images against them
        self.state_dir = state_dir
        self.service = service
        self.recover = recover
        self.loop = loop
        self.rebuild_on = rebuild_on  # the thread a replacement group is started on
        self.on_status = on_status  # (model_id, store status) after a loss
        self.group = None
        self.losses = 0
        self.rebuilding = False  # a worker died and its replacement is starting
        self._lost: tuple[object, dict[str, str]] = (None, {})  # the last group lost, and what its models were told
        self._lock = threading.Lock()
        self._users = 0
        self.sampler = None  # the model's own sampler workers (sampler.backend vllm), beside the training group

    @property
    def running(self) -> bool:
        return self.group is not None

    @contextmanager
    def using(self) -> Iterator[object]:
        """Run with the workers started; they are not released while in use. Yields the group."""
        with self._lock:
            self._ensure()
            self._users += 1
            group = self.group
        try:
            yield group
        finally:
            with self._lock:
                self._users -= 1

    def start(self) -> None:
        with self.using():
            pass

    def _ensure(self) -> None:
        if self.service.backend is not None:
            return
        from twinkle.actors.group import ActorGroup
        from twinkle.actors.remote_backend import RayBackend
        from twinkle.actors.workers import ACTOR_CONCURRENCY, BackendWorker
        from twinkle.backends.base import BackendConfig
        from twinkle.vision import ImageLimits

        cfg = self.model
        config = BackendConfig(
            base_model=cfg.source, backend=cfg.backend, state_dir=self.state_dir, dtype=cfg.dtype,
            device=cfg.device, max_lora_rank=cfg.max_lora_rank,
            max_adapters=cfg.max_adapters + (0 if cfg.sampler.backend == "vllm" else cfg.sampler.max_loaded_adapters),
            micro_batch_tokens=cfg.micro_batch_tokens, num_threads=cfg.num_threads,
            image_limits=ImageLimits.of(self.limits))
        started = time.time()
        if cfg.backend == "megatron":  # one actor per rank, in megatron-core's own virtualenv
            from twinkle.actors.megatron_group import start_megatron_group

            count, bundle = cfg.placement()
            backend = start_megatron_group(
                config, tensor_parallel=cfg.parallelism.tensor_parallel,
                pipeline_parallel=cfg.parallelism.pipeline_parallel, data_parallel=cfg.num_workers,
                cpus_per_rank=bundle["CPU"], gpus_per_rank=bundle.get("GPU", 0.0), strategy=cfg.placement_strategy,
                resources=cfg.resources)
            self.group = backend.group
        else:
            self.group = ActorGroup(BackendWorker, cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                                    gpus_per_worker=cfg.gpus_per_worker, strategy=cfg.placement_strategy,
                                    resources=cfg.resources,
                                    init_kwargs={"config": config}, max_concurrency=ACTOR_CONCURRENCY)
            backend = RayBackend(self.group)
        if cfg.max_context_length:
            backend._info["max_context"] = cfg.max_context_length
        try:
            sampler = self._ensure_sampler(backend.info())
        except BaseException:
            backend.shutdown()
            self.group = None
            raise
        self.service.attach_backend(backend, sampler)
        asyncio.run_coroutine_threadsafe(recovery.watch_group(self.group, self.on_loss), self.loop)
        log.info("%s: %d worker(s) ready in %.1fs", cfg.name, cfg.num_workers, time.time() - started)

    def on_loss(self, group, exc: BaseException) -> dict[str, str]:
        """A worker of `group` died: every resident model comes back from its newest saved state (or is
        marked lost), and a new group starts at once. Returns model_id -> what its tenant is told."""
        with self._lock:
            if group is not None and group is self._lost[0]:  # the watcher and a request both saw it
                return self._lost[1]
            if group is None or self.group is not group:  # shut down on purpose
                return {}
            notes = self.service.lose_backend(self.recover)
            self.group = None
            self._lost = (group, notes)
            self.losses += 1
        log.error("%s: a worker died (%s); restoring %d model(s) from their saved state", self.model.name,
                  type(exc).__name__, len(notes))
        lost = self.service.lost_models
        for model_id in notes:
            self.on_status(model_id, "lost" if model_id in lost else "offloaded")
        group.shutdown()
        self.rebuilding = True
        self.rebuild_on.submit(self._rebuild)
        return notes

    def _ensure_sampler(self, info: dict):
        """The vLLM sampler workers (started once; they outlive a restart of the training workers)."""
        if self.model.sampler.backend != "vllm" or self.sampler is not None:
            return self.sampler
        from twinkle.actors.vllm_group import start_vllm_sampler

        started = time.time()
        self.sampler = start_vllm_sampler(self.model, info)
        asyncio.run_coroutine_threadsafe(recovery.watch_group(self.sampler.group, self._on_sampler_loss), self.loop)
        log.info("%s: %d vLLM sampler worker(s) ready in %.1fs", self.model.name, self.model.sampler.num_workers,
                 time.time() - started)
        return self.sampler

    def _on_sampler_loss(self, group, exc: BaseException) -> None:
        """A sampler worker died: training state is untouched; new sampler workers start at once and
        load sampler weights again on their next use."""
        with self._lock:
            if self.sampler is None or self.sampler.group is not group:  # shut down on purpose
                return
            self.sampler = None
        log.error("%s: a vLLM sampler worker died (%s); starting new ones", self.model.name, type(exc).__name__)
        group.shutdown()
        self.rebuild_on.submit(self._restart_sampler)

    def _restart_sampler(self) -> None:
        with self._lock:
            if self.service.backend is None:
                return  # started with the training workers on next use
            try:
                self.service.attach_sampler(self._ensure_sampler(self.service.model_info))
            except Exception:  # sampling keeps answering that the sampler died; the next loss or release retries
                log.exception("%s: new vLLM sampler workers did not start", self.model.name)

    def _stop_sampler(self) -> None:
        sampler, self.sampler = self.sampler, None
        if sampler is not None:
            sampler.shutdown()

    def _rebuild(self) -> None:
        try:
            self.start()
        finally:
            self.rebuilding = False

    def release_if_idle(self) -> bool:
        """Scale to zero: offload everything and stop the workers, unless a request is using them."""
        with self._lock:
            if self._users or self.service.backend is None:
                return False
            backend = self.service.detach_backend()
            backend.shutdown()
            self.group = None
            self._stop_sampler()
        log.info("%s: released its workers (scale to zero)", self.model.name)
        return True

    def save_and_stop(self) -> None:
        """Save every resident model (a restarted server restores them), then stop the workers."""
        with self._lock:
            group, self.group = self.group, None
            if group is None:
                return
            resident = self.service.resident_models
            try:
                self.service.detach_backend()  # offloads every resident model
            finally:
                group.shutdown()
                self._stop_sampler()
        for model_id in resident:
            self.on_status(model_id, "offloaded")
