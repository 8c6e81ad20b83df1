"""The Tinker SDK through a real server against the in-process loop, measured in the same run."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from bench.inprocess import make_engine, train_step_time, trivial_forward_time
from bench.workloads import (BENCH_MODEL, LORA_RANK, MEASURED_STEPS, WARMUP_STEPS, sft_batch, summarize, tinker_batch,
                             tokens_in, trivial_batch)
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


# What each process of a server is, from its command line (Ray names actor processes `ray::Class`).
ROLES = (("ray::BackendWorker", "model_worker"), ("ray::ServeReplica", "ingress_replica"),
         ("ray::ModelScheduler", "scheduler"), ("ray::ServeController", "serve_controller"),
         ("ray::ProxyActor", "serve_proxy"), ("gcs_server", "ray_gcs"), ("raylet", "ray_raylet"),
         ("DashboardAgent", "ray_dashboard_agent"), ("log_monitor", "ray_log_monitor"))


def cpu_seconds_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each process of the server started as `server_pid` (its embedded
    Ray included), by role, and by this process (the SDK client)."""
    import psutil

    totals: dict[str, float] = {}
    root = psutil.Process(server_pid)
    for proc in [psutil.Process(), root, *root.children(recursive=True)]:
        try:
            times, command = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue  # exited meanwhile
        role = "sdk_client" if proc.pid == psutil.Process().pid else next(
            (name for marker, name in ROLES if marker in command), "other")
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def sdk_loop(url: str, batch, vocab_size: int, steps: int = MEASURED_STEPS, then=None, cpu=None) -> dict:
    """Pipelined and naive SFT steps and trivial round trips through the unmodified SDK; `then(model_id)`
    runs before the session closes, its result under "then"; `cpu()` (CPU seconds by process role) is
    read around the pipelined steps, for what each process spends per step."""
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
            if i == WARMUP_STEPS and name == "pipelined" and cpu is not None:
                before = cpu()
            start = time.perf_counter()
            step()
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
        results[name] = summarize(times)
        if name == "pipelined" and cpu is not None:
            after = cpu()
            results["cpu_ms_per_step"] = {role: round(1000 * (after[role] - before.get(role, 0.0)) / steps, 2)
                                          for role in sorted(after, key=lambda r: before.get(r, 0.0) - after[r])}
    trivial = []
    for _ in range(20):
        start = time.perf_counter()
        client.optim_step(adam).result()  # no gradients pending: almost no compute
        trivial.append(time.perf_counter() - start)
    results["trivial_round_trip"] = summarize(trivial)
    tiny = tinker_batch(trivial_batch(vocab_size))
    forwards = []
    for i in range(WARMUP_STEPS + 20):
        start = time.perf_counter()
        client.forward(tiny, "cross_entropy").result()
        if i >= WARMUP_STEPS:
            forwards.append(time.perf_counter() - start)
    results["trivial_forward"] = summarize(forwards)
    if then is not None:
        results["then"] = then(client.model_id)
    service.close("success")
    return results


def twinkle_client_loop(url: str, batch, steps: int = MEASURED_STEPS) -> dict:
    """Twinkle's own API over HTTP: pipelined steps, trivial round trips, payload bytes per token."""
    from twinkle import AdamParams, LoraConfig, TrainingModel, wire
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


FRONTS = ("direct", "haproxy", "proxy")  # twinkle/http/front.py; the first is the embedded default
# The default front again with Ray Serve's own controller interval (0.1 s), for the cost of Serve's
# control loop beside the model (Twinkle's default `serve_control_loop_s` is 1 s).
SERVE_DEFAULT_LOOP = ("direct (Serve's 0.1 s control loop)", "direct", {"serve_control_loop_s": 0.1})
OPERATOR_KEY = "ops-bench-key"


def _p50_ms(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2] * 1000, 3)


def front_floor(url: str, calls: int = 50) -> float:
    """p50 ms of GET /api/v1/healthz: the HTTP front and the app's routing with no work behind them."""
    import requests

    session = requests.Session()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.get(url + "/api/v1/healthz").raise_for_status()
        times.append(time.perf_counter() - start)
    return _p50_ms(times)


def trivial_hops(url: str, model_id: str, calls: int = 30) -> dict:
    """A trivial optim_step sent by hand (submit, then retrieve_future), split with the server's
    Server-Timing header into the front (client clock minus `app`), the route (`app` minus
    `scheduler`) and the awaited scheduler calls, per HTTP request; p50 ms of each."""
    import requests

    from twinkle.http.timing import parse_server_timing

    session = requests.Session()
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    parts: dict[str, list[float]] = {}

    def post(name: str, path: str, body: dict) -> dict:
        start = time.perf_counter()
        reply = session.post(url + path, json=body, headers=headers)
        elapsed = time.perf_counter() - start
        reply.raise_for_status()
        timing = parse_server_timing(reply.headers.get("server-timing", ""))
        app, scheduler = timing["app"] / 1000, timing["scheduler"] / 1000
        for part, value in (("rtt", elapsed), ("front", elapsed - app), ("route", app - scheduler),
                            ("scheduler", scheduler)):
            parts.setdefault(f"{name}_{part}", []).append(value)
        return reply.json()

    for _ in range(calls):
        submitted = post("submit", "/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-4}})
        result = post("retrieve", "/api/v1/retrieve_future", {"request_id": submitted["request_id"]})
        assert "metrics" in result, result  # the step's result in one long poll
    return {f"{key}_ms": _p50_ms(values) for key, values in sorted(parts.items())}


def _scheduler_figures(url: str) -> dict:
    import requests

    reply = requests.get(url + "/api/v1/admin/status", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    reply.raise_for_status()
    stats = reply.json()["models"][BENCH_MODEL]
    return {"execute_ms_p50": stats["execute_ms_p50"], "train_passes": stats["train_passes"]}


def one_front(front: str, batch, vocab_size: int, state_dir: str, work_dir: str, overrides: dict | None = None,
              folder: str | None = None) -> dict:
    """B1 and B1b through one HTTP front, with the per-hop breakdown of the trivial round trip and the
    CPU each of the server's processes spends per pipelined step."""
    config = {"models": [{"name": BENCH_MODEL}], "state_dir": state_dir, "http_front": front,
              "auth": {"admin_keys": {"ops": OPERATOR_KEY}}, **(overrides or {})}
    with start_dev_server(Path(work_dir) / f"rpc-{folder or front}", config=config,
                          keys={"bench": BENCH_KEY}) as server:
        sdk = sdk_loop(server.url, batch, vocab_size, then=lambda model_id: (_scheduler_figures(server.url),
                                                                 trivial_hops(server.url, model_id)),
                       cpu=lambda: cpu_seconds_by_role(server.process.pid))
        passes, hops = sdk.pop("then")  # the scheduler's figures are read after the SDK's steps
        floor = front_floor(server.url)
    sdk_trivial = sdk["trivial_round_trip"]["p50_s"] * 1000
    by_hand = hops["submit_rtt_ms"] + hops["retrieve_rtt_ms"]
    return {"sdk": sdk, "healthz_ms": floor, "trivial_by_hand_ms": round(by_hand, 3),
            "hops_ms": {"sdk_client": round(sdk_trivial - by_hand, 3),
                        "http_front": round(hops["submit_front_ms"] + hops["retrieve_front_ms"], 3),
                        "route": round(hops["submit_route_ms"] + hops["retrieve_route_ms"], 3),
                        "scheduler_submit": hops["submit_scheduler_ms"],
                        "scheduler_wait_incl_worker": hops["retrieve_scheduler_ms"]},
            "hops_detail_ms": hops, "scheduler": passes}


def remote_paths(state_dir: str, work_dir: str) -> tuple[dict, dict]:
    """(rpc_overhead, client_overhead): the Tinker SDK through each HTTP front and Twinkle's client
    through the default one, against the in-process loop, all in this run on this machine."""
    engine = make_engine(state_dir)
    inproc = train_step_time(engine)
    inproc_forward = trivial_forward_time(engine)
    batch, vocab_size = sft_batch(engine.vocab_size), engine.vocab_size
    del engine
    gc.collect()
    local_call = local_trivial_round_trip(state_dir)
    fronts = {front: one_front(front, batch, vocab_size, state_dir, work_dir) for front in FRONTS}
    label, front, overrides = SERVE_DEFAULT_LOOP
    fronts[label] = one_front(front, batch, vocab_size, state_dir, work_dir, overrides, folder="serve-default-loop")
    with start_dev_server(Path(work_dir) / "rpc-client", config={"models": [{"name": BENCH_MODEL}],
                                                                 "state_dir": state_dir},
                          keys={"bench": BENCH_KEY}) as server:
        client = twinkle_client_loop(server.url, batch)
    n_tokens = tokens_in(batch)
    body = request_bytes(tinker_batch(batch))
    raw = n_tokens * (4 + 4 + 4)  # int32 input token, int32 target, float32 weight
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
        "note": "Twinkle's own API over HTTP (msgpack, the default front) vs local mode, same run",
    }
    by_front = {}
    for front, result in fronts.items():
        sdk = result["sdk"]
        pass_ms = result["scheduler"]["execute_ms_p50"].get("pass")
        by_front[front] = {
            "ratio": inproc["p50_s"] / sdk["pipelined"]["p50_s"],  # B1
            "trivial_forward_ms": sdk["trivial_forward"]["p50_s"] * 1000,  # B1b
            "trivial_round_trip_ms": sdk["trivial_round_trip"]["p50_s"] * 1000,  # an optim_step with nothing to do
            "sdk_pipelined_step_s": sdk["pipelined"]["p50_s"],
            "sdk_naive_step_s": sdk["naive"]["p50_s"],
            "naive_ratio": inproc["p50_s"] / sdk["naive"]["p50_s"],
            "overhead_ms_per_step": (sdk["pipelined"]["p50_s"] - inproc["p50_s"]) * 1000,
            "worker_pass_ms_p50": pass_ms,  # the scheduler's forward_backward batches, worker included
            "worker_ops_ms_p50": result["scheduler"]["execute_ms_p50"].get("ops"),
            "cpu_ms_per_step": sdk.get("cpu_ms_per_step"),  # by process, over the pipelined steps
            **{k: v for k, v in result.items() if k not in ("sdk", "scheduler")},
            "details": sdk,
        }
    default = by_front[FRONTS[0]]
    return {
        "ratio": default["ratio"],
        "trivial_forward_ms": default["trivial_forward_ms"],
        "inprocess_trivial_forward_ms": inproc_forward["p50_s"] * 1000,
        "trivial_round_trip_ms": default["trivial_round_trip_ms"],
        "front": FRONTS[0],
        "inprocess_step_s": inproc["p50_s"],
        "local_mode_trivial_call_ms": local_call["p50_s"] * 1000,  # train_state() in local mode
        "sdk_pipelined_step_s": default["sdk_pipelined_step_s"],
        "sdk_naive_step_s": default["sdk_naive_step_s"],
        "naive_ratio": default["naive_ratio"],
        "overhead_ms_per_step": default["overhead_ms_per_step"],
        "hops_ms": default["hops_ms"],
        "cpu_ms_per_step": default["cpu_ms_per_step"],
        "serve_default_loop": {key: by_front[SERVE_DEFAULT_LOOP[0]][key]
                               for key in ("ratio", "trivial_forward_ms", "trivial_round_trip_ms", "cpu_ms_per_step")},
        "fronts": by_front,
        "request_bytes_per_token": body / n_tokens,
        "raw_binary_bytes_per_token": raw / n_tokens,
        "tokens_per_step": n_tokens,
        "inprocess": inproc,
        "model": BENCH_MODEL,
        "note": "ratio (B1) = in-process step time / pipelined SDK step time; trivial_forward_ms (B1b) = a forward "
                "of one 16-token datum through the unmodified SDK (inprocess_trivial_forward_ms: the same in this "
                "process); trivial_round_trip_ms = an optim_step with nothing to apply; every front, the in-process loop "
                "and local mode measured in this run on this machine; hops_ms split the trivial round trip "
                "with the server's Server-Timing header; cpu_ms_per_step: CPU ms each process of the server (and the "
                "SDK client) spends per pipelined step; serve_default_loop: the default front with Ray Serve's own "
                "0.1 s controller interval instead of serve_control_loop_s=1",
    }, client_result
