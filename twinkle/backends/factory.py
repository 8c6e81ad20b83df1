"""The one place that turns a backend name into a backend: local mode and the workers both use it."""

from __future__ import annotations

from twinkle.backends.base import BackendConfig, TrainingBackend


def make_training_backend(config: BackendConfig) -> TrainingBackend:
    """A training backend for `config.backend` (it also samples when sampling is colocated)."""
    if config.backend == "transformers":
        from twinkle.backends.transformers import TransformersBackend

        return TransformersBackend(config)
    if config.backend == "megatron":
        try:
            from twinkle.backends.megatron.backend import MegatronBackend
        except ImportError as exc:
            raise ValueError(f"the megatron backend needs megatron-core in this interpreter ({exc}); servers run it in "
                             "its own virtualenv (`make megatron-venv`), local mode needs `pip install "
                             "megatron-core==0.16.1`") from None
        return MegatronBackend(config)
    raise ValueError(f"the {config.backend!r} backend is not part of this build; use backend: transformers")
