"""What the multi-tenant benchmarks share: the model, the tenants and their keys, the servers' config.

Two servers run side by side, identical but for `batching` (`batched`: requests of all tenants
share passes; `time_sliced`: one request per pass), so every ratio compares the same workload on
the same machine in the same run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.tinker_http import TinkerHttp
from twinkle.devserver import DevServer, start_dev_server
from twinkle.tiny import BUILTIN_MODELS

MODEL = "twinkle-tiny"
MODEL_CHOICE = ("twinkle-tiny: the built-in model with the least compute per token at this batch (hidden 128), "
                "so the fixed cost of each pass weighs most; bench-small measured the same ratio within noise")
VOCAB = BUILTIN_MODELS[MODEL].vocab_size  # token ids below this are valid for the model
TENANTS = 8
MAX_ADAPTERS = 64  # resident adapter slots of the servers (ModelConfig.max_adapters)
SESSIONS_TENANT = "sessions"  # the tenant that holds the thousand sessions (B7)

BATCHED, TIME_SLICED = "batched", "time_sliced"
MODES = (BATCHED, TIME_SLICED)


def say(message: str) -> None:
    print(f"[multitenant] {message}", flush=True)


def tenant_names() -> list[str]:
    return [f"tenant{i}" for i in range(TENANTS)]


def tenant_keys() -> dict[str, str]:
    """tenant -> API key (the unmodified SDK wants keys that start with `tml-`)."""
    return {name: f"tml-bench-{name}" for name in tenant_names() + [SESSIONS_TENANT]}


def server_config(mode: str, sessions: int) -> dict:
    """One model, `mode` batching; quotas and timeouts that let one tenant hold `sessions` models."""
    return {
        "models": [{"name": MODEL, "batching": mode, "max_adapters": MAX_ADAPTERS}],
        "quotas": {"default": {"max_models": sessions + MAX_ADAPTERS, "max_resident_adapters": MAX_ADAPTERS,
                               "max_queued_requests": sessions + 4 * MAX_ADAPTERS}},
        "timeouts": {"session_timeout_s": 3600.0},  # sessions created early must outlive the benchmark
    }


def start_servers(work: Path, sessions: int) -> dict[str, DevServer]:
    """Both servers, started at once (each its own embedded Ray and state dir under `work`)."""
    with ThreadPoolExecutor(len(MODES)) as pool:
        futures = {mode: pool.submit(start_dev_server, work / mode, config=server_config(mode, sessions),
                                     keys=tenant_keys()) for mode in MODES}
        return {mode: future.result() for mode, future in futures.items()}


def status_of(server: DevServer, tenant: str = "tenant0") -> dict:
    """The model's figures from GET /api/v1/twinkle/status, as `tenant` sees them."""
    return TinkerHttp(server.url, server.keys[tenant]).status()[MODEL]


def delta(after: dict, before: dict, key: str) -> int:
    return int(after[key] - before[key])
