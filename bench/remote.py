"""The Tinker SDK through a real server against the in-process loop, measured in the same run."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from bench.inprocess import make_engine, train_step_time
from bench.workloads import (BENCH_MODEL, LORA_RANK, MEASURED_STEPS, WARMUP_STEPS, sft_batch, summarize,
                             tinker_batch, tokens_in)
from twinkle.devserver import start_dev_server

BENCH_KEY = "tml-bench-key"


def request_bytes(data: list, model_id: str = "m") -> int:
    """Size of the protobuf body the SDK sends for this forward_backward."""
    from tinker import types
    from tinker.proto import request_conv

    request = request_conv.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id, seq_id=1)
    proto = request_conv.forward_backward_request_to_proto(request)
    return len(proto if isinstance(proto, bytes) else proto.SerializeToString())


def sdk_loop(url: str, batch, steps: int = MEASURED_STEPS) -> dict:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
    client = service.create_lora_training_client(base_model=BENCH_MODEL, rank=LORA_RANK, seed=0).result()
    data = tinker_batch(batch)
    adam = types.AdamParams(learning_rate=1e-4)

    def pipelined_step():
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam)
        fb.result()
        opt.result()

    def naive_step():
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()

    results = {}
    for name, step in (("pipelined", pipelined_step), ("naive", naive_step)):
        times = []
        for i in range(WARMUP_STEPS + steps):
            start = time.perf_counter()
            step()
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
        results[name] = summarize(times)
    trivial = []
    for _ in range(20):
        start = time.perf_counter()
        client.optim_step(adam).result()  # no gradients pending: almost no compute
        trivial.append(time.perf_counter() - start)
    results["trivial_round_trip"] = summarize(trivial)
    service.close("success")
    return results


def twinkle_client_loop(url: str, batch, steps: int = MEASURED_STEPS) -> dict:
    """Twinkle's own API over HTTP: pipelined steps, trivial round trips, payload bytes per token."""
    from twinkle import AdamParams, LoraConfig, TrainingModel
    from twinkle import wire
    from twinkle.api.spec import ForwardArgs
    from twinkle.client.backend import RemoteBackend
    from twinkle.client.transports import HttpTransport

    backend = RemoteBackend(HttpTransport(url, BENCH_KEY))
    try:
        model = TrainingModel(BENCH_MODEL, LoraConfig(rank=LORA_RANK, seed=0),
                              optimizer=AdamParams(learning_rate=1e-4), backend=backend)
        times = []
        for i in range(WARMUP_STEPS + steps):
            start = time.perf_counter()
            fb, opt = model.forward_backward(batch), model.step()
            fb.result()
            opt.result()
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
        trivial = []
        for _ in range(20):
            start = time.perf_counter()
            model.train_state().result()
            trivial.append(time.perf_counter() - start)
    finally:
        backend.close()
    body = len(wire.dumps({"target_id": "m", "seq_id": 1, "args": ForwardArgs(data=batch).model_dump()}))
    return {"pipelined": summarize(times), "trivial_round_trip": summarize(trivial), "request_bytes": body}


def local_trivial_round_trip(state_dir: str) -> dict:
    """The same trivial call in local mode (in-process backend), for the per-call overhead."""
    from twinkle import LoraConfig, TrainingModel
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir)
    try:
        model = TrainingModel(BENCH_MODEL, LoraConfig(rank=LORA_RANK, seed=0), backend=backend)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            model.train_state().result()
            times.append(time.perf_counter() - start)
    finally:
        backend.close()
    return summarize(times)


def remote_paths(state_dir: str, work_dir: str) -> tuple[dict, dict]:
    """(rpc_overhead, client_overhead): the Tinker SDK and Twinkle's client through one server,
    against the in-process loop, all in this run on this machine."""
    engine = make_engine(state_dir)
    inproc = train_step_time(engine)
    batch = sft_batch(engine.vocab_size)
    del engine
    gc.collect()
    local_call = local_trivial_round_trip(state_dir)
    with start_dev_server(Path(work_dir) / "rpc-server", config={"models": [{"name": BENCH_MODEL}],
                                                                   "state_dir": state_dir},
                          keys={"bench": BENCH_KEY}) as server:
        remote = sdk_loop(server.url, batch)
        client = twinkle_client_loop(server.url, batch)
    n_tokens = tokens_in(batch)
    body = request_bytes(tinker_batch(batch))
    raw = n_tokens * (4 + 4 + 4)  # int32 input token, int32 target, float32 weight
    ratio = inproc["p50_s"] / remote["pipelined"]["p50_s"]
    client_result = {
        "ratio": inproc["p50_s"] / client["pipelined"]["p50_s"],
        "inprocess_step_s": inproc["p50_s"],
        "http_client_pipelined_step_s": client["pipelined"]["p50_s"],
        "per_call_overhead_ms": (client["trivial_round_trip"]["p50_s"] - local_call["p50_s"]) * 1000,
        "http_trivial_round_trip_ms": client["trivial_round_trip"]["p50_s"] * 1000,
        "local_trivial_round_trip_ms": local_call["p50_s"] * 1000,
        "request_bytes_per_token": client["request_bytes"] / n_tokens,
        "raw_binary_bytes_per_token": raw / n_tokens,
        "tokens_per_step": n_tokens,
        "details": {"inprocess": inproc, "http_client": client, "local_call": local_call},
        "model": BENCH_MODEL,
        "note": "Twinkle's own API over HTTP (msgpack) vs local mode, same run",
    }
    return {
        "ratio": ratio,
        "inprocess_step_s": inproc["p50_s"],
        "sdk_pipelined_step_s": remote["pipelined"]["p50_s"],
        "sdk_naive_step_s": remote["naive"]["p50_s"],
        "naive_ratio": inproc["p50_s"] / remote["naive"]["p50_s"],
        "overhead_ms_per_step": (remote["pipelined"]["p50_s"] - inproc["p50_s"]) * 1000,
        "trivial_round_trip_ms": remote["trivial_round_trip"]["p50_s"] * 1000,
        "request_bytes_per_token": body / n_tokens,
        "raw_binary_bytes_per_token": raw / n_tokens,
        "tokens_per_step": n_tokens,
        "details": {"inprocess": inproc, "sdk": remote},
        "model": BENCH_MODEL,
        "note": "ratio = remote throughput / in-process throughput (same batch, same machine, same run)",
    }, client_result
