"""Big request bodies are decoded on a worker thread, small ones inline (twinkle/http/offload.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from starlette.requests import Request

from twinkle.http.offload import OFF_LOOP_BYTES, body_work


def _request(body: bytes, headers: dict[str, str] | None = None) -> Request:
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [
        (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]})
    request.state.raw_body = body
    return request


def _thread_running(request: Request) -> str:
    async def main() -> tuple[str, str]:
        return threading.current_thread().name, await body_work(request, lambda: threading.current_thread().name)
    loop_thread, work_thread = asyncio.run(main())
    return "loop" if work_thread == loop_thread else "worker thread"


def test_small_bodies_are_decoded_inline_and_large_or_compressed_ones_on_a_thread():
    assert _thread_running(_request(b"x" * 1000)) == "loop"  # a thread hop would cost more than the work
    assert _thread_running(_request(b"x" * (OFF_LOOP_BYTES + 1))) == "worker thread"
    assert _thread_running(_request(b"x" * 1000, {"Content-Encoding": "zstd"})) == "worker thread"


def test_errors_raised_off_the_loop_reach_the_route():
    def refuse():
        raise ValueError("bad datum")
    with pytest.raises(ValueError, match="bad datum"):
        asyncio.run(body_work(_request(b"x" * (OFF_LOOP_BYTES + 1)), refuse))
