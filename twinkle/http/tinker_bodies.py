"""The JSON request bodies of the Tinker wire protocol, as the SDK sends them.

Field names and defaults follow the SDK; unknown fields are ignored (see `common.Body`). The protobuf
`forward_backward` body is parsed by `tinker_codec` instead.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from twinkle.http.common import Body
from twinkle.types import INT64_MAX, Seed, SeqId

# counters that become part of ids, and other integers that are stored: non-negative int64
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


class CreateSessionBody(Body):
    tags: list[str] = []
    user_metadata: dict | None = None
    sdk_version: str | None = None


class SessionIdBody(Body):
    session_id: str


class LoraBody(Body):
    rank: int = 32
    seed: Seed | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True
    train_vision: bool = False  # Twinkle's own: also adapt a vision-language model's vision tower


class CreateModelBody(Body):
    session_id: str
    model_seq_id: Count
    base_model: str
    lora_config: LoraBody | None = None
    optimizer_config: dict | None = None
    user_metadata: dict | None = None


class ModelIdBody(Body):
    model_id: str
    seq_id: SeqId | None = None


class AdamBody(Body):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepBody(Body):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: AdamBody | None = None
    optimizer_params: dict | None = None


class SaveWeightsBody(Body):
    model_id: str
    seq_id: SeqId | None = None
    path: str | None = None
    ttl_seconds: Count | None = None
    overwrite: bool = False
    user_metadata: dict | None = None
    sampling_session_seq_id: Count | None = None
    kind: str | None = None


class LoadWeightsBody(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: Count | None = None
    base_model: str | None = None
    user_metadata: dict | None = None


class CreateSamplingSessionBody(Body):
    session_id: str
    sampling_session_seq_id: Count = 0
    model_path: str | None = None
    base_model: str | None = None


class SampleBody(Body):
    sampling_session_id: str | None = None
    seq_id: SeqId | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = 1
    prompt: dict
    sampling_params: dict = {}
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: Count | None = None
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0


class RetrieveBody(Body):
    request_id: str
    allow_metadata_only: bool = False
