"""The interfaces between scheduling and compute: a training backend and a sampling backend.

Split of responsibilities:
- A **backend** owns model state and compute: the base model, the resident adapters (weights,
  gradients, optimizer state) and the passes that run on them. It knows nothing of tenants,
  sessions, request order, the store, or where files live.
- The **scheduler** (or local mode's `ModelService`) owns everything else: which requests run
  together and in what order, per-tenant fairness and quotas, the store, checkpoint and offload
  paths, and which adapters stay resident.

Compute entry points take a batch of requests from any tenants and return one `Outcome` per
request id: its result, or that request's own error. One tenant's bad datum fails only that
tenant's request; the others' results are exactly what they would be alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from twinkle.errors import TwinkleError, error_from_dict
from twinkle.types import (AdamParams, CheckpointInfo, Datum, ImagePart, LoraConfig, LRSchedule, SamplingParams,
                           TrainState)
from twinkle.vision import ImageLimits

CustomLoss = Callable[..., object]
BackendName = Literal["transformers", "megatron"]


@dataclass
class BackendConfig:
    """What a backend needs to load its base model; the scheduler derives it from `ModelConfig`."""

    base_model: str
    backend: BackendName = "transformers"
    state_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"  # "auto": cuda when this process has a GPU
    max_lora_rank: int = 128
    max_adapters: int = 64  # resident adapter slots (training models and sampler weights together)
    micro_batch_tokens: int = 8192  # padded tokens per forward pass; bounds activation memory
    default_max_tokens: int = 1024
    num_threads: int | None = None
    # the server's image limits (`LimitsConfig`), so the worker re-checks images as the ingress did
    image_limits: ImageLimits = field(default_factory=ImageLimits)


# ------------------------------------------------------------------ requests
@dataclass
class ForwardRequest:
    """forward (backward=False) or forward_backward of one request on one adapter."""

    request_id: str
    adapter_id: str
    data: Sequence[Datum]
    loss: str | CustomLoss = "cross_entropy"
    loss_config: dict | None = None
    backward: bool = True
    progress: tuple[int, int] | None = None  # (samples, tokens) of the whole batch when `data` is a shard

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d.input_tokens) for d in self.data))


@dataclass
class StepRequest:
    request_id: str
    adapter_id: str
    adam: AdamParams | None = None  # None: the adapter's own settings


@dataclass
class SampleRequest:
    request_id: str
    adapter_id: str | None  # None: the bare base model
    prompt_tokens: Sequence[int] | np.ndarray
    params: SamplingParams = field(default_factory=SamplingParams)
    num_samples: int = 1
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt_tokens_k: int = 0
    images: list[ImagePart] = field(default_factory=list)  # image runs of the prompt (vision-language models)


@dataclass
class Outcome:
    """A request's result, or its error (as a dict, so it crosses process boundaries intact)."""

    result: Any = None
    error: dict | None = None

    @classmethod
    def failure(cls, exc: TwinkleError) -> "Outcome":
        return cls(error={**exc.to_dict(), "status_code": exc.status_code})

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> Any:
        """The result, or raise the request's error."""
        if self.error is not None:
            raise error_from_dict(self.error, self.error.get("status_code"))
        return self.result


Outcomes = dict[str, Outcome]


def run_one(entry_point: Callable[[list], Outcomes], request) -> Any:
    """Run one request through a batched entry point and return its result (or raise its error)."""
    return entry_point([request])[request.request_id].unwrap()


# ---------------------------------------------------------------- interfaces
class SamplingBackend(ABC):
    """Samples continuations for many requests, each on its own adapter (or the base model)."""

    @abstractmethod
    def info(self) -> dict:
        """Model facts: base_model, model_path, vocab_size, max_context, eos_token_ids, arch, max_lora_rank."""

    @abstractmethod
    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Load a PEFT folder's weights for sampling under `adapter_id` (replacing what it held)."""

    @abstractmethod
    def has_adapter(self, adapter_id: str) -> bool: ...

    @abstractmethod
    def remove_adapter(self, adapter_id: str) -> None: ...

    @abstractmethod
    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        """Sample every request, batched across requests and adapters; SampleResult per request id."""


class TrainingBackend(ABC):
    """Trains many adapters on one base model; forward_backward batches requests of any adapters."""

    @abstractmethod
    def info(self) -> dict: ...

    @abstractmethod
    def create_adapter(self, adapter_id: str, lora: LoraConfig | None = None, *, adam: AdamParams | None = None,
                       schedule: LRSchedule | None = None) -> TrainState:
        """A freshly initialised adapter (B = 0: the model is unchanged until trained)."""

    @abstractmethod
    def remove_adapter(self, adapter_id: str) -> None: ...

    @abstractmethod
    def has_adapter(self, adapter_id: str) -> bool: ...

    @abstractmethod
    def describe(self, adapter_id: str) -> dict:
        """lora, adam, schedule, train_state and metadata of an adapter."""

    @abstractmethod
    def forward_backward(self, requests: Sequence[ForwardRequest]) -> Outcomes:
        """Loss and per-token logprobs of every request (ForwardResult), in shared passes over the base
        model; requests with `backward` accumulate gradients into their adapter until `optim_step`."""

    @abstractmethod
    def optim_step(self, requests: Sequence[StepRequest]) -> Outcomes:
        """Apply each adapter's AdamW step to its accumulated gradients, then clear them (StepResult)."""

    @abstractmethod
    def save(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True, overwrite: bool = True,
             kind: str = "weights", include_gradients: bool = False, metadata: dict | None = None) -> CheckpointInfo:
        """Write the adapter as a standard PEFT folder, atomically (optionally optimizer + trainer state)."""

    @abstractmethod
    def load(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True,
             create: bool = True) -> TrainState:
        """Load a PEFT folder into `adapter_id` (created if needed), optionally with its optimizer."""

    def sync_gradients(self, adapter_ids: Sequence[str], all_reduce: Callable[[Any], None]) -> None:
        """Data parallelism: sum these adapters' accumulated gradients across ranks with `all_reduce`
        (every rank calls this with the same ids in the same order)."""
        raise NotImplementedError(f"{type(self).__name__} does not run data-parallel")

    def train_state(self, adapter_id: str) -> TrainState:
        return self.describe(adapter_id)["train_state"]

    def lora_config(self, adapter_id: str) -> LoraConfig:
        return self.describe(adapter_id)["lora"]

