"""Several tenants on one server, each an unmodified Tinker SDK client driven from its own thread.

A fleet runs training rounds (every tenant the same number of pipelined forward_backward +
optim_step steps, started together at a barrier) and sampling bursts (every tenant's requests
submitted at once), and reports wall times, so that two servers can be compared on exactly the
same workload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.workloads import tinker_batch
from twinkle.types import Datum

LOSS = "cross_entropy"
LEARNING_RATE = 1e-4


@dataclass
class RoundTiming:
    """One training round: each tenant's own duration, and the round's wall time (first start to last end)."""

    tenant_s: list[float]
    wall_s: float


class SdkFleet:
    """One tinker.ServiceClient (own key, own session) and one LoRA training client per tenant."""

    def __init__(self, url: str, keys: Sequence[str], base_model: str, *, rank: int,
                 batches: Sequence[list[Datum]]) -> None:
        import tinker

        self.size = len(keys)
        self._pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="tenant")
        self.services = [tinker.ServiceClient(base_url=url, api_key=key) for key in keys]
        self.data = [tinker_batch(batch) for batch in batches]
        self.tokens_per_step = [int(sum(len(d.input_tokens) for d in batch)) for batch in batches]
        futures = [service.create_lora_training_client(base_model=base_model, rank=rank, seed=i)
                   for i, service in enumerate(self.services)]
        self.trainers = [future.result() for future in futures]
        self.samplers: list = []

    def _each(self, work) -> list:
        """Run work(i) for every tenant at once, one thread each; results in tenant order."""
        return list(self._pool.map(work, range(self.size)))

    def train_round(self, steps: int) -> RoundTiming:
        """Every tenant runs `steps` pipelined steps (both requests sent before waiting), all started together."""
        from tinker import types

        adam = types.AdamParams(learning_rate=LEARNING_RATE)
        start_line = threading.Barrier(self.size)

        def run(i: int) -> tuple[float, float]:
            client, data = self.trainers[i], self.data[i]
            start_line.wait()
            start = time.perf_counter()
            for _ in range(steps):
                fb = client.forward_backward(data, LOSS)
                step = client.optim_step(adam)
                fb.result()
                step.result()
            return start, time.perf_counter()

        spans = self._each(run)
        return RoundTiming([end - start for start, end in spans],
                           max(end for _, end in spans) - min(start for start, _ in spans))

    def snapshot_samplers(self) -> None:
        """A sampling client per tenant on a snapshot of its adapter (distinct adapters)."""
        self.samplers = self._each(lambda i: self.trainers[i].save_weights_and_get_sampling_client().result())

    def sample_burst(self, prompts: Sequence[list[int]], max_tokens: int, seed: int = 0) -> tuple[float, int]:
        """Every tenant's prompts submitted at once (one request per prompt, fixed seeds, no early stop);
        returns (wall seconds from the first submit to the last result, tokens sampled)."""
        from tinker import types

        start = time.perf_counter()
        futures = [sampler.sample(types.ModelInput.from_ints(prompt), 1,
                                  types.SamplingParams(max_tokens=max_tokens, stop=[], seed=seed + 100 * t + j))
                   for t, sampler in enumerate(self.samplers) for j, prompt in enumerate(prompts)]
        tokens = sum(len(seq.tokens) for future in futures for seq in future.result().sequences)
        return time.perf_counter() - start, tokens

    def close(self) -> None:
        for service in self.services:
            try:
                service.close("success").result(timeout=60)  # a reply during exit would abort the process
            except Exception:  # a server already stopped: nothing left to tell it
                pass
        self._pool.shutdown(wait=False)
