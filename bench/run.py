"""Run every benchmark and write JSON results under bench/results/.

    python -m bench.run            # everything
    python -m bench.run baseline   # only the in-process baseline
    TWINKLE_BENCH_SESSIONS=200 python -m bench.run multitenant   # fewer sessions for B7 (default 1000)
    TWINKLE_BENCH_GPU=1 python -m bench.run rpc_overhead   # B1/B1b with the worker and in-process floor on a GPU
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.host import cpu_counters, describe_host

RESULTS = Path(__file__).resolve().parent / "results"


def environment(counters_at_start: dict[str, int] | None = None) -> dict:
    """The machine a result was measured on, and how much of its CPU the host took since the run began."""
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **describe_host(counters_at_start)}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return path


def baseline(state_dir: str) -> dict:
    from bench.inprocess import make_engine, sampling_throughput, train_step_time
    from bench.workloads import BATCH_SIZE, BENCH_MODEL, LORA_RANK, SEQ_LEN

    started, counters = time.perf_counter(), cpu_counters()
    engine = make_engine(state_dir)
    train = train_step_time(engine)
    sample = sampling_throughput(engine)
    result = {"model": BENCH_MODEL, "batch": [BATCH_SIZE, SEQ_LEN], "lora_rank": LORA_RANK,
              "train": train, "sampling": sample, "env": environment(counters),
              "wall_s": time.perf_counter() - started}
    print(f"in-process: {train['p50_s'] * 1000:.1f} ms/step, {train['train_tokens_per_s']:.0f} train tok/s; "
          f"sampling {sample['sampled_tokens_per_s']:.0f} tok/s")
    write("baseline", result)
    return result


def rpc_overhead(state_dir: str) -> dict:
    from bench.remote import remote_paths

    started, counters = time.perf_counter(), cpu_counters()
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-") as work:
        result, client = remote_paths(state_dir, work)
    result["env"] = client["env"] = environment(counters)
    result["wall_s"] = client["wall_s"] = time.perf_counter() - started
    for front, figures in result["fronts"].items():
        print(f"SDK via server ({front}): {figures['sdk_pipelined_step_s'] * 1000:.1f} ms/step pipelined vs "
              f"{result['inprocess_step_s'] * 1000:.1f} ms in-process -> ratio {figures['ratio']:.3f}; trivial forward "
              f"{figures['trivial_forward_ms']:.1f} ms (in-process {result['inprocess_trivial_forward_ms']:.1f}), "
              f"its hops {figures['hops_ms']}; empty optim_step {figures['trivial_round_trip_ms']:.1f} ms")
    print(f"CPU ms per pipelined step by process ({result['front']}): {result['cpu_ms_per_step']}")
    print(f"CPU ms per trivial forward by process: {result['cpu_ms_per_trivial_forward']} -> no faster than "
          f"{result['trivial_forward_cpu_floor_ms']} ms on this machine's cores")
    split, control = result["contention"], result["contention"]["control"]
    print(f"of the {result['overhead_ms_per_step']:.0f} ms overhead per step: the workers' compute slowed by "
          f"{split['contention_ms_per_step']:.0f} ms (CPU contention), request path {split['request_path_ms_per_step']:.0f} "
          f"ms -> ratio without contention {split['ratio_without_contention']:.3f}; control: in-process step "
          f"{control['inprocess_step_alone_s'] * 1000:.0f} ms alone, {control['inprocess_step_under_load_s'] * 1000:.0f} "
          f"ms beside {control['other_processes_core_share']:.2f} of a core of load")
    print(f"{result['request_bytes_per_token']:.1f} request bytes/token (raw {result['raw_binary_bytes_per_token']:.0f})")
    write("rpc_overhead", result)
    print(f"Twinkle client via server: {client['http_client_pipelined_step_s'] * 1000:.1f} ms/step -> ratio "
          f"{client['ratio']:.3f}; per-call overhead {client['per_call_overhead_ms']:.1f} ms over local mode; "
          f"{client['request_bytes_per_token']:.1f} request bytes/token")
    write("client_overhead", client)
    return result


def _timed(name: str, run) -> dict:
    """Run one benchmark module's `run()`, stamp its wall time and environment, write its JSON."""
    started, counters = time.perf_counter(), cpu_counters()
    result = run()
    result["wall_s"] = time.perf_counter() - started
    result["env"] = environment(counters)
    write(name, result)
    return result


def multitenant(state_dir: str) -> dict:
    """Eight tenants through the server, batched vs time-sliced passes (bench/multitenant.py)."""
    from bench.multitenant import run

    return _timed("multitenant", lambda: run(state_dir))


def sampling(state_dir: str) -> dict:
    """vLLM sampler vs transformers sampler, side by side (needs `make vllm-venv`)."""
    from bench.sampling import run

    return _timed("sampling", lambda: run(state_dir))


def megatron(state_dir: str) -> dict:
    """Megatron backend step time at TP=1 and TP=2 vs the transformers backend (bench/megatron.py)."""
    from bench.megatron import run

    return _timed("megatron", lambda: run(state_dir))


BENCHMARKS = {"baseline": baseline, "rpc_overhead": rpc_overhead, "multitenant": multitenant, "sampling": sampling,
              "megatron": megatron}


def main(argv: list[str]) -> None:
    names = argv or list(BENCHMARKS)
    given = os.environ.get("TWINKLE_STATE_DIR")
    state_dir = given or tempfile.mkdtemp(prefix="twinkle-bench-")
    try:
        for name in names:
            BENCHMARKS[name](state_dir)
    finally:
        if not given:  # our own scratch state (built models, a store): nothing to keep
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
