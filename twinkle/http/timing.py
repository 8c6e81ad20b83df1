"""`Server-Timing` on every reply: where a request's time went inside the server.

The standard header (W3C Server Timing) lets a client or a benchmark split a round trip into the HTTP
front (its own clock minus `app`), the route's own work (`app` minus `scheduler`) and the time the
route awaited the model's scheduler actor (`scheduler`: queueing a request, or a long poll waiting
for its result). A reply that carries a request's result adds that request's span in the scheduler
(`twinkle.actors.spans`): `queue` (accepted until its batch started), `run` (the batch in the
model's workers, Ray hops included), `compute` (the part the workers measured as their own work, so
`run` minus `compute` is the Ray hops), `finish` (recording the result and waking its polls) and `wake`
(from the result being ready until the route held it), with the absolute `started` and `ready` marks
(seconds since the epoch, in `desc`). Browsers show it in their network panel; `bench/remote.py`
reads it for the per-hop breakdown of `rpc_overhead.json`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
SPAN_STAGES = ("queue", "run", "compute", "finish")  # milliseconds, from `RequestSpan.figures`
SPAN_MARKS = {"started_at": "started", "ready_at": "ready"}  # absolute times, as Server-Timing `desc`


@dataclass
class RequestTiming:
    scheduler_s: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)

    def header(self, app_ms: float) -> bytes:
        entries = [f"app;dur={app_ms:.2f}", f"scheduler;dur={self.scheduler_s * 1000:.2f}"]
        entries += [f"{name};dur={ms:.2f}" for name, ms in self.stages_ms.items()]
        entries += [f'{name};desc="{at:.6f}"' for name, at in self.marks.items()]
        return ", ".join(entries).encode()


_timing: ContextVar[RequestTiming | None] = ContextVar("twinkle_request_timing", default=None)


async def on_scheduler(call: Awaitable[T]) -> T:
    """Await a call to a scheduler actor, adding its time to this request's `scheduler` figure."""
    started = time.perf_counter()
    try:
        return await call
    finally:
        timing = _timing.get()
        if timing is not None:
            timing.scheduler_s += time.perf_counter() - started


def note_span(figures: dict[str, float]) -> None:
    """Add a request's scheduler span (`RequestSpan.figures`) to this reply's Server-Timing, with
    `wake`: from the result being ready until now, when the route holds it."""
    timing = _timing.get()
    if timing is None or not figures:
        return
    timing.stages_ms.update({name: figures[name] for name in SPAN_STAGES if name in figures})
    if "ready_at" in figures:
        timing.stages_ms["wake"] = max(0.0, 1000 * (time.time() - figures["ready_at"]))
    timing.marks.update({SPAN_MARKS[key]: figures[key] for key in SPAN_MARKS if key in figures})


class ServerTimingMiddleware:
    """Adds `Server-Timing: app;dur=…, scheduler;dur=…` (milliseconds) to each HTTP reply (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        timing = RequestTiming()
        token = _timing.set(timing)

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                value = timing.header((time.perf_counter() - started) * 1000)
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", value)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            _timing.reset(token)


def parse_server_timing(header: str) -> dict[str, float]:
    """{"app": ms, "scheduler": ms, ...} from a Server-Timing header value: each entry's `dur`, or
    for an entry with only a numeric `desc` (the `started`/`ready` marks), that number."""
    out: dict[str, float] = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        name = name.strip()
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if not name or key not in ("dur", "desc"):
                continue
            try:
                number = float(value.strip('"'))
            except ValueError:
                continue
            if key == "dur" or name not in out:
                out[name] = number
    return out
