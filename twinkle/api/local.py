"""Local mode: the API served in this process, with backends in-process or in local Ray actors.

`LocalBackend` owns one `ModelService` per base model and runs every call on one worker thread in
submission order, so futures complete in order and a script can pipeline its calls.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import uuid
from pathlib import Path

from twinkle.api.futures import Future
from twinkle.api.service import ModelService
from twinkle.api.spec import API_METHODS
from twinkle.checkpoint import base_model_of
from twinkle.errors import InvalidInputError, NotFoundError
from twinkle.paths import default_state_dir, safe_join


class LocalBackend:
    """Runs the API in this process; `use_ray=True` puts each base model's backend in Ray actors."""

    def __init__(self, state_dir: str | os.PathLike | None = None, *, use_ray: bool = False,
                 ray_address: str | None = None, num_workers: int = 1, engine_options: dict | None = None,
                 allow_custom_loss: bool = True) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.use_ray = use_ray
        self.ray_address = ray_address
        self.num_workers = num_workers
        self.engine_options = dict(engine_options or {})
        self.allow_custom_loss = allow_custom_loss
        self.services: dict[str, ModelService] = {}
        self.owner: dict[str, str] = {}  # model or sampler id -> base model
        self._ids = itertools.count(1)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinkle-local")
        self._groups = []
        self._tokenizers: dict = {}
        if use_ray:  # in the caller's thread: Ray installs signal handlers only from the main thread
            from twinkle.actors import init_ray

            init_ray(ray_address)

    # ------------------------------------------------------------ backends
    def _backend_config(self, base_model: str):
        from twinkle.backends.base import BackendConfig

        return BackendConfig(base_model=base_model, state_dir=str(self.state_dir), **self.engine_options)

    def _make_backend(self, base_model: str):
        """The same factory as the server's workers: in this process, or in a Ray actor group."""
        if not self.use_ray:
            from twinkle.backends.factory import make_training_backend

            return make_training_backend(self._backend_config(base_model))
        from twinkle.actors import ActorGroup
        from twinkle.actors.remote_backend import RayBackend
        from twinkle.actors.workers import WORKER_THREADS, BackendWorker

        group = ActorGroup(BackendWorker, self.num_workers, init_kwargs={"config": self._backend_config(base_model)},
                           max_concurrency=WORKER_THREADS)
        self._groups.append(group)
        return RayBackend(group)

    def _service(self, base_model: str) -> ModelService:
        service = self.services.get(base_model)
        if service is None:
            service = ModelService(base_model, self._make_backend(base_model), self._checkpoint_path,
                                   offload_path=lambda model_id: safe_join(self.state_dir / "offload", model_id),
                                   allow_custom_loss=self.allow_custom_loss)
            self.services[base_model] = service
        return service

    def _checkpoint_path(self, model_id: str, kind: str, name: str) -> Path:
        return safe_join(self.state_dir / "checkpoints", model_id, kind, name)

    # ---------------------------------------------------------------- calls
    def call(self, method: str, target_id: str | None, args) -> Future:
        spec = API_METHODS[method]
        args = spec.args.model_validate(args) if not isinstance(args, spec.args) else args
        return Future(self._executor.submit(self._run, method, target_id, args))

    def _base_model_for(self, args) -> str:
        base = getattr(args, "base_model", None)
        path = getattr(args, "path", None) or getattr(args, "model_path", None)
        if base is None and path:
            base = base_model_of(path)
        if base is None:
            raise InvalidInputError("say which base model to use (base_model)", field="base_model")
        return base

    def _run(self, method: str, target_id: str | None, args):
        spec = API_METHODS[method]
        if spec.target == "service":
            base = self._base_model_for(args)
            service = self._service(base)
            prefix = "model" if method.startswith("create_model") else "sampler"
            new_id = f"{prefix}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"  # unique in a shared state dir
            result = service.call(method, new_id, args)
            self.owner[new_id] = base
            return result
        if target_id not in self.owner:
            raise NotFoundError(f"unknown id {target_id!r}", field="model_id")
        result = self.services[self.owner[target_id]].call(method, target_id, args)
        if method == "create_sampler_from_model":
            self.owner[result.sampler_id] = self.owner[target_id]
        if method == "close_model":
            self.owner.pop(target_id, None)
        return result

    def get_tokenizer(self, base_model: str, tokenizer_path: str):
        from twinkle.modeling import load_tokenizer

        if tokenizer_path not in self._tokenizers:
            self._tokenizers[tokenizer_path] = load_tokenizer(tokenizer_path)
        return self._tokenizers[tokenizer_path]

    def get_image_processor(self, base_model: str, tokenizer_path: str):
        from twinkle.chat_images import load_image_processor

        key = ("image_processor", tokenizer_path)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_image_processor(tokenizer_path, base_model)
        return self._tokenizers[key]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for group in self._groups:
            group.shutdown()
        self._groups.clear()
        self.services.clear()
