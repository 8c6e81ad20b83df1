"""A steady CPU load in short bursts from helper processes, as a server's request handling puts beside
its model's compute (bench/contention.py). Kept free of torch so a helper starts in milliseconds."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager

BURST_MS = 5.0  # about one request's handling in the replica or scheduler
MAX_SHARE_PER_HELPER = 0.9  # one helper keeps at most this share of its core busy


def duty_cycles(core_share: float, burst_ms: float = BURST_MS) -> list[tuple[float, float]]:
    """(busy_ms, idle_ms) for each helper process, so that together they keep `core_share` cores busy
    (more than one helper when the share is above `MAX_SHARE_PER_HELPER`); none for a share of 0."""
    if core_share <= 0:
        return []
    helpers = math.ceil(core_share / MAX_SHARE_PER_HELPER)
    each = core_share / helpers
    return [(burst_ms, burst_ms * (1 - each) / each)] * helpers


def _burn(busy_ms: float, idle_ms: float, started, stop) -> None:
    started.set()
    while not stop.is_set():
        until = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < until:
            pass
        time.sleep(idle_ms / 1000)


@contextmanager
def cpu_load(core_share: float) -> Iterator[None]:
    """Keep `core_share` cores busy in short bursts (helper processes) for the duration of the block."""
    ctx = mp.get_context("spawn")  # no copy of this process's torch threads and model in the helpers
    stop = ctx.Event()
    started = [ctx.Event() for _ in duty_cycles(core_share)]
    helpers = [ctx.Process(target=_burn, args=(busy, idle, ready, stop), daemon=True)
               for (busy, idle), ready in zip(duty_cycles(core_share), started)]
    for helper in helpers:
        helper.start()
    for ready in started:  # the load is on before the block's first measurement
        ready.wait(timeout=60)
    try:
        yield
    finally:
        stop.set()
        for helper in helpers:
            helper.join(timeout=10)
