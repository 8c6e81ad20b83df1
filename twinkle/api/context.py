"""The process-wide default backend that API objects use when none is passed: a plain registry.

`twinkle.init` (in `twinkle.api.modes`) decides which backend to build; the clients install theirs
with `set_backend`. Nothing here imports a transport.
"""

from __future__ import annotations

import atexit
import threading

_lock = threading.Lock()
_backend = None


def set_backend(backend) -> None:
    """Install a backend built elsewhere (local mode, the HTTP and Ray clients)."""
    global _backend
    with _lock:
        _backend = backend


def peek_backend():
    """The installed backend, or None (does not create one)."""
    with _lock:
        return _backend


def current_backend():
    """The installed backend; local mode in this process if none was chosen."""
    global _backend
    with _lock:
        if _backend is None:
            from twinkle.api.local import LocalBackend

            _backend = LocalBackend()
        return _backend


def shutdown() -> None:
    global _backend
    with _lock:
        backend, _backend = _backend, None
    if backend is not None:
        backend.close()


atexit.register(shutdown)
