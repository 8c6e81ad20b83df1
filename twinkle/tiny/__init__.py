"""Built-in models that are generated offline: `twinkle-tiny` and the `bench-small` benchmark model."""

from twinkle.tiny.build import BUILTIN_MODELS, BuiltinModelSpec, build_builtin_model, ensure_builtin_model

__all__ = ["BUILTIN_MODELS", "BuiltinModelSpec", "build_builtin_model", "ensure_builtin_model"]
