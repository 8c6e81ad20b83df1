"""The one description of Twinkle's training API.

Every method of the API is listed here once, with the pydantic models of its arguments and its
result. Local mode, the Ray actors, the server's native routes and the HTTP client are all derived
from this table, so adding a method here adds it everywhere. No torch, no transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from twinkle.types import (AdamParams, Array, CheckpointInfo, Datum, ForwardResult, ImagePart, LoraConfig, LRSchedule,
                           SampleResult, SamplingParams, StepResult, TrainState, _Model)

Target = Literal["service", "model", "sampler"]


class CreateModelArgs(_Model):
    base_model: str
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optimizer: AdamParams = Field(default_factory=AdamParams)
    schedule: LRSchedule | None = None
    loss: str = "cross_entropy"
    loss_config: dict[str, float | str] = Field(default_factory=dict)
    grad_accumulation_steps: int = Field(1, ge=1)
    name: str | None = None


class ModelInfo(_Model):
    model_id: str
    base_model: str
    lora: LoraConfig
    optimizer: AdamParams
    schedule: LRSchedule | None = None
    loss: str
    loss_config: dict[str, float | str] = Field(default_factory=dict)
    grad_accumulation_steps: int = 1
    vocab_size: int
    max_context: int
    tokenizer_path: str
    train_state: TrainState = Field(default_factory=TrainState)
    recovered: str | None = None  # set when the server lost live state and restored an earlier one


class ForwardArgs(_Model):
    data: list[Datum]
    loss: str | None = None  # None: the model's default loss
    loss_config: dict[str, float | str] | None = None
    custom_loss: bytes | None = None  # a cloudpickled fn(logprobs, loss_inputs[, config])


class StepArgs(_Model):
    optimizer: AdamParams | None = None  # None: the model's optimizer settings (and schedule)


class SaveArgs(_Model):
    name: str
    with_optimizer: bool = True
    overwrite: bool = True
    kind: Literal["weights", "sampler_weights"] = "weights"


class LoadArgs(_Model):
    path: str
    with_optimizer: bool = True


class FromCheckpointArgs(_Model):
    path: str
    with_optimizer: bool = True
    base_model: str | None = None
    name: str | None = None


class Empty(_Model):
    pass


class CreateSamplerArgs(_Model):
    base_model: str | None = None
    model_path: str | None = None


class SamplerInfo(_Model):
    sampler_id: str
    base_model: str
    model_path: str | None = None
    vocab_size: int
    max_context: int
    tokenizer_path: str


class SampleArgs(_Model):
    prompt_tokens: Array
    params: SamplingParams = Field(default_factory=SamplingParams)
    num_samples: int = Field(1, ge=1)
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(0, ge=0)
    topk_sample_logprobs: int = Field(0, ge=0)
    target_prompt_logprobs: Array | None = None  # int [len(prompt) - 1, K]; -1 asks for nothing
    prompt_alt_tokens_k: int = Field(0, ge=0)
    images: list[ImagePart] = Field(default_factory=list)  # image runs of the prompt (vision-language models)

    def scoring(self) -> dict:
        """The options besides prompt, params and num_samples, as keyword arguments of Engine.sample."""
        return {"include_prompt_logprobs": self.include_prompt_logprobs,
                "topk_prompt_logprobs": self.topk_prompt_logprobs,
                "topk_sample_logprobs": self.topk_sample_logprobs,
                "target_prompt_logprobs": self.target_prompt_logprobs,
                "prompt_alt_tokens_k": self.prompt_alt_tokens_k}


class SaveSamplerArgs(_Model):
    name: str | None = None
    sampler_id: str | None = None  # chosen by the server; None derives one from the name


@dataclass(frozen=True)
class ApiMethod:
    """One API method: which object it acts on, its argument and result models, and whether it
    changes state (mutating calls carry a sequence id and are de-duplicated on retry)."""

    name: str
    target: Target
    args: type[_Model]
    result: type[_Model]
    mutating: bool
    doc: str


API_METHODS: dict[str, ApiMethod] = {
    m.name: m
    for m in (
        ApiMethod("create_model", "service", CreateModelArgs, ModelInfo, True,
                  "Create a training model: a new LoRA adapter on a base model."),
        ApiMethod("create_model_from_checkpoint", "service", FromCheckpointArgs, ModelInfo, True,
                  "Create a training model from a saved checkpoint (optionally with its optimizer)."),
        ApiMethod("get_info", "model", Empty, ModelInfo, False, "Describe a training model."),
        ApiMethod("forward", "model", ForwardArgs, ForwardResult, False,
                  "Loss and per-token logprobs without gradients."),
        ApiMethod("forward_backward", "model", ForwardArgs, ForwardResult, True,
                  "Loss and logprobs; accumulate gradients until step."),
        ApiMethod("step", "model", StepArgs, StepResult, True,
                  "Optimizer step (every grad_accumulation_steps calls), then clear gradients."),
        ApiMethod("save", "model", SaveArgs, CheckpointInfo, True, "Save the adapter (and optimizer) atomically."),
        ApiMethod("load", "model", LoadArgs, TrainState, True, "Load a checkpoint into this model."),
        ApiMethod("train_state", "model", Empty, TrainState, False, "Progress counters: step, samples, tokens."),
        ApiMethod("create_sampler_from_model", "model", SaveSamplerArgs, SamplerInfo, True,
                  "Snapshot the current weights and return a sampler for them."),
        ApiMethod("close_model", "model", Empty, Empty, True, "Release the model's adapter."),
        ApiMethod("create_sampler", "service", CreateSamplerArgs, SamplerInfo, True,
                  "A sampler for a base model or a saved checkpoint."),
        ApiMethod("sample", "sampler", SampleArgs, SampleResult, False,
                  "Sample continuations of a prompt, with logprobs."),
    )
}
