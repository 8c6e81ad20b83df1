"""The process-wide default backend that API objects use when none is passed."""

from __future__ import annotations

import atexit
import os
import threading

_lock = threading.Lock()
_backend = None


def init(mode: str = "local", *, state_dir: str | os.PathLike | None = None, address: str | None = None,
         num_workers: int = 1, engine_options: dict | None = None, allow_custom_loss: bool = True):
    """Choose where Twinkle's API runs for this process.

    mode="local": engines in this process. mode="ray": engines in local Ray actors, one group of
    `num_workers` data-parallel ranks per base model (`address` joins an existing cluster instead of
    starting an embedded one).
    """
    global _backend
    from twinkle.api.local import LocalBackend

    if mode not in ("local", "ray"):
        raise ValueError(f"unknown mode {mode!r}; use 'local' or 'ray'")
    with _lock:
        if _backend is not None:
            _backend.close()
        _backend = LocalBackend(state_dir, use_ray=mode == "ray", ray_address=address, num_workers=num_workers,
                                engine_options=engine_options, allow_custom_loss=allow_custom_loss)
        return _backend


def set_backend(backend) -> None:
    """Install a backend built elsewhere (the HTTP and Ray clients do this)."""
    global _backend
    with _lock:
        _backend = backend


def current_backend():
    global _backend
    with _lock:
        if _backend is None:
            from twinkle.api.local import LocalBackend

            _backend = LocalBackend()
        return _backend


def shutdown() -> None:
    global _backend
    with _lock:
        if _backend is not None:
            _backend.close()
            _backend = None


atexit.register(shutdown)
