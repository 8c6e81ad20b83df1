"""Ending unmodified-SDK sessions in tests, so none is left talking to a server when pytest exits."""

from __future__ import annotations

from contextlib import contextmanager


def end_sdk_session(service) -> None:
    """End an SDK session and wait for the server's reply: SDK 0.38 sends from its own event loop, and a
    heartbeat or reply landing during interpreter exit aborts the process (its HTTP threads cannot unwind)."""
    try:
        service.close("success").result(timeout=30)
    except Exception:  # a session never created, or a server already stopped: nothing left to end
        pass


@contextmanager
def sdk_session(url: str, api_key: str):
    """A `tinker.ServiceClient` for the block, its session ended on the way out."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    try:
        yield service
    finally:
        end_sdk_session(service)
