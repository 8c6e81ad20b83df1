"""In-process baselines: the compute floor that every remote path is compared against.

They drive the training backend directly (`twinkle.backends`), one request per call through its
batched entry points, exactly as a single tenant would use it in local mode.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from bench.workloads import (BENCH_MODEL, LORA_RANK, MEASURED_STEPS, WARMUP_STEPS, sft_batch, summarize, tokens_in,
                             trivial_batch)
from twinkle.backends import (BackendConfig, ForwardRequest, SampleRequest, StepRequest, TrainingBackend,
                              make_training_backend, run_one)
from twinkle.types import AdamParams, Datum, LoraConfig, SamplingParams

_request_ids = itertools.count()


def request_id(prefix: str) -> str:
    """A request id unique in this process (backends key outcomes by it)."""
    return f"{prefix}-{next(_request_ids)}"


def make_engine(state_dir: str | None = None, model: str = BENCH_MODEL, **overrides) -> TrainingBackend:
    """The training backend the server's workers run, built in this process."""
    return make_training_backend(BackendConfig(base_model=model, state_dir=state_dir, **overrides))


def train_step(engine: TrainingBackend, adapter: str, batch: Sequence[Datum], adam: AdamParams) -> None:
    """One forward_backward + optim_step of one adapter, alone in its pass."""
    run_one(engine.forward_backward, ForwardRequest(request_id("fb"), adapter, batch))
    run_one(engine.optim_step, StepRequest(request_id("step"), adapter, adam))


def train_step_time(engine: TrainingBackend, steps: int = MEASURED_STEPS, adapter: str = "bench") -> dict:
    """Median wall time of forward_backward + optim_step on the fixed batch, in this process."""
    if not engine.has_adapter(adapter):
        engine.create_adapter(adapter, LoraConfig(rank=LORA_RANK, seed=0))
    batch = sft_batch(engine.vocab_size)
    adam = AdamParams(learning_rate=1e-4)
    times = []
    for i in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        train_step(engine, adapter, batch, adam)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    stats = summarize(times)
    stats["tokens_per_step"] = tokens_in(batch)
    stats["train_tokens_per_s"] = stats["tokens_per_step"] / stats["p50_s"]
    return stats


def trivial_forward_time(engine: TrainingBackend, calls: int = 20, adapter: str = "bench") -> dict:
    """Median wall time of a forward (no backward) of one 16-token datum: the in-process floor of a
    trivial round trip."""
    if not engine.has_adapter(adapter):
        engine.create_adapter(adapter, LoraConfig(rank=LORA_RANK, seed=0))
    tiny = trivial_batch(engine.vocab_size)
    times = []
    for i in range(WARMUP_STEPS + calls):
        start = time.perf_counter()
        run_one(engine.forward_backward, ForwardRequest(request_id("fwd"), adapter, tiny, backward=False))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return summarize(times)


def sampling_throughput(engine: TrainingBackend, num_samples: int = 8, max_tokens: int = 64,
                        repeats: int = 3) -> dict:
    """Sampled tokens/s of one request with `num_samples` continuations on the bare base model."""
    prompt = list(range(10, 42))
    params = SamplingParams(max_tokens=max_tokens, stop=[], seed=0)

    def once() -> None:
        run_one(engine.sample, SampleRequest(request_id("sample"), None, prompt, params, num_samples))

    once()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    stats = summarize(times)
    stats["sampled_tokens_per_s"] = num_samples * max_tokens / stats["p50_s"]
    return stats
