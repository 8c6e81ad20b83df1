"""Backends: where model state lives and compute runs (see `base` for the split of responsibilities)."""

from twinkle.backends.base import (BackendConfig, ForwardRequest, Outcome, Outcomes, SampleRequest, SamplingBackend,
                                   StepRequest, TrainingBackend, run_one)
from twinkle.backends.factory import make_training_backend

__all__ = ["BackendConfig", "ForwardRequest", "Outcome", "Outcomes", "SampleRequest", "SamplingBackend",
           "StepRequest", "TrainingBackend", "make_training_backend", "run_one"]
