"""The objects users train and sample with: `TrainingModel` and `Sampler`.

They hold ids and plain data only; every call goes through a backend (in-process, Ray actors, or
HTTP) and returns a `Future`. The same script runs unchanged on any backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from twinkle.api.context import current_backend
from twinkle.api.futures import Future
from twinkle.api.spec import (CreateModelArgs, CreateSamplerArgs, Empty, ForwardArgs, FromCheckpointArgs, LoadArgs,
                              ModelInfo, SampleArgs, SamplerInfo, SaveArgs, SaveSamplerArgs, StepArgs)
from twinkle.errors import InvalidInputError
from twinkle.types import (AdamParams, CheckpointInfo, Datum, ForwardResult, ImagePart, LoraConfig, LRSchedule,
                           SampleResult, SamplingParams, StepResult, TrainState)


def _args(model: type, **fields):
    """Build call arguments, turning validation errors into InvalidInputError before anything is sent."""
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(first.get("msg", "invalid value"),
                                field=".".join(str(p) for p in first.get("loc", ())) or None) from None


def _as_data(data: Iterable[Datum | dict]) -> list[Datum]:
    try:
        return [d if isinstance(d, Datum) else Datum.model_validate(d) for d in data]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(first.get("msg", "invalid datum"),
                                field="data." + ".".join(str(p) for p in first.get("loc", ()))) from None


def pickle_loss(fn: Callable) -> bytes:
    """Pickle a user's loss by value, so the server need not import the module it was written in."""
    import sys

    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    by_value = module is not None and module.__name__ not in ("__main__", "builtins") \
        and not module.__name__.startswith(("twinkle", "torch", "numpy"))
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(fn)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


class TrainingModel:
    """A LoRA adapter being trained on a base model.

    >>> model = TrainingModel("twinkle-tiny", LoraConfig(rank=16, seed=0), optimizer=AdamParams(learning_rate=1e-3))
    >>> model.forward_backward(batch); metrics = model.step().result().metrics
    """

    def __init__(self, base_model: str, lora: LoraConfig | None = None, *, optimizer: AdamParams | None = None,
                 schedule: LRSchedule | None = None, loss: str = "cross_entropy",
                 loss_config: dict[str, Any] | None = None, grad_accumulation_steps: int = 1,
                 name: str | None = None, backend=None, _info: ModelInfo | None = None) -> None:
        self._backend = backend or current_backend()
        if _info is None:
            args = _args(CreateModelArgs, base_model=base_model, lora=lora or LoraConfig(),
                         optimizer=optimizer or AdamParams(), schedule=schedule, loss=loss,
                         loss_config=loss_config or {}, grad_accumulation_steps=grad_accumulation_steps, name=name)
            _info = self._backend.call("create_model", None, args).result()
        self.info: ModelInfo = _info
        self.model_id = _info.model_id

    @classmethod
    def from_checkpoint(cls, path: str, *, with_optimizer: bool = True, base_model: str | None = None,
                        name: str | None = None, backend=None) -> "TrainingModel":
        """Resume from a saved checkpoint: weights, and optimizer + progress counters if asked."""
        backend = backend or current_backend()
        args = _args(FromCheckpointArgs, path=path, with_optimizer=with_optimizer, base_model=base_model, name=name)
        info = backend.call("create_model_from_checkpoint", None, args).result()
        return cls(info.base_model, backend=backend, _info=info)

    def _call(self, method: str, args) -> Future:
        return self._backend.call(method, self.model_id, args)

    def forward(self, data: Sequence[Datum | dict], loss: str | None = None,
                loss_config: dict[str, Any] | None = None) -> Future[ForwardResult]:
        """Loss and per-token logprobs of the targets, without gradients."""
        return self._call("forward", _args(ForwardArgs, data=_as_data(data), loss=loss, loss_config=loss_config))

    def forward_backward(self, data: Sequence[Datum | dict], loss: str | None = None,
                         loss_config: dict[str, Any] | None = None) -> Future[ForwardResult]:
        """Loss and logprobs; gradients accumulate until `step`. `loss` defaults to the model's."""
        return self._call("forward_backward", _args(ForwardArgs, data=_as_data(data), loss=loss, loss_config=loss_config))

    def forward_backward_custom(self, data: Sequence[Datum | dict], loss_fn: Callable,
                                loss_config: dict[str, Any] | None = None) -> Future[ForwardResult]:
        """Train with your own loss: loss_fn(logprobs, loss_inputs[, config]) -> loss or (loss, metrics).

        `logprobs` is a list of per-datum tensors with gradient, `loss_inputs` the datums' inputs as
        tensors. Against a server this needs `trust_remote_code: true` in its config.
        """
        return self._call("forward_backward", _args(ForwardArgs, data=_as_data(data),
                                                                custom_loss=pickle_loss(loss_fn), loss_config=loss_config))

    def step(self, optimizer: AdamParams | None = None) -> Future[StepResult]:
        """Optimizer step; `optimizer` overrides the model's settings for this step only."""
        return self._call("step", _args(StepArgs, optimizer=optimizer))

    def save(self, name: str, *, with_optimizer: bool = True, overwrite: bool = True) -> Future[CheckpointInfo]:
        return self._call("save", _args(SaveArgs, name=name, with_optimizer=with_optimizer, overwrite=overwrite))

    def load(self, path: str, *, with_optimizer: bool = True) -> Future[TrainState]:
        return self._call("load", _args(LoadArgs, path=path, with_optimizer=with_optimizer))

    def train_state(self) -> Future[TrainState]:
        return self._call("train_state", Empty())

    def get_info(self) -> Future[ModelInfo]:
        return self._call("get_info", Empty())

    def sampler(self, name: str | None = None) -> "Sampler":
        """A sampler for a snapshot of the current weights (later training does not change it)."""
        info = self._call("create_sampler_from_model", _args(SaveSamplerArgs, name=name)).result()
        return Sampler(backend=self._backend, _info=info)

    def get_tokenizer(self):
        return self._backend.get_tokenizer(self.info.base_model, self.info.tokenizer_path)

    def get_image_processor(self):
        """The model's image processor (vision-language models), to count image tokens with
        `twinkle.chat.supervised_datum(..., image_processor=...)`."""
        return self._backend.get_image_processor(self.info.base_model, self.info.tokenizer_path)

    def close(self) -> None:
        self._call("close_model", Empty()).result()


class Sampler:
    """Samples from a base model, or from a saved adapter (`model_path`)."""

    def __init__(self, base_model: str | None = None, model_path: str | None = None, *, backend=None,
                 _info: SamplerInfo | None = None) -> None:
        self._backend = backend or current_backend()
        if _info is None:
            args = _args(CreateSamplerArgs, base_model=base_model, model_path=model_path)
            _info = self._backend.call("create_sampler", None, args).result()
        self.info: SamplerInfo = _info
        self.sampler_id = _info.sampler_id

    def sample(self, prompt_tokens: Sequence[int], params: SamplingParams | None = None, num_samples: int = 1,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               topk_sample_logprobs: int = 0, target_prompt_logprobs: Sequence[Sequence[int]] | None = None,
               prompt_alt_tokens_k: int = 0, images: Sequence[ImagePart] | None = None) -> Future[SampleResult]:
        """Sample continuations of `prompt_tokens`. `images`: the image runs of the prompt (default:
        those a `twinkle.chat.build_prompt` prompt carries)."""
        if images is None:
            images = getattr(prompt_tokens, "images", None) or []
        args = _args(SampleArgs, prompt_tokens=list(prompt_tokens), params=params or SamplingParams(),
                     num_samples=num_samples, include_prompt_logprobs=include_prompt_logprobs,
                     topk_prompt_logprobs=topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs,
                     target_prompt_logprobs=target_prompt_logprobs, prompt_alt_tokens_k=prompt_alt_tokens_k,
                     images=list(images))
        return self._backend.call("sample", self.sampler_id, args)

    def compute_logprobs(self, tokens: Sequence[int], images: Sequence[ImagePart] | None = None
                         ) -> Future[list[float | None]]:
        """Logprob of every token given the ones before it (the first is None); `images` as in `sample`."""
        return self.sample(tokens, SamplingParams(max_tokens=1), include_prompt_logprobs=True, images=images).then(
            lambda r: r.prompt_logprobs)

    def get_tokenizer(self):
        return self._backend.get_tokenizer(self.info.base_model, self.info.tokenizer_path)

    def get_image_processor(self):
        """The model's image processor (vision-language models), as `TrainingModel.get_image_processor`."""
        return self._backend.get_image_processor(self.info.base_model, self.info.tokenizer_path)
