"""Where each request's time went inside its model's scheduler, for the `Server-Timing` of the reply
that carries its result.

A request's span has three marks on the scheduler's clock: accepted (queued), started (its batch
began) and ready (its outcome was in and its long polls woken), plus how long its batch spent in the
model's workers: as the scheduler saw it (`run`, Ray hops included) and as the workers measured their
own work (`compute`, where the backend reports it). The HTTP layer turns a span into Server-Timing
entries (`queue`, `run`, `compute`, `finish`)
and adds `wake`: from `ready` until the route held the outcome, which is the hop back from the
scheduler when a long poll was waiting (and includes the poll's own arrival when the result was in
first, as for a request that runs faster than the client asks for it). The absolute marks let a client on the same host measure the gaps it alone can see (its
submit to the worker starting, the result being ready to the client holding it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

KEEP = 4096  # spans of recent requests; as many as the scheduler keeps results


@dataclass
class RequestSpan:
    accepted_at: float  # time.time() of each mark, this host's clock
    started_at: float | None = None
    run_s: float | None = None  # the batch's time in the workers, from the scheduler (Ray hops included)
    compute_s: float | None = None  # the workers' own time in that batch (slowest rank per call)
    ready_at: float | None = None

    def figures(self) -> dict[str, float]:
        """Milliseconds per stage (`queue`, `run`, `compute`, `finish`) and the absolute marks (`started_at`,
        `ready_at`, seconds since the epoch) that are known so far."""
        out: dict[str, float] = {}
        if self.started_at is not None:
            out["queue"] = 1000 * max(0.0, self.started_at - self.accepted_at)
            out["started_at"] = self.started_at
        if self.run_s is not None:
            out["run"] = 1000 * self.run_s
        if self.compute_s is not None:
            out["compute"] = 1000 * self.compute_s
        if self.ready_at is not None:
            out["ready_at"] = self.ready_at
            if self.started_at is not None:
                out["finish"] = 1000 * max(0.0, self.ready_at - self.started_at - (self.run_s or 0.0))
        return out


class Spans:
    """The spans of the newest `KEEP` requests, by request id. Marks come from the scheduler's event
    loop (accepted, ready) and its lane threads (started, run); each is one attribute write."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._spans: OrderedDict[str, RequestSpan] = OrderedDict()

    def accepted(self, request_id: str) -> None:
        self._spans[request_id] = RequestSpan(time.time())
        while len(self._spans) > self.keep:
            self._spans.popitem(last=False)

    def started(self, request_ids: list[str], at: float) -> None:
        for request_id in request_ids:
            span = self._spans.get(request_id)
            if span is not None:
                span.started_at = at

    def ran(self, request_ids: list[str], seconds: float, compute_s: float | None = None) -> None:
        for request_id in request_ids:
            span = self._spans.get(request_id)
            if span is not None:
                span.run_s = seconds
                span.compute_s = compute_s

    def ready(self, request_id: str) -> None:
        span = self._spans.get(request_id)
        if span is not None:
            span.ready_at = time.time()

    def figures(self, request_id: str) -> dict[str, float]:
        span = self._spans.get(request_id)
        return span.figures() if span is not None else {}
