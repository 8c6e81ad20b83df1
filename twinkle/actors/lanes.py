"""The scheduler's two lanes: training and sampling run side by side, each batching across tenants.

A lane holds released requests (already in seq_id order), forms the next batch, and hands it to an
executor that runs it on the lane's own thread; results are resolved the moment the batch returns,
and the next batch forms from whatever arrived meanwhile (push, never poll).

Train lane, one step of its loop:
- if any model's next request is not a forward pass (step, save, load, create, ...), run those
  heads: the steps together (one optimizer step per model, Tinker's "clock cycle"), the rest one
  at a time;
- otherwise gather the leading forward/forward_backward requests of every model, fairly by tokens
  up to the pass budget, into one shared pass. A model's step or load closes its part of the batch,
  so nothing ever runs ahead of an earlier request of the same model.

Sample lane: all waiting `sample` requests, fairly by tokens up to its budget, in one generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from twinkle.actors.fairness import DeficitRoundRobin
from twinkle.actors.work import PASS_METHODS, SAMPLE_METHODS, STEP_METHODS, WorkItem

log = logging.getLogger(__name__)

BatchKind = Literal["pass", "ops", "sample"]


@dataclass
class Batch:
    kind: BatchKind
    items: list[WorkItem]


Executor = Callable[[Batch], Awaitable[dict[str, tuple[str, object]]]]
Resolver = Callable[[WorkItem, tuple[str, object]], None]


class Lane:
    """A queue of released requests per target, and the loop that turns them into batches."""

    def __init__(self, name: str, execute: Executor, resolve: Resolver, *, budget: int,
                 max_items: int | None = None) -> None:
        self.name = name
        self.execute = execute
        self.resolve = resolve
        self.budget = budget
        self.max_items = max_items
        self.fairness: DeficitRoundRobin[WorkItem] = DeficitRoundRobin()
        self.queues: OrderedDict[str, deque[WorkItem]] = OrderedDict()
        self.busy = False
        self.batches = 0
        self._stopping = False
        self._wake = asyncio.Event()

    def push(self, item: WorkItem) -> None:
        self.queues.setdefault(item.target_id or "", deque()).append(item)
        self._wake.set()

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def idle(self) -> bool:
        return not self.busy and not self.queued()

    def stop(self) -> None:
        """Finish the batch running now, then start no other (the server is stopping)."""
        self._stopping = True
        self._wake.set()

    async def run_forever(self) -> None:
        while not self._stopping:
            if not self.queued():
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.gather()
            batch = self.next_batch()
            self.busy = True
            started = time.perf_counter()
            try:
                outcomes = await self.execute(batch)
            except Exception as exc:  # the executor resolves per item; this is a bug, but never stall the lane
                log.exception("%s lane: a batch failed as a whole", self.name)
                outcomes = {item.request_id: ("failed", {"error": f"internal error ({type(exc).__name__})",
                                                         "category": "server", "status_code": 500})
                            for item in batch.items}
            finally:
                self.busy = False
            self.batches += 1
            self.finished(batch, time.perf_counter() - started)
            for item in batch.items:
                self.resolve(item, outcomes[item.request_id])

    async def gather(self) -> None:
        """Called before a batch forms, with work queued: a lane may wait briefly for more."""

    def finished(self, batch: Batch, seconds: float) -> None:
        """Called when a batch has run."""

    async def _wait_for_push(self, timeout: float) -> bool:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def _take(self, items: list[WorkItem]) -> None:
        for item in items:
            queue = self.queues[item.target_id or ""]
            queue.remove(item)
            if not queue:
                del self.queues[item.target_id or ""]

    def _fair_share(self, runs: list[list[WorkItem]]) -> list[WorkItem]:
        """Runs are per-target prefixes in queue order; a tenant's runs are concatenated, so the prefix
        DRR picks for it keeps every target's requests in order."""
        by_tenant: dict[str, list[tuple[int, WorkItem]]] = {}
        for run in runs:
            if run:
                by_tenant.setdefault(run[0].tenant, []).extend((item.cost, item) for item in run)
        return self.fairness.pick(by_tenant, self.budget, self.max_items)


class TrainLane(Lane):
    """Also keeps tenants in step: when models have just had their optimizer step, their next
    forward pass is on its way (the client sends it on receiving the step's result), so a pass about
    to start waits a moment for them — at most `GATHER_SHARE` of a recent pass and `max_gather_s` —
    rather than running without them and leaving them for a pass of their own. This is Tinker's
    "clock cycle": everyone's forward_backward in one pass, everyone's step in one batch."""

    GATHER_SHARE = 0.25

    def __init__(self, execute: Executor, resolve: Resolver, *, budget: int, max_models: int,
                 time_sliced: bool = False, max_gather_s: float = 0.05) -> None:
        super().__init__("train", execute, resolve, budget=budget, max_items=1 if time_sliced else None)
        self.max_models = max_models
        self.max_gather_s = 0.0 if time_sliced else max_gather_s
        self._expected: set[str] = set()  # models whose step just ran: their next pass request is coming
        self._pass_seconds = 0.0  # recent pass duration (moving average)

    async def gather(self) -> None:
        waiting = self._expected - set(self.queues)
        if not waiting or not self._pass_seconds or self.max_gather_s <= 0:
            return
        if any(queue[0].method not in PASS_METHODS for queue in self.queues.values()):
            return  # steps and other requests never wait
        deadline = time.perf_counter() + min(self.max_gather_s, self.GATHER_SHARE * self._pass_seconds)
        while self._expected - set(self.queues):
            left = deadline - time.perf_counter()
            if left <= 0 or not await self._wait_for_push(left):
                break

    def finished(self, batch: Batch, seconds: float) -> None:
        if batch.kind == "pass":
            self._expected.clear()
            self._pass_seconds = seconds if not self._pass_seconds else 0.8 * self._pass_seconds + 0.2 * seconds
        elif any(item.method in STEP_METHODS for item in batch.items):
            self._expected.update(item.target_id or "" for item in batch.items if item.method in STEP_METHODS)

    def next_batch(self) -> Batch:
        heads = [queue[0] for queue in self.queues.values()]
        others = [item for item in heads if item.method not in PASS_METHODS][: self.max_items]
        if others:
            self._take(others)
            return Batch("ops", others)
        runs = []
        for queue in list(self.queues.values())[: self.max_models]:
            run = []
            for item in queue:
                if item.method not in PASS_METHODS:
                    break  # a step or load closes this model's part of the batch
                run.append(item)
            runs.append(run)
        chosen = self._in_model_order(self._fair_share(runs)) or heads[:1]
        self._take(chosen)
        for target in dict.fromkeys(item.target_id or "" for item in chosen):
            if target in self.queues:  # models beyond max_models take their turn next
                self.queues.move_to_end(target)
        return Batch("pass", chosen)

    def _in_model_order(self, chosen: list[WorkItem]) -> list[WorkItem]:
        """Keep each model's requests in queue order (fairness picks per tenant, not per model)."""
        picked = {id(item) for item in chosen}
        ordered = []
        for queue in self.queues.values():
            prefix = []
            for item in queue:
                if id(item) not in picked:
                    break
                prefix.append(item)
            ordered += prefix
        return ordered


class SampleLane(Lane):
    def __init__(self, execute: Executor, resolve: Resolver, *, budget: int, time_sliced: bool = False) -> None:
        super().__init__("sample", execute, resolve, budget=budget, max_items=1 if time_sliced else None)

    def next_batch(self) -> Batch:
        heads = [queue[0] for queue in self.queues.values()]
        others = [item for item in heads if item.method not in SAMPLE_METHODS]
        if others:
            self._take(others[:1])
            return Batch("ops", others[:1])
        chosen = self._fair_share([list(queue) for queue in self.queues.values()])
        self._take(chosen)
        return Batch("sample", chosen)
