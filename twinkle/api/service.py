"""The API's behaviour for one base model, independent of where the engine runs.

`ModelService` implements every method of `spec.API_METHODS` against an engine handle: the
in-process `Engine`, or a proxy to Ray workers with the same methods. Local mode, Ray mode and the
server all execute API calls through this class, so they share one code path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from twinkle.api.spec import (API_METHODS, CreateModelArgs, CreateSamplerArgs, Empty, ForwardArgs, FromCheckpointArgs,
                              LoadArgs, ModelInfo, SampleArgs, SamplerInfo, SaveArgs, SaveSamplerArgs, StepArgs)
from twinkle.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from twinkle.types import CheckpointInfo, ForwardResult, SampleResult, StepResult, TrainState

CheckpointPathFn = Callable[[str, str, str], Path]  # (model_id, kind, name) -> folder
OffloadPathFn = Callable[[str], Path]  # model_id -> folder for its offloaded state


class EngineHandle(Protocol):
    """What the service needs from an engine (see `twinkle.engine.Engine`)."""

    def info(self) -> dict: ...
    def create_adapter(self, adapter_id, lora=None, *, adam=None, schedule=None): ...
    def remove_adapter(self, adapter_id): ...
    def has_adapter(self, adapter_id) -> bool: ...
    def forward(self, adapter_id, data, loss="cross_entropy", loss_config=None): ...
    def forward_backward(self, adapter_id, data, loss="cross_entropy", loss_config=None): ...
    def optim_step(self, adapter_id, adam=None): ...
    def sample(self, adapter_id, prompt_tokens, params=None, num_samples=1, **scoring): ...
    def save(self, adapter_id, path, *, with_optimizer=True, overwrite=True, kind="weights",
             include_gradients=False, metadata=None): ...
    def load(self, adapter_id, path, *, with_optimizer=True, create=True): ...
    def train_state(self, adapter_id): ...
    def describe(self, adapter_id) -> dict: ...
    def lora_config(self, adapter_id): ...


SNAPSHOT_PREFIX = "snapshot-step"  # unnamed sampler snapshots: temporary, deleted with their session
SNAPSHOTS_KEPT = 32  # unnamed snapshots kept per model (one per RL step); older ones are deleted


@dataclass
class _ModelRecord:
    args: CreateModelArgs
    pending_micro_steps: int = 0


@dataclass
class _SamplerRecord:
    base_model: str
    model_path: str | None


def unpickle_loss(payload: bytes, allowed: bool):
    if not allowed:
        raise PermissionDeniedError(
            "this server does not run client code; an operator can enable custom losses with "
            "`trust_remote_code: true` in the server config", field="custom_loss")
    import cloudpickle

    try:
        fn = cloudpickle.loads(payload)
    except Exception as exc:
        raise InvalidInputError(f"could not unpickle the custom loss: {exc}", field="custom_loss") from None
    if not callable(fn):
        raise InvalidInputError("the custom loss is not callable", field="custom_loss")
    return fn


class ModelService:
    """Training models and samplers of one base model, on one engine."""

    def __init__(self, base_model: str, engine: EngineHandle | None, checkpoint_path: CheckpointPathFn, *,
                 offload_path: OffloadPathFn | None = None, allow_custom_loss: bool = True,
                 max_sampler_adapters: int = 8, max_resident_models: int | None = None) -> None:
        self.base_model = base_model
        self.checkpoint_path = checkpoint_path
        self.offload_path = offload_path
        self.allow_custom_loss = allow_custom_loss
        self.max_sampler_adapters = max_sampler_adapters
        self.max_resident_models = max_resident_models
        self.engine: EngineHandle | None = None
        self.engine_info: dict = {}
        self.models: dict[str, _ModelRecord] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # models whose adapter is in the engine (LRU)
        self._offloaded: dict[str, Path] = {}
        self.samplers: dict[str, _SamplerRecord] = {}
        self._sampler_adapters: OrderedDict[str, tuple[str, str]] = OrderedDict()  # path -> (adapter, version)
        self._snapshots: dict[str, list[str]] = {}  # model_id -> folders of its unnamed snapshots, oldest first
        self._lock = threading.RLock()
        if engine is not None:
            self.attach_engine(engine)

    # ------------------------------------------------------ engine lifetime
    def attach_engine(self, engine: EngineHandle) -> None:
        """Use `engine` from now on; offloaded models are restored on their next request."""
        with self._lock:
            self.engine = engine
            self.engine_info = engine.info()
            self._sampler_adapters.clear()

    def detach_engine(self) -> EngineHandle | None:
        """Offload every model and let go of the engine (scale to zero); returns it for shutdown."""
        with self._lock:
            for model_id in list(self._resident):
                self.offload(model_id)
            engine, self.engine = self.engine, None
            self._sampler_adapters.clear()
            return engine

    @property
    def resident_models(self) -> list[str]:
        return list(self._resident)

    def offload(self, model_id: str) -> None:
        """Save a model's adapter, optimizer and pending gradients to disk and free its memory."""
        with self._lock:
            if model_id not in self._resident:
                return
            if self.offload_path is None:
                raise RuntimeError("this service has no offload folder")
            folder = self.offload_path(model_id)
            self.engine.save(model_id, folder, with_optimizer=True, include_gradients=True)
            self.engine.remove_adapter(model_id)
            del self._resident[model_id]
            self._offloaded[model_id] = folder

    def _ensure_resident(self, model_id: str) -> None:
        if self.engine is None:
            raise RuntimeError("the model's workers are not running")
        if model_id in self._resident:
            self._resident.move_to_end(model_id)
            return
        self._make_room()
        folder = self._offloaded.pop(model_id, None)
        if folder is not None:
            self.engine.load(model_id, folder, with_optimizer=True, create=True)
        self._resident[model_id] = None

    def _make_room(self) -> None:
        if self.max_resident_models and self.offload_path is not None:
            while len(self._resident) >= self.max_resident_models:
                self.offload(next(iter(self._resident)))

    # ------------------------------------------------------------ dispatch
    def call(self, method: str, target_id: str | None, args):
        """Run an API method by name (the entry point of every transport)."""
        spec = API_METHODS.get(method)
        if spec is None:
            raise NotFoundError(f"unknown API method {method!r}", field="method")
        if not isinstance(args, spec.args):
            args = spec.args.model_validate(args)
        with self._lock:
            return getattr(self, method)(target_id, args)

    # -------------------------------------------------------------- models
    def _record(self, model_id: str) -> _ModelRecord:
        try:
            record = self.models[model_id]
        except KeyError:
            raise NotFoundError(f"no training model {model_id!r}", field="model_id") from None
        self._ensure_resident(model_id)
        return record

    def _info(self, model_id: str) -> ModelInfo:
        args = self._record(model_id).args
        described = self.engine.describe(model_id)
        return ModelInfo(
            model_id=model_id, base_model=self.base_model, lora=described["lora"], optimizer=described["adam"],
            schedule=described["schedule"], loss=args.loss, loss_config=args.loss_config,
            grad_accumulation_steps=args.grad_accumulation_steps, vocab_size=self.engine_info["vocab_size"],
            max_context=self.engine_info["max_context"], tokenizer_path=self.engine_info["model_path"],
            train_state=described["train_state"],
        )

    def _check_default_loss(self, args: CreateModelArgs) -> None:
        from twinkle.validation import lookup_loss, resolve_loss_config

        resolve_loss_config(lookup_loss(args.loss), args.loss_config)

    def create_model(self, model_id: str, args: CreateModelArgs) -> ModelInfo:
        self._check_default_loss(args)
        self._make_room()
        self.engine.create_adapter(model_id, args.lora, adam=args.optimizer, schedule=args.schedule)
        self.models[model_id] = _ModelRecord(args)
        self._resident[model_id] = None
        return self._info(model_id)

    def create_model_from_checkpoint(self, model_id: str, args: FromCheckpointArgs) -> ModelInfo:
        self._make_room()
        self.engine.load(model_id, args.path, with_optimizer=args.with_optimizer, create=True)
        described = self.engine.describe(model_id)
        settings = {k: v for k, v in described["metadata"].get("api", {}).items()
                    if k in ("loss", "loss_config", "grad_accumulation_steps")}
        self.models[model_id] = _ModelRecord(CreateModelArgs(
            base_model=self.base_model, lora=described["lora"], optimizer=described["adam"],
            schedule=described["schedule"], name=args.name, **settings))
        self._resident[model_id] = None
        return self._info(model_id)

    def get_info(self, model_id: str, args: Empty) -> ModelInfo:
        return self._info(model_id)

    def _loss_of(self, record: _ModelRecord, args: ForwardArgs):
        if args.custom_loss is not None:
            return unpickle_loss(args.custom_loss, self.allow_custom_loss), args.loss_config
        if args.loss is None:
            return record.args.loss, (args.loss_config if args.loss_config is not None else record.args.loss_config)
        return args.loss, args.loss_config

    def forward(self, model_id: str, args: ForwardArgs) -> ForwardResult:
        loss, config = self._loss_of(self._record(model_id), args)
        return self.engine.forward(model_id, args.data, loss, config)

    def forward_backward(self, model_id: str, args: ForwardArgs) -> ForwardResult:
        loss, config = self._loss_of(self._record(model_id), args)
        return self.engine.forward_backward(model_id, args.data, loss, config)

    def step(self, model_id: str, args: StepArgs) -> StepResult:
        record = self._record(model_id)
        record.pending_micro_steps += 1
        if record.pending_micro_steps < record.args.grad_accumulation_steps:
            return StepResult(metrics={"applied": 0.0, "accumulated": float(record.pending_micro_steps)})
        record.pending_micro_steps = 0
        result = self.engine.optim_step(model_id, args.optimizer)
        return StepResult(metrics={**result.metrics, "applied": 1.0})

    def save(self, model_id: str, args: SaveArgs) -> CheckpointInfo:
        self._record(model_id)
        path = self.checkpoint_path(model_id, args.kind, args.name)
        with_optimizer = args.with_optimizer and args.kind == "weights"
        record = self.models[model_id].args
        api = {"loss": record.loss, "loss_config": record.loss_config,
               "grad_accumulation_steps": record.grad_accumulation_steps}
        return self.engine.save(model_id, path, with_optimizer=with_optimizer, overwrite=args.overwrite,
                                kind=args.kind, metadata={"api": api})

    def load(self, model_id: str, args: LoadArgs) -> TrainState:
        self._record(model_id)
        return self.engine.load(model_id, args.path, with_optimizer=args.with_optimizer, create=False)

    def train_state(self, model_id: str, args: Empty) -> TrainState:
        self._record(model_id)
        return self.engine.train_state(model_id)

    def close_model(self, model_id: str, args: Empty) -> Empty:
        if model_id not in self.models:
            raise NotFoundError(f"no training model {model_id!r}", field="model_id")
        if model_id in self._resident:
            self.engine.remove_adapter(model_id)
            del self._resident[model_id]
        self._offloaded.pop(model_id, None)
        del self.models[model_id]
        return Empty()

    def create_sampler_from_model(self, model_id: str, args: SaveSamplerArgs) -> SamplerInfo:
        self._record(model_id)
        state = self.engine.train_state(model_id)
        name = args.name or f"{SNAPSHOT_PREFIX}{state.step}-{uuid.uuid4().hex[:8]}"
        info = self.save(model_id, SaveArgs(name=name, with_optimizer=False, kind="sampler_weights"))
        sampler_id = args.sampler_id or f"{model_id}/sampler/{name}"
        sampler = self.create_sampler(sampler_id, CreateSamplerArgs(base_model=self.base_model, model_path=info.path))
        if args.name is None:
            kept = self._snapshots.setdefault(model_id, [])
            kept.append(info.path)
            while len(kept) > SNAPSHOTS_KEPT:
                self._delete_weights(kept.pop(0))
        return sampler

    def delete_snapshots(self, model_id: str) -> None:
        """Delete a model's unnamed sampler snapshots (its session ended)."""
        for path in self._snapshots.pop(model_id, []):
            self._delete_weights(path)

    def _delete_weights(self, path: str) -> None:
        self.drop_sampler_weights(path)
        shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ samplers
    def create_sampler(self, sampler_id: str, args: CreateSamplerArgs) -> SamplerInfo:
        if args.model_path is not None:
            self._sampler_adapter(args.model_path)  # load now: a bad path fails here, not at sample time
        self.samplers[sampler_id] = _SamplerRecord(self.base_model, args.model_path)
        return SamplerInfo(sampler_id=sampler_id, base_model=self.base_model, model_path=args.model_path,
                           vocab_size=self.engine_info["vocab_size"], max_context=self.engine_info["max_context"],
                           tokenizer_path=self.engine_info["model_path"])

    def _sampler_adapter(self, model_path: str) -> str:
        """The engine adapter holding the weights saved at `model_path` (loaded on demand, LRU).

        A folder saved again under the same name is a new folder (atomic rename), so the cache is
        keyed by the folder's identity and a re-saved checkpoint is reloaded.
        """
        if self.engine is None:
            raise RuntimeError("the model's workers are not running")
        try:
            stat = os.stat(model_path)
            version = f"{stat.st_ino}-{stat.st_mtime_ns}"
        except OSError:
            raise NotFoundError(f"the weights of this sampler ({Path(model_path).name}) were released; temporary "
                                "snapshots are kept for a limited number of steps, so create a new sampler",
                                field="model_path") from None
        cached = self._sampler_adapters.get(model_path)
        if cached is not None and cached[1] == version and self.engine.has_adapter(cached[0]):
            self._sampler_adapters.move_to_end(model_path)
            return cached[0]
        adapter = "sampler:" + hashlib.sha256(str(model_path).encode()).hexdigest()[:16]
        if self.engine.has_adapter(adapter):
            self.engine.remove_adapter(adapter)
        self.engine.load(adapter, model_path, with_optimizer=False, create=True)
        self._sampler_adapters[model_path] = (adapter, version)
        self._sampler_adapters.move_to_end(model_path)
        while len(self._sampler_adapters) > self.max_sampler_adapters:
            _, (old, _) = self._sampler_adapters.popitem(last=False)
            if self.engine.has_adapter(old):
                self.engine.remove_adapter(old)
        return adapter

    def drop_sampler_weights(self, model_path: str) -> None:
        """Unload the adapter cached for these weights (their folder is being deleted)."""
        with self._lock:
            cached = self._sampler_adapters.pop(str(model_path), None)
            if cached is not None and self.engine is not None and self.engine.has_adapter(cached[0]):
                self.engine.remove_adapter(cached[0])

    def sample(self, sampler_id: str, args: SampleArgs) -> SampleResult:
        try:
            record = self.samplers[sampler_id]
        except KeyError:
            raise NotFoundError(f"no sampler {sampler_id!r}", field="sampler_id") from None
        adapter = self._sampler_adapter(record.model_path) if record.model_path else None
        if self.engine is None:
            raise RuntimeError("the model's workers are not running")
        return self.engine.sample(adapter, args.prompt_tokens, args.params, args.num_samples, **args.scoring())

    def release_sampler(self, sampler_id: str) -> None:
        self.samplers.pop(sampler_id, None)
