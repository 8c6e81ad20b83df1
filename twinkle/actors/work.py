"""Requests as the scheduler sees them, and which lane runs each kind.

- The **train lane** runs a model's requests in `seq_id` order. `forward` and `forward_backward`
  of every tenant are gathered into shared passes (`PASS_METHODS`); `step`s due together run as one
  batch; the rest (saves, loads, creates, snapshots) run one at a time between passes.
- The **sample lane** runs beside it: `sample` requests of every tenant and adapter are batched
  into shared generations; `create_sampler` loads a sampler's weights there too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

Lane = Literal["train", "sample"]

PASS_METHODS = frozenset({"forward", "forward_backward"})
STEP_METHODS = frozenset({"step"})
SAMPLE_METHODS = frozenset({"sample"})
SAMPLE_LANE_METHODS = SAMPLE_METHODS | {"create_sampler"}

_arrivals = itertools.count()


@dataclass
class WorkItem:
    """One request for a model's scheduler. `ordered` items of a target run in seq_id order."""

    request_id: str
    tenant: str
    method: str
    target_id: str | None
    args: Any
    seq_id: int | None = None
    ordered: bool = False
    record: dict = field(default_factory=dict)  # bookkeeping written to the store on success
    arrival: int = field(default_factory=lambda: next(_arrivals))

    @property
    def lane(self) -> Lane:
        return "sample" if self.method in SAMPLE_LANE_METHODS else "train"

    @property
    def cost(self) -> int:
        """Tokens this request puts through the model: what fairness and batch budgets count."""
        if self.method in PASS_METHODS:
            return int(sum(len(d.input_tokens) for d in self.args.data))
        if self.method in SAMPLE_METHODS:
            max_tokens = self.args.params.max_tokens or 256
            return int(len(self.args.prompt_tokens) + self.args.num_samples * max_tokens)
        return 1


def future_kind(method: str, ordered: bool) -> str:
    """The kind a durable future is stored under: ordered training requests share one seq_id space."""
    return "train" if ordered else method
