"""The API's behaviour for one base model, independent of where the backend runs.

`ModelService` implements every method of `spec.API_METHODS` on top of a training backend and a
sampling backend (the same object when sampling is colocated): in-process, or proxies to Ray
workers. Local mode calls it one request at a time; the server's scheduler hands it batches
(`run_forward`, `run_steps`, `run_samples`) gathered from many tenants. Either way the results
are the same, because a backend's batched passes reproduce each request alone.

Threads: the scheduler calls model methods from its train lane and sampler methods from its sample
lane; the bookkeeping they share is guarded by `_lock`, which is never held during compute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twinkle.api.spec import (API_METHODS, CreateModelArgs, CreateSamplerArgs, Empty, ForwardArgs, FromCheckpointArgs,
                              LoadArgs, ModelInfo, SampleArgs, SamplerInfo, SaveArgs, SaveSamplerArgs, StepArgs)
from twinkle.backends.base import ForwardRequest, SampleRequest, SamplingBackend, StepRequest, TrainingBackend
from twinkle.errors import InvalidInputError, NotFoundError, PermissionDeniedError, StateLostError, TwinkleError
from twinkle.layout import SNAPSHOT_PREFIX, SNAPSHOTS_KEPT
from twinkle.types import CheckpointInfo, ForwardResult, SampleResult, StepResult, TrainState

CheckpointPathFn = Callable[[str, str, str], Path]  # (model_id, kind, name) -> folder
OffloadPathFn = Callable[[str], Path]  # model_id -> folder for its offloaded state
RecoverFn = Callable[[str], tuple[Path | None, str]]  # model_id -> (newest saved state or None, what was lost)
Result = object  # a method's result, or the TwinkleError it failed with
CREATE_MODEL_METHODS = ("create_model", "create_model_from_checkpoint")


@dataclass
class _ModelRecord:
    args: CreateModelArgs
    tenant: str | None = None
    pending_micro_steps: int = 0
    step: int = 0  # optimizer steps applied (what a crash would lose back to the last saved state)
    recovered: str | None = None  # what the server restored after losing live state


@dataclass
class _SamplerRecord:
    base_model: str
    model_path: str | None


@dataclass
class Work:
    """One request handed to a batched entry point."""

    request_id: str
    target_id: str
    args: object
    method: str = ""


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
    """Training models and samplers of one base model, on one training and one sampling backend."""

    def __init__(self, base_model: str, backend: TrainingBackend | None, checkpoint_path: CheckpointPathFn, *,
                 offload_path: OffloadPathFn | None = None, allow_custom_loss: bool = True,
                 max_sampler_adapters: int = 8, max_resident_models: int | None = None,
                 max_resident_per_tenant: int | Callable[[str], int] | None = None) -> None:
        self.base_model = base_model
        self.checkpoint_path = checkpoint_path
        self.offload_path = offload_path
        self.allow_custom_loss = allow_custom_loss
        self.max_sampler_adapters = max_sampler_adapters
        self.max_resident_models = max_resident_models
        self.max_resident_per_tenant = max_resident_per_tenant
        self.backend: TrainingBackend | None = None
        self.sampler_backend: SamplingBackend | None = None
        self.model_info: dict = {}
        self.models: dict[str, _ModelRecord] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # models whose adapter is in the backend (LRU)
        self._offloaded: dict[str, Path] = {}
        self._lost: dict[str, str] = {}  # model_id -> why its state is gone (a worker crashed, nothing saved)
        self.samplers: dict[str, _SamplerRecord] = {}
        self._sampler_adapters: OrderedDict[str, tuple[str, str]] = OrderedDict()  # path -> (adapter, version)
        self._snapshots: dict[str, list[str]] = {}  # model_id -> folders of its unnamed snapshots, oldest first
        self._lock = threading.RLock()
        self._sampler_lock = threading.RLock()  # sampler adapters: loaded by the sample lane, dropped by either
        self.offloads = 0
        self.restores = 0
        if backend is not None:
            self.attach_backend(backend)

    # ------------------------------------------------------ backend lifetime
    def attach_backend(self, backend: TrainingBackend, sampler: SamplingBackend | None = None) -> None:
        """Use `backend` (and `sampler`, default: the same backend) from now on; offloaded models are
        restored on their next request."""
        with self._lock, self._sampler_lock:
            self.backend = backend
            self.sampler_backend = sampler if sampler is not None else backend  # type: ignore[assignment]
            self.model_info = backend.info()
            self._sampler_adapters.clear()

    def attach_sampler(self, sampler: SamplingBackend) -> None:
        """New sampler workers beside the same training backend (the old ones died): sampler weights
        load into them again on their next use."""
        with self._sampler_lock:
            self.sampler_backend = sampler
            self._sampler_adapters.clear()

    def detach_backend(self) -> TrainingBackend | None:
        """Offload every model and let go of the backend (scale to zero); returns it for shutdown."""
        with self._lock, self._sampler_lock:
            for model_id in list(self._resident):
                self.offload(model_id)
            backend, self.backend, self.sampler_backend = self.backend, None, None
            self._sampler_adapters.clear()
            return backend

    def lose_backend(self, recover: RecoverFn) -> dict[str, str]:
        """The backend died with the live state of the resident models. Each comes back from the
        newest state `recover` finds (restored on its next request, noting what was lost), or is
        marked lost. Returns model_id -> note."""
        with self._lock, self._sampler_lock:
            notes = {}
            for model_id in list(self._resident):
                folder, note = recover(model_id)
                if folder is not None:
                    self._offloaded[model_id] = folder
                    self.models[model_id].recovered = note
                else:
                    self._lost[model_id] = note
                notes[model_id] = note
            self._resident.clear()
            self.backend = self.sampler_backend = None
            self._sampler_adapters.clear()
            return notes

    def adopt(self, model_id: str, args: CreateModelArgs, tenant: str | None, folder: Path | None,
              note: str | None = None) -> None:
        """Take on a model known only from the store and disk (after a server restart): it is
        restored from `folder` on its next request, or reported lost with `note` if there is none."""
        with self._lock:
            if model_id in self.models:
                return
            self.models[model_id] = _ModelRecord(args, tenant, recovered=note)
            if folder is not None:
                self._offloaded[model_id] = folder
            else:
                self._lost[model_id] = note or "the server holds no saved state of this model"

    def autosave(self, model_id: str) -> bool:
        """Write a resident model's full state to its offload folder (it stays resident), so a crash
        loses only the steps since; returns whether anything was written."""
        with self._lock:
            if model_id not in self._resident or self.offload_path is None:
                return False
            self.backend.save(model_id, self.offload_path(model_id), with_optimizer=True, include_gradients=True,
                              metadata=self._api_settings(model_id))
            return True

    @property
    def resident_models(self) -> list[str]:
        return list(self._resident)

    @property
    def lost_models(self) -> set[str]:
        return set(self._lost)

    def offload(self, model_id: str) -> None:
        """Save a model's adapter, optimizer and pending gradients to disk and free its slot."""
        with self._lock:
            if model_id not in self._resident:
                return
            if self.offload_path is None:
                raise RuntimeError("this service has no offload folder")
            folder = self.offload_path(model_id)
            self.backend.save(model_id, folder, with_optimizer=True, include_gradients=True,
                              metadata=self._api_settings(model_id))
            self.backend.remove_adapter(model_id)
            del self._resident[model_id]
            self._offloaded[model_id] = folder
            self.offloads += 1

    def _ensure_resident(self, model_ids: Sequence[str]) -> None:
        """Bring these models' adapters into the backend (restoring offloaded ones), evicting others LRU."""
        if self.backend is None:
            raise RuntimeError("the model's workers are not running")
        protected = set(model_ids)
        for model_id in model_ids:
            if model_id in self._resident:
                self._resident.move_to_end(model_id)
                continue
            self._make_room(model_id, protected)
            folder = self._offloaded.pop(model_id, None)
            if folder is not None:
                self.backend.load(model_id, folder, with_optimizer=True, create=True)
                self.restores += 1
            self._resident[model_id] = None

    def _make_room(self, model_id: str, protected: set[str] = frozenset()) -> None:
        """Offload least recently used models until `model_id` fits the resident limits (the
        service's, and its tenant's own share)."""
        if self.offload_path is None:
            return
        tenant = self.models[model_id].tenant if model_id in self.models else None
        limit = self.max_resident_per_tenant
        limit = limit(tenant) if callable(limit) and tenant is not None else limit
        if limit and tenant is not None:
            own = [m for m in self._resident if self.models[m].tenant == tenant and m not in protected]
            while own and sum(1 for m in self._resident if self.models[m].tenant == tenant) >= limit:
                self.offload(own.pop(0))
        if self.max_resident_models:
            while len(self._resident) >= self.max_resident_models:
                victims = [m for m in self._resident if m not in protected]
                if not victims:
                    raise TwinkleError(f"more than {self.max_resident_models} models in one pass")
                self.offload(victims[0])

    # ------------------------------------------------------------ dispatch
    def call(self, method: str, target_id: str | None, args, tenant: str | None = None):
        """Run one API method by name (local mode, and the scheduler's unbatched requests); `tenant`
        owns a model being created (its share of resident adapters is limited)."""
        spec = API_METHODS.get(method)
        if spec is None:
            raise NotFoundError(f"unknown API method {method!r}", field="method")
        if not isinstance(args, spec.args):
            args = spec.args.model_validate(args)
        if method in CREATE_MODEL_METHODS:
            return getattr(self, method)(target_id, args, tenant)
        return getattr(self, method)(target_id, args)

    # -------------------------------------------------------------- models
    def _record(self, model_id: str) -> _ModelRecord:
        with self._lock:
            try:
                record = self.models[model_id]
            except KeyError:
                raise NotFoundError(f"no training model {model_id!r}", field="model_id") from None
            if model_id in self._lost:
                raise StateLostError(self._lost[model_id], field="model_id")
            self._ensure_resident([model_id])
            return record

    def _info(self, model_id: str) -> ModelInfo:
        args = self._record(model_id).args
        described = self.backend.describe(model_id)
        return ModelInfo(
            model_id=model_id, base_model=self.base_model, lora=described["lora"], optimizer=described["adam"],
            schedule=described["schedule"], loss=args.loss, loss_config=args.loss_config,
            grad_accumulation_steps=args.grad_accumulation_steps, vocab_size=self.model_info["vocab_size"],
            max_context=self.model_info["max_context"], tokenizer_path=self.model_info["model_path"],
            train_state=described["train_state"], recovered=self.models[model_id].recovered,
        )

    def _check_default_loss(self, args: CreateModelArgs) -> None:
        from twinkle.validation import lookup_loss, resolve_loss_config

        resolve_loss_config(lookup_loss(args.loss), args.loss_config)

    def create_model(self, model_id: str, args: CreateModelArgs, tenant: str | None = None) -> ModelInfo:
        self._check_default_loss(args)
        with self._lock:
            self.models[model_id] = _ModelRecord(args, tenant)
            try:
                self._make_room(model_id)
                self.backend.create_adapter(model_id, args.lora, adam=args.optimizer, schedule=args.schedule)
            except BaseException:
                del self.models[model_id]
                raise
            self._resident[model_id] = None
        return self._info(model_id)

    def create_model_from_checkpoint(self, model_id: str, args: FromCheckpointArgs,
                                     tenant: str | None = None) -> ModelInfo:
        with self._lock:
            self.models[model_id] = _ModelRecord(CreateModelArgs(base_model=self.base_model), tenant)
            try:
                self._make_room(model_id)
                self.backend.load(model_id, args.path, with_optimizer=args.with_optimizer, create=True)
            except BaseException:
                del self.models[model_id]
                raise
            described = self.backend.describe(model_id)
            self.models[model_id].args = CreateModelArgs(
                base_model=self.base_model, lora=described["lora"], optimizer=described["adam"],
                schedule=described["schedule"], name=args.name, **self.settings_from(described))
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

    def run_forward(self, batch: Sequence[Work]) -> dict[str, Result]:
        """forward / forward_backward requests of any models, in shared passes; result or error per request."""
        results: dict[str, Result] = {}
        requests = []
        with self._lock:
            known = [w for w in batch if w.target_id in self.models and w.target_id not in self._lost]
            for work in batch:
                if work.target_id in self._lost:
                    results[work.request_id] = StateLostError(self._lost[work.target_id], field="model_id")
                elif work.target_id not in self.models:
                    results[work.request_id] = NotFoundError(f"no training model {work.target_id!r}",
                                                             field="model_id")
            self._ensure_resident(list(dict.fromkeys(w.target_id for w in known)))
            for work in known:
                try:
                    loss, config = self._loss_of(self.models[work.target_id], work.args)
                except TwinkleError as exc:
                    results[work.request_id] = exc
                    continue
                requests.append(ForwardRequest(work.request_id, work.target_id, work.args.data, loss, config,
                                               backward=work.method != "forward"))
        if requests:
            for request_id, outcome in self.backend.forward_backward(requests).items():
                results[request_id] = outcome.result if outcome.ok else _error(outcome)
        return results

    def forward(self, model_id: str, args: ForwardArgs) -> ForwardResult:
        return self._one(self.run_forward, Work("forward", model_id, args, "forward"))

    def forward_backward(self, model_id: str, args: ForwardArgs) -> ForwardResult:
        return self._one(self.run_forward, Work("forward_backward", model_id, args, "forward_backward"))

    def run_steps(self, batch: Sequence[Work]) -> dict[str, Result]:
        """`step` requests of any models: gradient accumulation counted, due optimizer steps applied together."""
        results: dict[str, Result] = {}
        due = []
        with self._lock:
            for work in batch:
                try:
                    record = self._record(work.target_id)
                except TwinkleError as exc:
                    results[work.request_id] = exc
                    continue
                record.pending_micro_steps += 1
                if record.pending_micro_steps < record.args.grad_accumulation_steps:
                    results[work.request_id] = StepResult(
                        metrics={"applied": 0.0, "accumulated": float(record.pending_micro_steps)})
                    continue
                record.pending_micro_steps = 0
                due.append(StepRequest(work.request_id, work.target_id, work.args.optimizer))
        if due:
            targets = {request.request_id: request.adapter_id for request in due}
            for request_id, outcome in self.backend.optim_step(due).items():
                if not outcome.ok:
                    results[request_id] = _error(outcome)
                    continue
                results[request_id] = StepResult(metrics={**outcome.result.metrics, "applied": 1.0})
                self.models[targets[request_id]].step = int(outcome.result.metrics.get("step", 0))
        return results

    def step(self, model_id: str, args: StepArgs) -> StepResult:
        return self._one(self.run_steps, Work("step", model_id, args, "step"))

    @staticmethod
    def _one(entry_point: Callable[[list[Work]], dict[str, Result]], work: Work):
        result = entry_point([work])[work.request_id]
        if isinstance(result, BaseException):
            raise result
        return result

    def _api_settings(self, model_id: str) -> dict:
        """The model's API settings, kept in every folder its state is saved to (and read back when a
        model is created from one)."""
        args = self.models[model_id].args
        return {"api": {"loss": args.loss, "loss_config": args.loss_config,
                        "grad_accumulation_steps": args.grad_accumulation_steps}}

    @staticmethod
    def settings_from(described: dict) -> dict:
        """CreateModelArgs fields recorded in a saved model's metadata."""
        return {k: v for k, v in described.get("metadata", {}).get("api", {}).items()
                if k in ("loss", "loss_config", "grad_accumulation_steps")}

    def save(self, model_id: str, args: SaveArgs) -> CheckpointInfo:
        self._record(model_id)
        path = self.checkpoint_path(model_id, args.kind, args.name)
        with_optimizer = args.with_optimizer and args.kind == "weights"
        return self.backend.save(model_id, path, with_optimizer=with_optimizer, overwrite=args.overwrite,
                                 kind=args.kind, metadata=self._api_settings(model_id))

    def load(self, model_id: str, args: LoadArgs) -> TrainState:
        self._record(model_id)
        return self.backend.load(model_id, args.path, with_optimizer=args.with_optimizer, create=False)

    def train_state(self, model_id: str, args: Empty) -> TrainState:
        self._record(model_id)
        return self.backend.train_state(model_id)

    def close_model(self, model_id: str, args: Empty) -> Empty:
        with self._lock:
            if model_id not in self.models:
                raise NotFoundError(f"no training model {model_id!r}", field="model_id")
            if model_id in self._resident:
                self.backend.remove_adapter(model_id)
                del self._resident[model_id]
            self._offloaded.pop(model_id, None)
            self._lost.pop(model_id, None)
            del self.models[model_id]
        return Empty()

    def create_sampler_from_model(self, model_id: str, args: SaveSamplerArgs) -> SamplerInfo:
        self._record(model_id)
        state = self.backend.train_state(model_id)
        name = args.name or f"{SNAPSHOT_PREFIX}{state.step}-{uuid.uuid4().hex[:8]}"
        info = self.save(model_id, SaveArgs(name=name, with_optimizer=False, kind="sampler_weights"))
        sampler_id = args.sampler_id or f"{model_id}/sampler/{name}"
        sampler = self._register_sampler(sampler_id, info.path)  # its weights load at its first sample
        if args.name is None:
            with self._lock:
                kept = self._snapshots.setdefault(model_id, [])
                kept.append(info.path)
                stale = kept[:-SNAPSHOTS_KEPT] if len(kept) > SNAPSHOTS_KEPT else []
                del kept[:len(stale)]
            for path in stale:
                self._delete_weights(path)
        return sampler

    def delete_snapshots(self, model_id: str) -> None:
        """Delete a model's unnamed sampler snapshots (its session ended)."""
        with self._lock:
            paths = self._snapshots.pop(model_id, [])
        for path in paths:
            self._delete_weights(path)

    def _delete_weights(self, path: str) -> None:
        self.drop_sampler_weights(path)
        shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ samplers
    def _register_sampler(self, sampler_id: str, model_path: str | None) -> SamplerInfo:
        with self._sampler_lock:
            self.samplers[sampler_id] = _SamplerRecord(self.base_model, model_path)
        return SamplerInfo(sampler_id=sampler_id, base_model=self.base_model, model_path=model_path,
                           vocab_size=self.model_info["vocab_size"], max_context=self.model_info["max_context"],
                           tokenizer_path=self.model_info["model_path"])

    def create_sampler(self, sampler_id: str, args: CreateSamplerArgs) -> SamplerInfo:
        if args.model_path is not None:
            self._sampler_adapter(args.model_path)  # load now: a bad path fails here, not at sample time
        return self._register_sampler(sampler_id, args.model_path)

    def _sampler_adapter(self, model_path: str) -> str:
        """The sampling adapter holding the weights saved at `model_path` (loaded on demand, LRU).

        A folder saved again under the same name is a new folder (atomic rename), so the cache is
        keyed by the folder's identity and a re-saved checkpoint is reloaded.
        """
        with self._sampler_lock:
            sampler = self.sampler_backend
            if sampler is None:
                raise RuntimeError("the model's workers are not running")
            try:
                stat = os.stat(model_path)
                version = f"{stat.st_ino}-{stat.st_mtime_ns}"
            except OSError:
                raise NotFoundError(f"the weights of this sampler ({Path(model_path).name}) were released; "
                                    "temporary snapshots are kept for a limited number of steps, so create a new "
                                    "sampler", field="model_path") from None
            cached = self._sampler_adapters.get(model_path)
            if cached is not None and cached[1] == version:
                self._sampler_adapters.move_to_end(model_path)
                return cached[0]
            adapter = "sampler:" + hashlib.sha256(str(model_path).encode()).hexdigest()[:16]
            while len(self._sampler_adapters) >= self.max_sampler_adapters:
                _, (old, _) = self._sampler_adapters.popitem(last=False)
                if sampler.has_adapter(old):
                    sampler.remove_adapter(old)
            sampler.load_adapter(adapter, model_path)
            self._sampler_adapters[model_path] = (adapter, version)
            return adapter

    def drop_sampler_weights(self, model_path: str) -> None:
        """Unload the adapter cached for these weights (their folder is being deleted)."""
        with self._sampler_lock:
            cached = self._sampler_adapters.pop(str(model_path), None)
            sampler = self.sampler_backend
            if cached is not None and sampler is not None and sampler.has_adapter(cached[0]):
                sampler.remove_adapter(cached[0])

    def run_samples(self, batch: Sequence[Work]) -> dict[str, Result]:
        """`sample` requests of any samplers (adapters), in shared generations; result or error per request."""
        results: dict[str, Result] = {}
        requests = []
        with self._sampler_lock:
            for work in batch:
                try:
                    record = self.samplers.get(work.target_id)
                    if record is None:
                        raise NotFoundError(f"no sampler {work.target_id!r}", field="sampler_id")
                    adapter = self._sampler_adapter(record.model_path) if record.model_path else None
                except TwinkleError as exc:
                    results[work.request_id] = exc
                    continue
                args: SampleArgs = work.args
                requests.append(SampleRequest(work.request_id, adapter, args.prompt_tokens, args.params,
                                              args.num_samples, **args.scoring(), images=list(args.images)))
            sampler = self.sampler_backend
        if requests:
            if sampler is None:
                raise RuntimeError("the model's workers are not running")
            for request_id, outcome in sampler.sample(requests).items():
                results[request_id] = outcome.result if outcome.ok else _error(outcome)
        return results

    def sample(self, sampler_id: str, args: SampleArgs) -> SampleResult:
        return self._one(self.run_samples, Work("sample", sampler_id, args, "sample"))

    def release_sampler(self, sampler_id: str) -> None:
        with self._sampler_lock:
            self.samplers.pop(sampler_id, None)


def _error(outcome) -> TwinkleError:
    from twinkle.errors import error_from_dict

    return error_from_dict(outcome.error, outcome.error.get("status_code"))

