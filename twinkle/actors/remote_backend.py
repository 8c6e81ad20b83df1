"""A backend whose entry points run on a group of `BackendWorker` actors.

It implements the same interfaces as the backend inside the workers, so `ModelService` runs
unchanged on top of it. Batches are forwarded whole; with several ranks, each request with a
separable loss is sharded across them (data parallel) and its results merged back in order, while a
request whose loss couples its datums runs whole on rank 0 (the other ranks add zero gradient).
Mutations of adapters go to every rank; reads and sampling go to rank 0.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from twinkle.actors.group import ActorGroup
from twinkle.backends.base import (ForwardRequest, Outcome, Outcomes, SampleRequest, SamplingBackend, StepRequest,
                                   TrainingBackend)
from twinkle.errors import TwinkleError
from twinkle.losses.specs import LOSS_SPECS
from twinkle.metrics import merge_metrics
from twinkle.types import ForwardResult
from twinkle.validation import validate_batch


def _wait(refs):
    """The results of one ObjectRef or a list of them, waiting on this thread only.

    The scheduler (an async actor) calls this backend from its lane threads. Ray flags any ray.get
    in an async actor as blocking its event loop; a ref's own future blocks just the calling
    thread, which is what a lane thread is for, and raises the same task errors."""
    if isinstance(refs, list):
        return [ref.future().result() for ref in refs]
    return refs.future().result()


_clock = threading.local()  # per lane thread: the workers' own seconds in the batch that thread runs


def start_compute_clock() -> None:
    """Start counting the workers' compute time of the batch this (lane) thread is about to run."""
    _clock.seconds = None


def compute_seconds() -> float | None:
    """The workers' own seconds in this thread's batch since `start_compute_clock` (ranks run side by
    side, so each call counts its slowest rank); None when no compute call went through this backend."""
    return getattr(_clock, "seconds", None)


def _wait_timed(refs: list) -> list:
    """`_wait` for calls to `BackendWorker.timed`: the results, with the slowest rank's seconds added
    to this thread's compute clock."""
    answers = _wait(refs)
    _clock.seconds = (getattr(_clock, "seconds", None) or 0.0) + max(seconds for _, seconds in answers)
    return [result for result, _ in answers]


def _shards(items: list, n: int) -> list[list]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for rank in range(n):
        end = start + size + (1 if rank < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class RayBackend(TrainingBackend, SamplingBackend):
    def __init__(self, group: ActorGroup) -> None:
        self.group = group
        self._info = _wait(group.call_first("ready"))

    def _all(self, method: str, *args, **kwargs):
        return _wait(self.group.call_all("call", method, *args, **kwargs))[0]

    def _first(self, method: str, *args, **kwargs):
        return _wait(self.group.call_first("call", method, *args, **kwargs))

    def _compute_first(self, method: str, *args):
        return _wait_timed([self.group.call_first("timed", method, *args)])[0]

    def info(self) -> dict:
        return {k: v for k, v in self._info.items() if k not in ("rank", "pid")}

    def stats(self) -> dict:
        return self._first("stats")

    # ------------------------------------------------------------ adapters
    def create_adapter(self, adapter_id, lora=None, *, adam=None, schedule=None):
        if lora is not None and lora.seed is None:  # every rank must draw the same initial weights
            import secrets

            lora = lora.model_copy(update={"seed": secrets.randbits(31)})
        return self._all("create_adapter", adapter_id, lora, adam=adam, schedule=schedule)

    def remove_adapter(self, adapter_id: str) -> None:
        self._all("remove_adapter", adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return self._first("has_adapter", adapter_id)

    def describe(self, adapter_id: str) -> dict:
        return self._first("describe", adapter_id)

    def save(self, adapter_id, path, **kwargs):
        return self._first("save", adapter_id, path, **kwargs)

    def load(self, adapter_id, path, **kwargs):
        return self._all("load", adapter_id, path, **kwargs)

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        self._first("load_adapter", adapter_id, path)

    def adapter_weights(self, adapter_id: str) -> dict:
        return self._first("adapter_weights", adapter_id)

    # ------------------------------------------------------------- compute
    def forward_backward(self, requests: Sequence[ForwardRequest]) -> Outcomes:
        n = self.group.num_workers
        if n == 1:
            return self._compute_first("forward_backward", list(requests))
        per_rank, rejected = split_data_parallel(requests, n, self._info["vocab_size"])
        answers = _wait_timed(self.group.call_sharded("timed", [(("forward_backward", batch), {})
                                                                for batch in per_rank]))
        return {request.request_id: rejected.get(request.request_id) or _merge(request.request_id, per_rank, answers)
                for request in requests}

    def optim_step(self, requests: Sequence[StepRequest]) -> Outcomes:
        return _wait_timed(self.group.call_all("timed", "optim_step", list(requests)))[0]

    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        return self._compute_first("sample", list(requests))

    def shutdown(self) -> None:
        self.group.shutdown()


def split_data_parallel(requests: Sequence[ForwardRequest], n: int,
                        vocab_size: int) -> tuple[list[list[ForwardRequest]], Outcomes]:
    """Each of `n` data-parallel ranks' requests, and the requests refused before any rank ran them.

    A separable loss's data is sharded over the ranks (each shard counts the whole batch's progress);
    a loss that couples its datums, or a batch with fewer datums than ranks, runs whole on rank 0
    (the others add zero gradient). A rank may get none; it still joins the step's gradient sum."""
    per_rank: list[list[ForwardRequest]] = [[] for _ in range(n)]
    rejected: Outcomes = {}
    for request in requests:
        separable = isinstance(request.loss, str) and request.loss in LOSS_SPECS and LOSS_SPECS[request.loss].separable
        if not separable or len(request.data) < n:
            per_rank[0].append(request)
            continue
        try:  # a bad datum must fail the whole request, not just the shard holding it
            validate_batch(request.data, request.loss, request.loss_config, vocab_size)
        except TwinkleError as exc:
            rejected[request.request_id] = Outcome.failure(exc)
            continue
        progress = (len(request.data), request.num_tokens)  # every rank counts the whole batch
        for rank, part in enumerate(_shards(list(request.data), n)):
            per_rank[rank].append(replace(request, data=part, progress=progress))
    return per_rank, rejected


def _merge(request_id: str, per_rank: list[list[ForwardRequest]], answers: list[Outcomes]) -> Outcome:
    """One request's outcome from the ranks that ran a shard of it (in rank order)."""
    parts = [(answer[request_id], next(r for r in batch if r.request_id == request_id))
             for batch, answer in zip(per_rank, answers) if request_id in answer]
    failed = next((outcome for outcome, _ in parts if not outcome.ok), None)
    if failed is not None:
        return failed
    if len(parts) == 1:
        return parts[0][0]
    results = [outcome.result for outcome, _ in parts]
    return Outcome(ForwardResult(
        loss_outputs=[o for r in results for o in r.loss_outputs],
        metrics=merge_metrics([(r.metrics, float(len(request.data))) for r, (_, request) in zip(results, parts)]),
    ))
