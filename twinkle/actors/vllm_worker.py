"""The Ray actor that holds a vLLM sampler, started with the vLLM environment's interpreter.

It is an async actor: its methods await the engine's loop thread, so a long generation never
blocks `watch` or a second call. This module is imported in the vLLM environment, so it imports
only Ray and Twinkle's torch-free core at module level.
"""

from __future__ import annotations

import asyncio
import os

from twinkle.errors import TwinkleError

ASYNC_METHODS = {"sample": "asample", "load_adapter": "aload_adapter", "remove_adapter": "aremove_adapter"}
SYNC_METHODS = frozenset({"info", "has_adapter"})


class VLLMWorker:
    """One vLLM engine replica (tensor parallelism, if any, is vLLM's own, inside it)."""

    def __init__(self, rank: int, world_size: int, settings) -> None:
        from twinkle.backends.vllm_sampler import VLLMSamplingBackend

        self.rank = rank
        self.world_size = world_size
        self.backend = VLLMSamplingBackend(settings)

    async def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), **self.backend.info()}

    async def watch(self) -> None:
        """Never returns: the supervisor learns of this worker's death the moment this call fails."""
        await asyncio.Event().wait()

    async def call(self, method: str, *args, **kwargs):
        """Run a sampling-backend method by name on the engine's loop; Twinkle errors travel as themselves."""
        if method in SYNC_METHODS:
            return getattr(self.backend, method)(*args, **kwargs)
        if method not in ASYNC_METHODS:
            raise TwinkleError(f"vLLM sampler workers do not run {method!r}")
        coro = getattr(self.backend, ASYNC_METHODS[method])(*args, **kwargs)
        try:
            return await asyncio.wrap_future(self.backend.submit(coro))
        except TwinkleError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{method} failed on vLLM sampler {self.rank}: {type(exc).__name__}: {exc}") from None

    async def shutdown(self) -> None:
        self.backend.shutdown()
