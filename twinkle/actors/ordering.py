"""Releasing each model's requests in seq_id order.

Clients may send a model's requests out of order (the Tinker SDK sends a batch's chunks in
parallel), so ordered requests wait in a per-target buffer until every earlier seq_id has run or
been skipped. A seq_id that never arrives (its request was lost before reaching the scheduler)
holds the queue up for at most `gap_s`: each blocked queue carries its own deadline, armed when it
starts waiting and re-armed when it moves on to a new gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from twinkle.actors.work import WorkItem

log = logging.getLogger(__name__)


@dataclass
class _Queue:
    next_seq: int = 0
    buffer: dict[int, WorkItem] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    deadline: asyncio.TimerHandle | None = None


class SeqOrdering:
    def __init__(self, gap_s: float, release: Callable[[WorkItem], None]) -> None:
        self.gap_s = gap_s
        self.release = release
        self._queues: dict[str, _Queue] = {}

    def knows(self, target_id: str) -> bool:
        return target_id in self._queues

    def begin(self, target_id: str, next_seq: int) -> None:
        """Start a target's queue at `next_seq` (a restarted scheduler continues where its store says)."""
        self._queues.setdefault(target_id, _Queue(next_seq=next_seq))

    def add(self, item: WorkItem) -> None:
        if not item.ordered or item.seq_id is None:
            self.release(item)
            return
        queue = self._queues.setdefault(item.target_id, _Queue())
        if item.seq_id < queue.next_seq:  # arrived after its gap was skipped: run it now
            self.release(item)
            return
        queue.buffer[item.seq_id] = item
        self._drain(item.target_id, queue)

    def skip(self, target_id: str, seq_id: int) -> None:
        """A request with this seq_id was rejected before reaching us: do not wait for it."""
        queue = self._queues.setdefault(target_id, _Queue())
        if seq_id >= queue.next_seq:
            queue.skipped.add(seq_id)
            self._drain(target_id, queue)

    def waiting(self) -> dict[str, int]:
        """Targets held up by a missing seq_id -> that seq_id."""
        return {target: q.next_seq for target, q in self._queues.items() if q.buffer}

    def buffered(self) -> list[WorkItem]:
        return [item for q in self._queues.values() for item in q.buffer.values()]

    def _drain(self, target_id: str, queue: _Queue) -> None:
        moved = False
        while True:
            if queue.next_seq in queue.buffer:
                self.release(queue.buffer.pop(queue.next_seq))
            elif queue.next_seq in queue.skipped:
                queue.skipped.discard(queue.next_seq)
            else:
                break
            queue.next_seq += 1
            moved = True
        if not queue.buffer:
            self._disarm(queue)
        elif moved or queue.deadline is None:
            self._disarm(queue)
            queue.deadline = asyncio.get_running_loop().call_later(self.gap_s, self._expire, target_id,
                                                                   queue.next_seq)

    def _expire(self, target_id: str, expected: int) -> None:
        queue = self._queues.get(target_id)
        if queue is None or queue.next_seq != expected or not queue.buffer:
            return
        queue.deadline = None
        log.warning("%s: seq_id %d never arrived; continuing with %d", target_id, expected, min(queue.buffer))
        queue.next_seq = min(queue.buffer)
        self._drain(target_id, queue)

    @staticmethod
    def _disarm(queue: _Queue) -> None:
        if queue.deadline is not None:
            queue.deadline.cancel()
            queue.deadline = None
