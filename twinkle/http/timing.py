"""`Server-Timing` on every reply: where a request's time went inside the server.

The standard header (W3C Server Timing) lets a client or a benchmark split a round trip into the HTTP
front (its own clock minus `app`), the route's own work (`app` minus `scheduler`) and the time the
route awaited the model's scheduler actor (`scheduler`: queueing a request, or a long poll waiting
for its result). Browsers show it in their network panel; `bench/remote.py` reads it for the
per-hop breakdown of `rpc_overhead.json`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
_scheduler_s: ContextVar[list[float] | None] = ContextVar("twinkle_scheduler_s", default=None)


async def on_scheduler(call: Awaitable[T]) -> T:
    """Await a call to a scheduler actor, adding its time to this request's `scheduler` figure."""
    started = time.perf_counter()
    try:
        return await call
    finally:
        spent = _scheduler_s.get()
        if spent is not None:
            spent[0] += time.perf_counter() - started


class ServerTimingMiddleware:
    """Adds `Server-Timing: app;dur=…, scheduler;dur=…` (milliseconds) to each HTTP reply (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        spent = [0.0]
        token = _scheduler_s.set(spent)

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                app_ms = (time.perf_counter() - started) * 1000
                value = f"app;dur={app_ms:.2f}, scheduler;dur={spent[0] * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", value)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            _scheduler_s.reset(token)


def parse_server_timing(header: str) -> dict[str, float]:
    """{"app": ms, "scheduler": ms} from a Server-Timing header value (unknown entries kept)."""
    out: dict[str, float] = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                out[name.strip()] = float(value)
    return out
