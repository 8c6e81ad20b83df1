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
    scheduler (a long poll's wait for the result included)."""
    import requests

    from twinkle.http.timing import parse_server_timing

    training = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=0).result()
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    health = parse_server_timing(requests.get(server.url + "/api/v1/healthz").headers["server-timing"])
    assert health["scheduler"] == 0 and 0 <= health["app"] < 1000
    submitted = requests.post(server.url + "/api/v1/optim_step", headers=headers,
                              json={"model_id": training.model_id, "adam_params": {"learning_rate": 1e-4}})
    submit = parse_server_timing(submitted.headers["server-timing"])
    result = requests.post(server.url + "/api/v1/retrieve_future", headers=headers,
                           json={"request_id": submitted.json()["request_id"]})
    assert "metrics" in result.json(), result.text
    retrieve = parse_server_timing(result.headers["server-timing"])
    for timing in (submit, retrieve):
        assert 0 < timing["scheduler"] <= timing["app"], timing
