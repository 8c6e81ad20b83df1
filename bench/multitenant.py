"""Many tenants on one base model (`make bench` writes bench/results/multitenant.json).

- in-process: the backend alone, shared passes vs one pass per request (training and sampling);
- B3, B4, sampling: 8 unmodified Tinker SDK tenants on a batched and a time-sliced server, side by
  side in this run (`batching`);
- B7: a thousand sessions on the batched server (`sessions`).
Each part reports the wall time it took.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.batching import (LORA_RANK, inprocess_sampling, inprocess_training, sampling_comparison, tenant_batches,
                            train_comparison)
from bench.fleet import SdkFleet
from bench.sessions import session_capacity
from bench.tenancy import (BATCHED, MODEL, MODEL_CHOICE, MODES, TENANTS, TIME_SLICED, VOCAB, say, start_servers,
                           tenant_names)
from twinkle.devserver import DevServer

SESSIONS_ENV = "TWINKLE_BENCH_SESSIONS"
DEFAULT_SESSIONS = 1000


def timed(measure, *args) -> dict:
    """`measure(*args)`'s result with the wall time it took (bench_wall_s)."""
    started = time.perf_counter()
    result = measure(*args)
    result["bench_wall_s"] = time.perf_counter() - started
    return result


def compare_servers(work: Path, sessions: int) -> dict:
    """B3, B4 and sampling on both servers side by side, then B7 on the batched one."""
    servers: dict[str, DevServer] = {}
    fleets: dict[str, SdkFleet] = {}
    result = {}
    try:
        started = time.perf_counter()
        servers = start_servers(work, sessions)
        keys = [servers[BATCHED].keys[name] for name in tenant_names()]
        for mode in MODES:
            fleets[mode] = SdkFleet(servers[mode].url, keys, MODEL, rank=LORA_RANK, batches=tenant_batches())
        say(f"two servers ({', '.join(MODES)}) and {TENANTS} SDK tenants on each ready in "
            f"{time.perf_counter() - started:.1f}s")
        result["training"] = timed(train_comparison, servers, fleets)
        result["sampling"] = timed(sampling_comparison, servers, fleets)
        fleets.pop(TIME_SLICED).close()  # B7 runs on the batched server alone
        servers.pop(TIME_SLICED).stop()
        result["sessions"] = timed(session_capacity, servers[BATCHED], sessions)
    finally:
        for fleet in fleets.values():
            fleet.close()
        for server in servers.values():
            server.stop()
    return result


def run(state_dir: str, sessions: int | None = None) -> dict:
    """Every figure of this benchmark; `sessions` for B7 defaults to $TWINKLE_BENCH_SESSIONS or 1000."""
    sessions = sessions or int(os.environ.get(SESSIONS_ENV, DEFAULT_SESSIONS))
    result: dict = {"model": MODEL, "vocab": VOCAB, "model_choice": MODEL_CHOICE,
                    "inprocess_training": timed(inprocess_training, state_dir),
                    "inprocess_sampling": timed(inprocess_sampling, state_dir)}
    work = Path(tempfile.mkdtemp(prefix="twinkle-bench-mt-"))
    try:
        result.update(compare_servers(work, sessions))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the servers' state: a thousand offloaded adapters
    return result
