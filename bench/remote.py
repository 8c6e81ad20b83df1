"""The Tinker SDK through a real server against the in-process loop, measured in the same run."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from bench.contention import split_overhead, step_under_load
from bench.inprocess import make_engine, train_step_time, trivial_forward_time
from bench.rounds import ROUNDS, run_in_rounds, summary_with_samples
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


def cpu_ms_per_call(before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, float]:
    """CPU ms per call of each process role between two `cpu_seconds_by_role` readings, largest first."""
    return {role: round(1000 * (after[role] - before.get(role, 0.0)) / calls, 2)
            for role in sorted(after, key=lambda r: before.get(r, 0.0) - after[r])}


def cpu_floor_ms(cpu_ms: dict[str, float] | None, cores: int | None = None) -> float | None:
    """The shortest wall time in which this machine's cores can supply the CPU ms the processes spent."""
    if not cpu_ms:
        return None
    return round(sum(cpu_ms.values()) / (cores or os.cpu_count() or 1), 2)


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
        results[name] = summary_with_samples(times)
        if name == "pipelined" and cpu is not None:
            results["cpu_ms_per_step"] = cpu_ms_per_call(before, cpu(), steps)
    trivial = []
    for _ in range(20):
        start = time.perf_counter()
        client.optim_step(adam).result()  # no gradients pending: almost no compute
        trivial.append(time.perf_counter() - start)
    results["trivial_round_trip"] = summary_with_samples(trivial)
    tiny = tinker_batch(trivial_batch(vocab_size))
    forwards = []
    for i in range(WARMUP_STEPS + 20):
        if i == WARMUP_STEPS and cpu is not None:
            before = cpu()
        start = time.perf_counter()
        client.forward(tiny, "cross_entropy").result()
        if i >= WARMUP_STEPS:
            forwards.append(time.perf_counter() - start)
    results["trivial_forward"] = summary_with_samples(forwards)
    if cpu is not None:
        results["cpu_ms_per_trivial_forward"] = cpu_ms_per_call(before, cpu(), len(forwards))
    if then is not None:
        results["then"] = then(client.model_id)
    service.close("success").result(timeout=60)  # a reply landing during exit would abort the process
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


GPU_ENV = "TWINKLE_BENCH_GPU"  # "1": the server's model worker and the in-process engine each on a GPU


def bench_model() -> dict:
    """The bench model's entry in the server config: a CPU worker, or with TWINKLE_BENCH_GPU=1 a worker
    holding one GPU, so B1 is measured as a GPU worker sees it (its cores no longer shared with the
    HTTP layer, the scheduler and the SDK)."""
    on_gpu = bench_device() == "cuda"
    return {"name": BENCH_MODEL, **({"gpus_per_worker": 1, "device": "auto"} if on_gpu else {})}


def bench_device() -> str:
    """Where the in-process floor runs: the same kind of device as the server's worker."""
    return "cuda" if os.environ.get(GPU_ENV) == "1" else "cpu"


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


def traced_round_trips(url: str, path: str, body: dict, calls: int = 30) -> dict:
    """A request sent by hand (submit to `path`, then retrieve_future), `calls` times, split into hops
    with the server's Server-Timing and the absolute marks of the request's span; p50 ms of each.

    The hops tile the round trip: the submit's HTTP front (client clock minus `app`), route and
    scheduler call; the request's `queue` in the scheduler and the rest of the time until its batch
    started (`submit_to_start` is the whole of that, measured directly: client send to batch start);
    `run` (the batch in the workers, Ray hops included; `compute` is the workers' own part of it and
    `to_worker_and_back` the rest) and `finish`; then `ready_to_client`
    (measured directly: result ready to this client holding the reply), of which `wake` is the hop
    back to the route. Client and server share this host's clock."""
    import requests

    from twinkle.http.timing import parse_server_timing

    session = requests.Session()
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    parts: dict[str, list[float]] = {}

    def post(route: str, payload: dict) -> tuple[dict, dict, float, float]:
        sent = time.time()
        reply = session.post(url + route, json=payload, headers=headers)
        received = time.time()
        reply.raise_for_status()
        return reply.json(), parse_server_timing(reply.headers.get("server-timing", "")), sent, received

    for _ in range(calls):
        submitted, submit, sent, submit_back = post(path, body)
        result, retrieve, _, received = post("/api/v1/retrieve_future", {"request_id": submitted["request_id"]})
        assert "type" not in result or result["type"] != "try_again", result  # one long poll holds the result
        ms = {"rtt": (received - sent) * 1000,
              "submit_http_front": (submit_back - sent) * 1000 - submit["app"],
              "submit_route": submit["app"] - submit["scheduler"],
              "scheduler_submit": submit["scheduler"],
              "submit_to_start": (retrieve["started"] - sent) * 1000,
              "queue": retrieve["queue"], "run": retrieve["run"], "finish": retrieve["finish"],
              "compute": retrieve["compute"], "to_worker_and_back": retrieve["run"] - retrieve["compute"],
              "ready_to_client": (received - retrieve["ready"]) * 1000, "wake": retrieve["wake"],
              "retrieve_http_front": (received - submit_back) * 1000 - retrieve["app"],
              "retrieve_route": retrieve["app"] - retrieve["scheduler"]}
        for name, value in ms.items():
            parts.setdefault(name, []).append(value / 1000)
    return {name: _p50_ms(values) for name, values in parts.items()}


def _json_datum(datum) -> dict:
    """A cross-entropy datum in the Tinker JSON wire shape (what SDKs before protobuf send)."""
    def tensor(values, dtype: str) -> dict:
        return {"data": values.tolist(), "dtype": dtype, "shape": [len(values)]}

    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": datum.input_tokens.tolist()}]},
            "loss_fn_inputs": {"target_tokens": tensor(datum.loss_inputs["target_tokens"], "int64"),
                               "weights": tensor(datum.loss_inputs["weights"], "float32")}}


def trivial_hops(url: str, model_id: str, tiny: list) -> dict:
    """Per-hop p50 ms of B1b's trivial forward and of an empty optim_step, each sent by hand."""
    forward = {"model_id": model_id,
               "forward_input": {"data": [_json_datum(datum) for datum in tiny], "loss_fn": "cross_entropy"}}
    return {"forward": traced_round_trips(url, "/api/v1/forward", forward),
            "empty_step": traced_round_trips(url, "/api/v1/optim_step",
                                             {"model_id": model_id, "adam_params": {"learning_rate": 1e-4}})}


def _scheduler_figures(url: str) -> dict:
    import requests

    reply = requests.get(url + "/api/v1/admin/status", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    reply.raise_for_status()
    stats = reply.json()["models"][BENCH_MODEL]
    return {key: stats[key] for key in ("execute_ms_p50", "compute_ms_p50", "train_passes")}


def one_front(front: str, batch, vocab_size: int, state_dir: str, work_dir: str, overrides: dict | None = None,
              folder: str | None = None, steps: int = MEASURED_STEPS) -> dict:
    """B1 and B1b through one HTTP front, with the per-hop breakdown of the trivial round trip and the
    CPU each of the server's processes spends per pipelined step."""
    config = {"models": [bench_model()], "state_dir": state_dir, "http_front": front,
              "auth": {"admin_keys": {"ops": OPERATOR_KEY}}, **(overrides or {})}
    tiny = trivial_batch(vocab_size)
    with start_dev_server(Path(work_dir) / f"rpc-{folder or front}", config=config,
                          keys={"bench": BENCH_KEY}) as server:
        sdk = sdk_loop(server.url, batch, vocab_size, steps=steps,
                       then=lambda model_id: (_scheduler_figures(server.url), trivial_hops(server.url, model_id, tiny)),
                       cpu=lambda: cpu_seconds_by_role(server.process.pid))
        passes, hops = sdk.pop("then")  # the scheduler's figures are read after the SDK's steps
        floor = front_floor(server.url)
    return {"sdk": sdk, "healthz_ms": floor, **hop_breakdown(hops["forward"], sdk["trivial_forward"]["p50_s"]),
            "empty_step_hops_ms": hops["empty_step"], "scheduler": passes}


def hop_breakdown(hops: dict, sdk_forward_s: float) -> dict:
    """B1b's trivial forward split per hop (`hops_ms`: each figure measured on its own, so their sum is
    near but not exactly the round trip) and as a timeline whose parts add up to it (`timeline_ms`:
    client send -> batch start -> batch done -> result ready -> client holds it), with the SDK's own
    share: the SDK's trivial forward minus the same request sent by hand."""
    sdk_client = round(sdk_forward_s * 1000 - hops["rtt"], 3)
    return {
        "hops_ms": {"sdk_client": sdk_client,
                    "http_front": round(hops["submit_http_front"] + hops["retrieve_http_front"], 3),
                    "route": round(hops["submit_route"] + hops["retrieve_route"], 3),
                    "scheduler_submit": hops["scheduler_submit"], "queue": hops["queue"],
                    "to_worker_and_back": hops["to_worker_and_back"], "worker_compute": hops["compute"],
                    "finish": hops["finish"], "back_to_route": hops["wake"]},
        "timeline_ms": {"sdk_client": sdk_client, "submit_to_start": hops["submit_to_start"], "run": hops["run"],
                        "finish": hops["finish"], "ready_to_client": hops["ready_to_client"]},
        "trivial_by_hand_ms": hops["rtt"],
        "hops_detail_ms": hops,
    }


def remote_paths(state_dir: str, work_dir: str) -> tuple[dict, dict]:
    """(rpc_overhead, client_overhead): the Tinker SDK through each HTTP front and Twinkle's client
    through the default one, against the in-process loop, all in this run on this machine."""
    engine = make_engine(state_dir, device=bench_device())
    inproc = train_step_time(engine)
    inproc_forward = trivial_forward_time(engine)
    batch, vocab_size = sft_batch(engine.vocab_size), engine.vocab_size
    del engine
    gc.collect()
    local_call = local_trivial_round_trip(state_dir)
    variants = {front: (front, None, front) for front in FRONTS}
    label, front, overrides = SERVE_DEFAULT_LOOP
    variants[label] = (front, overrides, "serve-default-loop")

    def run(label: str, number: int) -> dict:
        front, overrides, folder = variants[label]
        return one_front(front, batch, vocab_size, state_dir, work_dir, overrides, folder=f"{folder}-{number}",
                         steps=MEASURED_STEPS // ROUNDS)

    fronts = run_in_rounds(list(variants), run)
    with start_dev_server(Path(work_dir) / "rpc-client", config={"models": [bench_model()],
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
            "worker_compute_ms_p50": result["scheduler"]["compute_ms_p50"],  # per batch kind, no Ray hops
            "cpu_ms_per_step": sdk.get("cpu_ms_per_step"),  # by process, over the pipelined steps
            "cpu_ms_per_trivial_forward": sdk.get("cpu_ms_per_trivial_forward"),  # by process, over B1b's calls
            **{k: v for k, v in result.items() if k not in ("sdk", "scheduler")},
            "details": sdk,
        }
    default = by_front[FRONTS[0]]
    engine = make_engine(state_dir, device=bench_device())
    contention = {**split_overhead(inproc["p50_s"], default["sdk_pipelined_step_s"], default["worker_compute_ms_p50"]),
                  "control": step_under_load(engine, default["cpu_ms_per_step"], default["sdk_pipelined_step_s"])}
    del engine
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
        "timeline_ms": default["timeline_ms"],
        "cpu_ms_per_step": default["cpu_ms_per_step"],
        "cpu_ms_per_trivial_forward": default["cpu_ms_per_trivial_forward"],
        "trivial_forward_cpu_floor_ms": cpu_floor_ms(default["cpu_ms_per_trivial_forward"]),
        "contention": contention,
        "serve_default_loop": {key: by_front[SERVE_DEFAULT_LOOP[0]][key]
                               for key in ("ratio", "trivial_forward_ms", "trivial_round_trip_ms", "cpu_ms_per_step")},
        "fronts": by_front,
        "request_bytes_per_token": body / n_tokens,
        "raw_binary_bytes_per_token": raw / n_tokens,
        "tokens_per_step": n_tokens,
        "inprocess": inproc,
        "model": BENCH_MODEL,
        "note": "every front ran in rounds of alternating order, its rounds pooled (bench/rounds.py); "
                "ratio (B1) = in-process step time / pipelined SDK step time; trivial_forward_ms (B1b) = a forward "
                "of one 16-token datum through the unmodified SDK (inprocess_trivial_forward_ms: the same in this "
                "process); trivial_round_trip_ms = an optim_step with nothing to apply; every front, the in-process loop "
                "and local mode measured in this run on this machine; hops_ms split B1b's trivial forward per hop "
                "with the server's Server-Timing header (worker_compute: the worker's own forward; to_worker_and_back: "
                "the rest of the batch's time in the workers, i.e. the Ray hops); "
                "timeline_ms tiles it with the request's absolute marks (submit_to_start: client send to its batch "
                "starting; ready_to_client: result ready to the client holding it); cpu_ms_per_step: CPU ms each "
                "process of the server (and the SDK client) spends per pipelined step, and "
                "cpu_ms_per_trivial_forward per B1b call, and trivial_forward_cpu_floor_ms their sum over this "
                "machine's cores: no round trip that takes that much CPU can be faster; serve_default_loop: the "
                "default front with Ray Serve's own 0.1 s controller interval instead of serve_control_loop_s=1; "
                "contention: the overhead per step split into the workers' compute slowing down in the server "
                "(contention_ms_per_step = their own fb + optim_step medians minus the in-process step: what a GPU "
                "worker would not pay) and the rest (request_path_ms_per_step: the worker waiting on hops, HTTP "
                "and the SDK, which it keeps); ratio_without_contention = B1 with the in-process compute time; "
                "control: the in-process step alone and beside helper processes keeping busy the share of a core "
                "the server's other processes and the SDK used per step, with no server running",
    }, client_result
