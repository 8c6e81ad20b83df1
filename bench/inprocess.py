"""In-process baselines: the compute floor that every remote path is compared against."""

from __future__ import annotations

import time

from bench.workloads import (BENCH_MODEL, LORA_RANK, MEASURED_STEPS, WARMUP_STEPS, sft_batch, summarize,
                             tokens_in)
from twinkle.engine import Engine, EngineConfig
from twinkle.types import AdamParams, LoraConfig, SamplingParams


def make_engine(state_dir: str | None = None) -> Engine:
    return Engine(EngineConfig(base_model=BENCH_MODEL, state_dir=state_dir))


def train_step_time(engine: Engine, steps: int = MEASURED_STEPS, adapter: str = "bench") -> dict:
    """Median wall time of forward_backward + optim_step on the fixed batch, in this process."""
    if not engine.has_adapter(adapter):
        engine.create_adapter(adapter, LoraConfig(rank=LORA_RANK, seed=0))
    batch = sft_batch(engine.vocab_size)
    adam = AdamParams(learning_rate=1e-4)
    times = []
    for i in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        engine.forward_backward(adapter, batch)
        engine.optim_step(adapter, adam)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    stats = summarize(times)
    stats["tokens_per_step"] = tokens_in(batch)
    stats["train_tokens_per_s"] = stats["tokens_per_step"] / stats["p50_s"]
    return stats


def sampling_throughput(engine: Engine, num_samples: int = 8, max_tokens: int = 64, repeats: int = 3) -> dict:
    prompt = list(range(10, 42))
    params = SamplingParams(max_tokens=max_tokens, stop=[], seed=0)
    engine.sample(None, prompt, params, num_samples)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.sample(None, prompt, params, num_samples)
        times.append(time.perf_counter() - start)
    stats = summarize(times)
    stats["sampled_tokens_per_s"] = num_samples * max_tokens / stats["p50_s"]
    return stats
