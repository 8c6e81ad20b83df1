"""Step time of the megatron backend at TP=1, TP=2 and PP=2 against the transformers backend, in one run.

Every backend is a Ray actor group on the same machine (the transformers backend: one BackendWorker;
megatron: one MegatronWorker per TP rank, in .venv-megatron), one torch thread per rank, the same
LoRA (seed), batch and AdamW settings: forward_backward + optim_step per step. The losses of the
measured steps must agree across backends (a parity check rides along with the timing).

On a CPU box TP=2 is not a speed-up: two ranks split the same cores, and every layer pays gloo
collectives (an all-reduce after each row-parallel projection and LoRA delta, the logits gather,
the LoRA gradient sum). `gloo_overhead` is TP=2's step time over TP=1's. PP=2 runs its micro-batches
through the two stages one after another (no overlap), so on CPU it costs TP=1's compute plus the
activation and gradient sends.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace

import numpy as np

from bench.workloads import (BATCH_SIZE, BENCH_MODEL, LORA_RANK, MEASURED_STEPS, SEQ_LEN, WARMUP_STEPS, sft_batch,
                             summarize)


def _steps(backend, data, steps: int) -> tuple[list[float], list[float]]:
    from twinkle.backends import ForwardRequest, StepRequest

    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        out = backend.forward_backward([ForwardRequest("fb", "bench", data)])["fb"].unwrap()
        backend.optim_step([StepRequest("st", "bench")])["st"].unwrap()
        times.append(time.perf_counter() - started)
        losses.append(out.metrics["loss:sum"])
    return times, losses


def _measure(backend, data) -> dict:
    from twinkle.types import AdamParams, LoraConfig

    backend.create_adapter("bench", LoraConfig(rank=LORA_RANK, seed=3), adam=AdamParams(learning_rate=1e-3))
    _steps(backend, data, WARMUP_STEPS)
    times, losses = _steps(backend, data, MEASURED_STEPS)
    return {**summarize(times), "losses": losses}


def run(state_dir: str) -> dict:
    import ray

    from twinkle.actors import init_ray
    from twinkle.actors.group import ActorGroup
    from twinkle.actors.megatron_group import start_megatron_group
    from twinkle.actors.remote_backend import RayBackend
    from twinkle.actors.workers import ACTOR_CONCURRENCY, BackendWorker
    from twinkle.backends import BackendConfig

    if not ray.is_initialized():
        init_ray(temp_dir=tempfile.mkdtemp(prefix="tw-bench-", dir="/tmp"))
    config = BackendConfig(base_model=BENCH_MODEL, state_dir=state_dir, num_threads=1)
    results = {}
    starters = {
        "transformers": lambda: RayBackend(ActorGroup(BackendWorker, 1, init_kwargs={"config": config},
                                                      max_concurrency=ACTOR_CONCURRENCY)),
        "megatron_tp1": lambda: start_megatron_group(replace(config, backend="megatron"), tensor_parallel=1),
        "megatron_tp2": lambda: start_megatron_group(replace(config, backend="megatron"), tensor_parallel=2,
                                                     cpus_per_rank=0.5),
        "megatron_pp2": lambda: start_megatron_group(replace(config, backend="megatron"), tensor_parallel=1,
                                                     pipeline_parallel=2, cpus_per_rank=0.5),
    }
    data = None
    for name, start in starters.items():
        started = time.perf_counter()
        backend = start()
        try:
            start_s = time.perf_counter() - started
            data = data or sft_batch(backend.info()["vocab_size"])
            results[name] = {**_measure(backend, data), "start_s": start_s}
        finally:
            backend.shutdown()
        print(f"{name}: {results[name]['p50_s'] * 1000:.1f} ms/step (started in {start_s:.1f}s)")
    ref = np.asarray(results["transformers"]["losses"])
    megatron = ("megatron_tp1", "megatron_tp2", "megatron_pp2")
    for name in megatron:
        results[name]["max_rel_loss_diff_vs_transformers"] = float(
            np.max(np.abs(np.asarray(results[name]["losses"]) - ref) / np.abs(ref)))
    base = results["transformers"]["p50_s"]
    return {"model": BENCH_MODEL, "batch": [BATCH_SIZE, SEQ_LEN], "lora_rank": LORA_RANK, "backends": results,
            "ratios_vs_transformers": {n: results[n]["p50_s"] / base for n in megatron},
            "gloo_overhead": results["megatron_tp2"]["p50_s"] / results["megatron_tp1"]["p50_s"]}
