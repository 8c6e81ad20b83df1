"""Plain-data types of Twinkle's API, shared by the core, the server and the clients.

Everything that crosses a process or network boundary is one of these pydantic models: numbers,
strings, lists and numpy arrays, never live tensors. This module imports neither torch nor any
transport, so thin clients can use it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from twinkle.errors import InvalidInputError


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError("expected a rectangular array of numbers")
    return array


INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
# a request's position in its model's order; stored as a SQLite INTEGER (int64)
SeqId = Annotated[int, Field(ge=0, le=INT64_MAX)]
# random seeds: what the Tinker protocol's uint64 seed holds
Seed = Annotated[int, Field(ge=0, le=UINT64_MAX)]

Array = Annotated[
    np.ndarray,
    BeforeValidator(_as_array),
    PlainSerializer(lambda a: a.tolist(), when_used="json"),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class LoraConfig(_Model):
    """A LoRA adapter on the base model, with Tinker's options.

    `alpha` defaults to 32 (the effective scale is alpha / rank, so the best learning rate does not
    depend on the rank). `seed` fixes the adapter's initial weights. `train_vision` (Twinkle's own
    option, off by default) also adapts every linear layer of a vision-language model's vision tower.
    """

    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0, allow_inf_nan=False)
    seed: Seed | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    train_vision: bool = False

    @model_validator(mode="after")
    def _something_to_train(self) -> "LoraConfig":
        if not (self.train_attn or self.train_mlp or self.train_unembed or self.train_vision):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed, train_vision must be true")
        return self


class AdamParams(_Model):
    """AdamW hyper-parameters (Tinker's defaults). `grad_clip_norm=0` means no clipping."""

    learning_rate: float = Field(1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(0.0, ge=0, allow_inf_nan=False)


class LRSchedule(_Model):
    """Learning-rate multiplier over optimizer steps: warmup, then constant, linear or cosine decay."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _needs_total(self) -> "LRSchedule":
        if self.kind != "constant" and self.total_steps is None:
            raise ValueError(f"a {self.kind} schedule needs total_steps")
        return self

    def factor(self, step: int) -> float:
        """Multiplier for the learning rate of optimizer step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class ImagePart(_Model):
    """An image inside a token sequence: `tokens` image placeholder tokens start at `position`.

    The placeholders stand in `input_tokens` (the model's image token id) so that every loss input
    lines up with the sequence as the model sees it; the worker decodes `data` and checks that its
    image processor gives exactly `tokens` tokens (see twinkle/vision.py)."""

    position: int = Field(ge=0)
    tokens: int = Field(ge=0, description="0: not counted yet (the server counts it for the model)")
    data: bytes
    format: Literal["png", "jpeg"]
    chunk: int | None = None  # its index among the request's chunks, to name it in errors


class Datum(_Model):
    """One training example: the input tokens and the per-token inputs of the loss.

    Position i of `input_tokens` predicts `loss_inputs["target_tokens"][i]`. Every loss input has
    leading dimension len(input_tokens) (or shape (N, K) for top-K targets and weights). `images`
    (vision-language models) say which runs of `input_tokens` are image placeholders.
    """

    input_tokens: Array
    loss_inputs: dict[str, Array] = Field(default_factory=dict)
    images: list[ImagePart] = Field(default_factory=list)

    @classmethod
    def from_sequence(cls, tokens: list[int], weights: list[float] | None = None) -> "Datum":
        """Next-token prediction over a full sequence: inputs tokens[:-1], targets tokens[1:]."""
        tokens = list(tokens)
        if len(tokens) < 2:
            raise InvalidInputError("a training sequence needs at least 2 tokens", field="tokens")
        w = [1.0] * (len(tokens) - 1) if weights is None else list(weights)[1:]
        return cls(
            input_tokens=np.asarray(tokens[:-1], dtype=np.int64),
            loss_inputs={
                "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                "weights": np.asarray(w, dtype=np.float32),
            },
        )


class ForwardResult(_Model):
    """Result of forward / forward_backward: per-datum outputs (at least `logprobs`) and metrics."""

    loss_outputs: list[dict[str, Array]]
    metrics: dict[str, float]


class StepResult(_Model):
    metrics: dict[str, float]


StopSpec = str | list[str] | list[int] | None


class SamplingParams(_Model):
    """How to sample. `stop=None` stops at the model's end-of-turn tokens; `stop=[]` never stops early."""

    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, le=2**31 - 1, description="-1 or 0: no top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed | None = None
    stop: StopSpec = None


class SampledSequence(_Model):
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[list[tuple[int, float]]] | None = None


class SampleResult(_Model):
    """Samples for one prompt. `prompt_logprobs[0]` is None: the first token has no context."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    # Row i scores prompt position i + 1 (requested with target_prompt_logprobs / prompt_alt_tokens_k).
    target_prompt_logprobs: list[list[float]] | None = None
    prompt_alt_tokens: list[list[int]] | None = None
    prompt_alt_logprobs: list[list[float]] | None = None


class CheckpointInfo(_Model):
    """A saved checkpoint folder: a PEFT adapter, optionally with optimizer and training state."""

    path: str
    name: str
    kind: Literal["weights", "sampler_weights"] = "weights"
    has_optimizer: bool = False
    step: int = 0


class TrainState(_Model):
    """Progress counters of a training model, restored on resume."""

    step: int = 0
    learning_rate: float = 0.0
    micro_batches: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)
