"""Twinkle: train and sample LoRA adapters on shared base models, locally, on Ray, or over HTTP.

The public API is importable without torch (thin clients use it too); the engine loads lazily.

    import twinkle
    model = twinkle.TrainingModel("twinkle-tiny", twinkle.LoraConfig(rank=16, seed=0))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "init": "twinkle.api.modes",
    "shutdown": "twinkle.api.context",
    "TrainingModel": "twinkle.api.objects",
    "Sampler": "twinkle.api.objects",
    "Future": "twinkle.api.futures",
    "ModelInfo": "twinkle.api.spec",
    "SamplerInfo": "twinkle.api.spec",
    "AdamParams": "twinkle.types",
    "CheckpointInfo": "twinkle.types",
    "Datum": "twinkle.types",
    "ForwardResult": "twinkle.types",
    "LoraConfig": "twinkle.types",
    "LRSchedule": "twinkle.types",
    "SampledSequence": "twinkle.types",
    "SampleResult": "twinkle.types",
    "SamplingParams": "twinkle.types",
    "StepResult": "twinkle.types",
    "TrainState": "twinkle.types",
    "errors": "twinkle.errors",
    "chat": "twinkle.chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'twinkle' has no attribute {name!r}")
    module = import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from twinkle import chat, errors  # noqa: F401
    from twinkle.api.modes import init, shutdown  # noqa: F401
    from twinkle.api.futures import Future  # noqa: F401
    from twinkle.api.objects import Sampler, TrainingModel  # noqa: F401
    from twinkle.api.spec import ModelInfo, SamplerInfo  # noqa: F401
    from twinkle.types import (AdamParams, CheckpointInfo, Datum, ForwardResult, LoraConfig,  # noqa: F401
                               LRSchedule, SampledSequence, SampleResult, SamplingParams, StepResult, TrainState)
