"""How much of the server's slowdown is CPU contention, and how much is the request path's latency.

On a CPU-only machine the model's forward/backward shares its cores with everything else the server
runs per step: the HTTP replica, the scheduler, Ray's background processes and, in the benchmark, the
SDK client itself. torch's parallel regions end in a barrier, so a core taken away from one of its
threads for a few milliseconds stalls the whole pass. A GPU worker does not pay this (its compute is not
on those cores); the hops' latency it keeps.

`split_overhead` measures the two directly: the workers' own compute per step in the server (the
scheduler's `compute_ms_p50`) against the same step in-process is the contention; the SDK step beyond
that compute is the request path. `step_under_load` is the control: the in-process step beside helper
processes that keep busy the share of a core the server's other processes used per step, in short bursts
like request handling, slows the same way with no server at all.
"""

from __future__ import annotations

from bench.cpu_load import cpu_load
from bench.inprocess import train_step_time
from twinkle.backends import TrainingBackend


def other_core_share(cpu_ms_per_step: dict[str, float], step_s: float, worker_role: str = "model_worker") -> float:
    """The share of a core the processes other than the model's worker used over one step."""
    others = sum(ms for role, ms in cpu_ms_per_step.items() if role != worker_role)
    return others / (step_s * 1000)


def split_overhead(inprocess_step_s: float, sdk_step_s: float, compute_ms_p50: dict[str, float]) -> dict:
    """The SDK step's overhead over the in-process step, split into the workers' compute slowing down in
    the server (contention) and the time the worker waits on the request path (hops, SDK, HTTP)."""
    compute_ms = compute_ms_p50.get("pass", 0.0) + compute_ms_p50.get("ops", 0.0)  # forward_backward + optim_step
    inprocess_ms, sdk_ms = inprocess_step_s * 1000, sdk_step_s * 1000
    return {
        "worker_compute_ms_per_step": round(compute_ms, 1),
        "contention_ms_per_step": round(compute_ms - inprocess_ms, 1),
        "request_path_ms_per_step": round(sdk_ms - compute_ms, 1),
        "ratio_without_contention": inprocess_ms / (inprocess_ms + sdk_ms - compute_ms),
    }


def step_under_load(engine: TrainingBackend, cpu_ms_per_step: dict[str, float], sdk_step_s: float) -> dict:
    """The control: the in-process step alone and then beside the CPU load the server's other processes
    put on the machine per SDK step (back to back, no server running)."""
    share = other_core_share(cpu_ms_per_step, sdk_step_s)
    alone = train_step_time(engine)
    with cpu_load(share):
        loaded = train_step_time(engine)
    return {
        "other_processes_core_share": round(share, 3),
        "inprocess_step_alone_s": alone["p50_s"],
        "inprocess_step_under_load_s": loaded["p50_s"],
        "slowdown_under_load": loaded["p50_s"] / alone["p50_s"],
    }
