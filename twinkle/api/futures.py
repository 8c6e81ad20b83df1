"""Futures returned by every API call: `.result()`, `.done()`, and `await` in async code."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Future(Generic[T]):
    """The result of an API call that may still be running.

    Calls are queued in order, so a script can submit `forward_backward` and `step` back to back and
    wait for both: the worker never idles between them.
    """

    def __init__(self, inner: concurrent.futures.Future) -> None:
        self._inner = inner

    @classmethod
    def completed(cls, value: T) -> "Future[T]":
        inner: concurrent.futures.Future = concurrent.futures.Future()
        inner.set_result(value)
        return cls(inner)

    def result(self, timeout: float | None = None) -> T:
        return self._inner.result(timeout)

    def done(self) -> bool:
        return self._inner.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._inner.exception(timeout)

    def then(self, fn: Callable[[T], U]) -> "Future[U]":
        """A future of fn(result), computed when this one completes."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def _done(inner: concurrent.futures.Future) -> None:
            try:
                out.set_result(fn(inner.result()))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                out.set_exception(exc)

        self._inner.add_done_callback(_done)
        return Future(out)

    def __await__(self):
        return asyncio.wrap_future(self._inner).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<twinkle.Future {state}>"
