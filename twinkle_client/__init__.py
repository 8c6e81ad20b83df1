"""Twinkle's training API against a remote server: change `from twinkle import ...` to
`from twinkle_client import ...` and nothing else.

    from twinkle_client import init_twinkle_client, TrainingModel, LoraConfig
    init_twinkle_client("http://127.0.0.1:8000", api_key="...")   # or $TWINKLE_SERVER_URL / $TWINKLE_API_KEY
    model = TrainingModel("twinkle-tiny", LoraConfig(rank=16, seed=0))
"""

from twinkle import errors
from twinkle.api.futures import Future
from twinkle.api.spec import ModelInfo, SamplerInfo
from twinkle.client.connect import init_ray_client, init_twinkle_client
from twinkle.client.objects import Sampler, TrainingModel
from twinkle.types import (AdamParams, CheckpointInfo, Datum, ForwardResult, LoraConfig, LRSchedule, SampledSequence,
                           SampleResult, SamplingParams, StepResult, TrainState)

__all__ = [
    "AdamParams", "CheckpointInfo", "Datum", "ForwardResult", "Future", "LRSchedule", "LoraConfig", "ModelInfo",
    "SampleResult", "SampledSequence", "Sampler", "SamplerInfo", "SamplingParams", "StepResult", "TrainState",
    "TrainingModel", "errors", "init_ray_client", "init_twinkle_client",
]
