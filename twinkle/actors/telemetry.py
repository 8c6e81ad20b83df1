"""Figures a model's scheduler keeps about its own work, for the operator's metrics and status page.

Plain numbers (no metrics library here): the scheduler is its own Ray actor, so the HTTP layer asks
for a snapshot at scrape time and turns it into Prometheus families. Histograms are cumulative
bucket counts in seconds (Prometheus' shape); throughput is tokens over a sliding window.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

# seconds: a queue wait or pass takes from a millisecond (tiny model, idle queue) to minutes (big batches)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
THROUGHPUT_WINDOW_S = 60.0


class Histogram:
    """Counts of observations per upper bound (non-cumulative inside; cumulative in `snapshot`)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """{"buckets": [[upper bound, cumulative count], ...], "sum": s, "count": n}: finite bounds
        only (it travels as JSON too); the +Inf bucket's count is `count`."""
        cumulative, total = [], 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            cumulative.append([bound, total])
        return {"buckets": cumulative, "sum": self.sum, "count": total + self.counts[-1]}


class Throughput:
    """Tokens per second over the last `window` seconds, and the total since the start."""

    def __init__(self, window: float = THROUGHPUT_WINDOW_S) -> None:
        self.window = window
        self.total = 0
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total += tokens
        self._events.append((now, tokens))
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return sum(tokens for _, tokens in self._events) / self.window

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


class Telemetry:
    """A scheduler's queue waits, batch durations and token counts. Written by the lane threads,
    read by `stats()` on the actor's loop: one lock keeps the two apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queue_wait = Histogram()
        self.batch_seconds: dict[str, Histogram] = {}  # batch kind (pass, ops, sample) -> durations
        self.tokens = {"train": Throughput(), "sample": Throughput()}

    def batch_done(self, kind: str, seconds: float, waits: list[float], train_tokens: int,
                   sample_tokens: int) -> None:
        with self._lock:
            self.batch_seconds.setdefault(kind, Histogram()).observe(seconds)
            for wait in waits:
                self.queue_wait.observe(wait)
            if train_tokens:
                self.tokens["train"].add(train_tokens)
            if sample_tokens:
                self.tokens["sample"].add(sample_tokens)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "queue_wait_seconds": self.queue_wait.snapshot(),
                "batch_seconds": {kind: h.snapshot() for kind, h in self.batch_seconds.items()},
                "tokens_total": {lane: t.total for lane, t in self.tokens.items()},
                "tokens_per_s": {lane: round(t.rate(), 3) for lane, t in self.tokens.items()},
            }
