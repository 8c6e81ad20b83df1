"""The HTTP fronts (twinkle/http/front.py): which process answers on the server's port, and that the
unmodified Tinker SDK trains and samples through each front."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.server.conftest import KEYS, start_twinkle_server


def _listener(port: int) -> str:
    """The command line (Ray's process title) of the process listening on `port` here."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline())
    raise AssertionError(f"nothing listens on port {port}")


def _port(handle) -> int:
    return int(handle.url.rsplit(":", 1)[1])


def _train_and_sample(url: str, key: str) -> list[float]:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=0).result()
        tokens = list(range(5, 37))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        losses = []
        for _ in range(10):
            out = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(out.result().metrics["loss:sum"])
        sampler = training.save_weights_and_get_sampling_client().result()
        sample = sampler.sample(types.ModelInput.from_ints(tokens[:4]), 1,
                                types.SamplingParams(max_tokens=4, temperature=0.0)).result()
        assert len(sample.sequences[0].tokens) == 4
        return losses
    finally:
        service.close("success").result(timeout=30)


def test_the_default_front_is_the_ingress_replica_on_the_configured_port(server):
    info = json.loads((server.state_dir / "server.json").read_text())
    assert info["http_front"] == "direct"
    assert "ServeReplica" in _listener(_port(server))  # no proxy hop between the client and the app
    assert info["serve_proxy_port"] != _port(server)
    assert "Proxy" in _listener(info["serve_proxy_port"])  # Serve's own proxy moved out of the way


def test_serves_controller_loop_runs_at_the_configured_interval(server):
    """Serve's 0.1 s default costs ~5% of a core beside the model; the server's default is 1 s."""
    info = json.loads((server.state_dir / "server.json").read_text())
    listener = next(c for c in psutil.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == info["serve_proxy_port"])
    session = psutil.Process(listener.pid).parent()  # the raylet, which starts every actor of the session
    controllers = [p for p in session.children() if "ServeController" in " ".join(p.cmdline())]
    assert controllers, "no Serve controller among the session's processes"
    assert controllers[0].environ().get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "1.0"


@pytest.mark.parametrize("front, listener", [("haproxy", "haproxy"), ("proxy", "Proxy")])
def test_the_sdk_trains_and_samples_through_each_front(tmp_path, front, listener):
    handle = start_twinkle_server(tmp_path, extra_config={"http_front": front}, keys={"alice": KEYS["alice"]})
    try:
        assert listener in _listener(_port(handle))
        losses = _train_and_sample(handle.url, KEYS["alice"])
        assert losses[-1] < 0.75 * losses[0], losses  # falls to ~0.46 of the start with these seeds
    finally:
        assert handle.stop() == 0, handle.log_tail()


def test_replies_say_where_their_time_went(server, service):
    """Server-Timing: `app` is the time inside the server, `scheduler` the part spent awaiting the model's
    scheduler (a long poll's wait for the result included); the reply with a result adds where that
    request's time went in the scheduler, with absolute marks a client on this host can line up."""
    import time

    import requests

    from twinkle.http.timing import parse_server_timing

    training = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=0).result()
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    health = parse_server_timing(requests.get(server.url + "/api/v1/healthz").headers["server-timing"])
    assert health["scheduler"] == 0 and 0 <= health["app"] < 1000
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7, 8]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [6, 7, 8, 9], "dtype": "int64", "shape": [4]}}}
    sent = time.time()
    submitted = requests.post(server.url + "/api/v1/forward", headers=headers,
                              json={"model_id": training.model_id,
                                    "forward_input": {"data": [datum], "loss_fn": "cross_entropy"}})
    assert submitted.status_code == 200, submitted.text
    submit = parse_server_timing(submitted.headers["server-timing"])
    result = requests.post(server.url + "/api/v1/retrieve_future", headers=headers,
                           json={"request_id": submitted.json()["request_id"]})
    received = time.time()
    assert "loss_fn_outputs" in result.json(), result.text
    retrieve = parse_server_timing(result.headers["server-timing"])
    for timing in (submit, retrieve):
        assert 0 < timing["scheduler"] <= timing["app"], timing
    assert not {"queue", "run", "started", "ready"} & set(submit), submit  # no result in that reply
    assert all(retrieve[stage] >= 0 for stage in ("queue", "run", "finish", "wake")), retrieve
    assert 0 < retrieve["compute"] < retrieve["run"], retrieve  # the worker's own forward, inside the Ray call
    assert sent <= retrieve["started"] <= retrieve["ready"] <= received, (sent, retrieve, received)
    # the stages tile the time from the request being queued to the route holding its result
    assert retrieve["queue"] + retrieve["run"] + retrieve["finish"] <= (received - sent) * 1000, retrieve


def test_server_timing_parses_durations_and_marks():
    from twinkle.actors.spans import RequestSpan
    from twinkle.http.timing import RequestTiming, parse_server_timing

    span = RequestSpan(accepted_at=100.0, started_at=100.002, run_s=0.005, compute_s=0.003, ready_at=100.0081)
    figures = span.figures()
    assert figures["queue"] == pytest.approx(2.0) and figures["run"] == pytest.approx(5.0)
    assert figures["compute"] == pytest.approx(3.0)
    assert figures["finish"] == pytest.approx(1.1) and figures["ready_at"] == 100.0081
    assert RequestSpan(accepted_at=1.0).figures() == {}  # still queued: nothing to say yet
    timing = RequestTiming(scheduler_s=0.004, stages_ms={"run": 5.0}, marks={"ready": 1733150000.123456})
    parsed = parse_server_timing(timing.header(app_ms=7.5).decode() + ', cdn;desc="edge", db;dur=oops')
    assert parsed == {"app": 7.5, "scheduler": 4.0, "run": 5.0, "ready": 1733150000.123456}
