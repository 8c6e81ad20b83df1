"""CPU-heavy request work (decoding a body, checking a batch, hashing it) off the event loop when it is big.

One ingress replica serves every tenant from one event loop: decoding a tenant's 5 MB batch there
would stall everyone's long polls and submits for tens of milliseconds. Work on a large body runs
on a worker thread; work on a small one stays inline, where a thread hop would cost more than the
work it moves (the common case: a training step's body is tens of kilobytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

R = TypeVar("R")
OFF_LOOP_BYTES = 256 * 1024  # bodies above this are decoded and checked on a thread


async def off_loop_if(large: bool, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`fn(*args, **kwargs)`, on a worker thread when `large`, else right here."""
    if not large:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def body_is_large(request: Request) -> bool:
    """The request's body (read with `read_body`) is large, or compressed and so of unknown decoded size."""
    raw = getattr(request.state, "raw_body", None) or b""
    return len(raw) > OFF_LOOP_BYTES or bool(request.headers.get("content-encoding"))


async def body_work(request: Request, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Decode or check the request's body with `fn`: on a thread for a large body, inline otherwise."""
    return await off_loop_if(body_is_large(request), fn, *args, **kwargs)
