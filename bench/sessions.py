"""B7: how many sessions one base model holds, how many adapters stay resident, that 64 of them
train in one pass, and what restoring an idle tenant costs.

Thousands of sessions are created with raw HTTP on the Tinker routes (`tinker_http`): an SDK
ServiceClient per session would load this 2-core machine more than the server does.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bench.tenancy import MAX_ADAPTERS, MODEL, SESSIONS_TENANT, VOCAB, delta, say
from bench.tinker_http import TinkerHttp
from bench.workloads import sft_batch, summarize
from twinkle import layout
from twinkle.devserver import DevServer

SESSION_RANK = 4  # small, so a thousand offloaded adapters stay small on disk
CLIENT_THREADS = 8  # concurrent HTTP clients that create sessions and submit passes
PASS_DATA = (1, 64)  # rows x tokens of each of the 64 models' forward_backward
BLOCKER_DATA = (16, 512)  # a long pass that runs while the 64 requests arrive, so they meet in one pass
RESTORE_PROBES = 7
GOAL_RESTORE_S = 0.2
PROGRESS_EVERY = 100


def wait_until(condition, timeout_s: float = 60.0, every_s: float = 0.01) -> None:
    """Poll `condition` until it holds: a benchmark's sync point on the status endpoint."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s:.0f}s")
        time.sleep(every_s)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(sub-folders, bytes of all files) under `folder`."""
    if not folder.exists():
        return 0, 0
    runs = sum(1 for p in folder.iterdir() if p.is_dir())
    return runs, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class SessionFleet:
    """One tenant holding many sessions, one training model each, over raw Tinker HTTP."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        self.http = TinkerHttp(server.url, server.keys[SESSIONS_TENANT])
        self.models: list[str] = []
        self._next_seq: Counter[str] = Counter()
        self.data = sft_batch(VOCAB, seed=7, batch_size=PASS_DATA[0], seq_len=PASS_DATA[1])

    def status(self) -> dict:
        return self.http.status()[MODEL]

    def seq(self, model: str) -> int:
        """The model's next seq_id (the Tinker protocol numbers a model's requests; 0 was create_model)."""
        self._next_seq[model] += 1
        return self._next_seq[model]

    def create(self, count: int) -> float:
        """`count` sessions with a model each, CLIENT_THREADS at a time; returns the wall time."""
        def create_one(i: int) -> str:
            session = self.http.create_session()
            request, model = self.http.create_model(session, MODEL, rank=SESSION_RANK, seed=i)
            self.http.result(request)
            return model

        ids: list[str] = [""] * count
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            futures = {pool.submit(create_one, i): i for i in range(count)}
            for done, future in enumerate(as_completed(futures), 1):
                ids[futures[future]] = future.result()
                if done % PROGRESS_EVERY == 0 or done == count:
                    say(f"  {done}/{count} sessions with a model ({done / (time.perf_counter() - start):.1f}/s)")
        self.models = ids
        return time.perf_counter() - start

    def submit(self, model: str, data=None, *, backward: bool) -> str:
        return self.http.forward(model, self.seq(model), self.data if data is None else data, backward=backward)

    def timed_forward(self, model: str) -> float:
        start = time.perf_counter()
        self.http.result(self.submit(model, backward=False))
        return time.perf_counter() - start

    def offload_usage(self) -> tuple[int, int]:
        """(offloaded model folders, bytes) of this tenant on the server's disk."""
        return folder_bytes(layout.offload_folder(self.server.state_dir, SESSIONS_TENANT, "x").parent)


def one_pass(fleet: SessionFleet, group: list[str]) -> dict:
    """forward_backward of every model in `group` (offloaded ones), submitted while a long pass runs
    alone, so that they are all queued when the lane forms its next pass."""
    blocker_model = fleet.models[-1]

    def lane_running_alone() -> bool:
        now = fleet.status()
        return now["busy"] and not now["queued"]

    before = fleet.status()
    blocker = fleet.submit(blocker_model, sft_batch(VOCAB, seed=8, batch_size=BLOCKER_DATA[0],
                                                    seq_len=BLOCKER_DATA[1]), backward=True)
    wait_until(lane_running_alone)
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        requests = list(pool.map(lambda model: fleet.submit(model, backward=True), group))
        submitted_s = time.perf_counter() - start
        fleet.http.result(blocker)
        blocker_s = time.perf_counter() - start
        list(pool.map(fleet.http.result, requests))
    pass_s = time.perf_counter() - start - blocker_s
    after = fleet.status()
    result = {"models": len(group), "max_models_per_pass": after["max_models_per_pass"],
              "passes": delta(after, before, "train_passes"),
              "pass_requests": delta(after, before, "train_pass_requests"),
              "restores": delta(after, before, "restores"), "offloads": delta(after, before, "offloads"),
              "submit_s": submitted_s, "blocker_done_s": blocker_s, "pass_wall_s": pass_s,
              "blocker_rows_tokens": list(BLOCKER_DATA), "rows_tokens_each": list(PASS_DATA),
              "note": "the requests were submitted while a long pass (the blocker) ran; pass_wall_s is from the "
                      "blocker's result to the last of theirs (restores and evictions included)"}
    say(f"B7 one pass: {len(group)} offloaded models' forward_backward -> max_models_per_pass "
        f"{result['max_models_per_pass']} ({result['passes']} passes for {result['pass_requests']} requests, "
        f"{result['restores']} restores) in {pass_s:.2f}s")
    return result


def restore_latency(fleet: SessionFleet, candidates: list[str]) -> dict:
    """The same forward on an idle (offloaded) model, then at once again (now resident): the difference
    is what restoring costs the idle tenant (evicting another model included)."""
    resident = set(fleet.status()["resident_models"])
    probes = [model for model in candidates if model not in resident][:RESTORE_PROBES]
    cold, warm = [], []
    for model in probes:
        cold.append(fleet.timed_forward(model))
        warm.append(fleet.timed_forward(model))
    penalty = [c - w for c, w in zip(cold, warm)]
    result = {"median_s": statistics.median(penalty), "penalties_s": penalty, "offloaded_forward": summarize(cold),
              "resident_forward": summarize(warm), "goal_s": GOAL_RESTORE_S, "probes": len(probes)}
    say(f"B7 restore latency: {result['median_s'] * 1000:.0f} ms median (goal <= {GOAL_RESTORE_S * 1000:.0f}); "
        f"offloaded forward {result['offloaded_forward']['p50_s'] * 1000:.0f} ms, "
        f"resident {result['resident_forward']['p50_s'] * 1000:.0f} ms")
    return result


def session_capacity(server: DevServer, sessions: int) -> dict:
    """B7 on `server` (batched, MAX_ADAPTERS slots, quotas raised for `sessions` models)."""
    fleet = SessionFleet(server)
    create_s = fleet.create(sessions)
    held = fleet.status()
    offloaded, offload_bytes = fleet.offload_usage()
    say(f"B7 sessions: {sessions} sessions with a model each in {create_s:.1f}s; resident {held['resident']}, "
        f"{offloaded} offloaded ({offload_bytes / 2**20:.1f} MiB on disk)")
    shared = one_pass(fleet, fleet.models[:MAX_ADAPTERS])  # the oldest: offloaded once sessions >= 2 x slots
    restore = restore_latency(fleet, fleet.models[MAX_ADAPTERS:-1])
    final = fleet.status()
    return {"sessions": sessions, "models": sessions, "create_wall_s": create_s,
            "sessions_per_s": sessions / create_s, "max_adapters": MAX_ADAPTERS, "resident": held["resident"],
            "offloaded": offloaded, "offload_bytes": offload_bytes, "lora_rank": SESSION_RANK,
            "offloads_total": final["offloads"], "restores_total": final["restores"],
            "one_pass": shared, "restore_latency": restore}
