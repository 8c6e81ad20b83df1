"""Many tenants on one base model through the real server: shared passes, a sampling lane beside
training, per-tenant order and exactly-once under the lanes, and per-tenant quotas (429)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
from tinker import types

from tests.server.raw import Raw
from twinkle import layout

BASE = "twinkle-tiny"
CLIENTS = 16  # two tenants, eight models each
STEPS = 2
SEQ_LEN = 48  # every tenant's sequences have one length: no padding, so shared passes add no round-off


def _status(server) -> dict:
    reply = requests.get(f"{server.url}/api/v1/twinkle/status", headers={"X-API-Key": server.keys["alice"]},
                         timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["models"][BASE]


def _batches(i: int) -> list[list[types.Datum]]:
    rng = np.random.default_rng(1000 + i)
    batches = []
    for _ in range(STEPS):
        batch = []
        for _ in range(2):
            tokens = [int(t) for t in rng.integers(10, 2000, size=SEQ_LEN + 1)]
            batch.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                     loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * SEQ_LEN}))
        batches.append(batch)
    return batches


def _run_client(tinker_client, i: int, tag: str, start: threading.Barrier | None = None) -> dict:
    """Tenant i's run: pipelined forward_backward + optim_step for STEPS steps, then its weights."""
    tenant = "alice" if i % 2 == 0 else "bob"
    client = tinker_client(tenant).create_lora_training_client(base_model=BASE, rank=4 * (1 + i % 3),
                                                               seed=100 + i).result()
    batches = _batches(i)
    if start is not None:
        start.wait(timeout=120)
    pending = []
    for batch in batches:  # submitted without waiting, as the SDK's users do
        pending.append((client.forward_backward(batch, "cross_entropy"),
                        client.optim_step(types.AdamParams(learning_rate=1e-2))))
    losses = [fb.result().metrics["loss:sum"] for fb, _ in pending]
    for _, step in pending:
        step.result()
    name = f"{tag}-{i}"
    client.save_weights_for_sampler(name).result()
    return {"tenant": tenant, "model_id": client.model_id, "name": name, "losses": losses}


def _weights(server, run: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    folder = layout.checkpoint_folder(server.state_dir, run["tenant"], layout.run_dir_name(run["model_id"]),
                                      "sampler_weights", run["name"])
    return load_file(str(folder / "adapter_model.safetensors"))


def test_sixteen_clients_share_passes_and_each_gets_its_solo_weights(server, tinker_client):
    solo = [_run_client(tinker_client, i, "solo") for i in range(CLIENTS)]  # one tenant at a time

    before = _status(server)
    start = threading.Barrier(CLIENTS)
    together: list[dict | BaseException] = [None] * CLIENTS  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            together[i] = _run_client(tinker_client, i, "together", start)
        except BaseException as exc:  # noqa: BLE001 - reported below
            together[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    after = _status(server)

    for i in range(CLIENTS):
        assert not isinstance(together[i], BaseException), together[i]
        np.testing.assert_allclose(together[i]["losses"], solo[i]["losses"], rtol=1e-6)
        got, want = _weights(server, together[i]), _weights(server, solo[i])
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-8, err_msg=key)
    # the requests really shared passes: fewer passes than requests, several models in one
    passes = after["train_passes"] - before["train_passes"]
    requests_run = after["train_pass_requests"] - before["train_pass_requests"]
    assert requests_run >= CLIENTS * STEPS
    assert after["shared_train_passes"] > before["shared_train_passes"]
    assert passes < requests_run, (passes, requests_run)
    assert after["max_models_per_pass"] >= 2


def test_sampling_runs_beside_a_long_training_pass(server, tinker_client):
    service = tinker_client("alice")
    trainer = service.create_lora_training_client(base_model=BASE, rank=4, seed=7).result()
    sampler = service.create_sampling_client(base_model=BASE).result()
    tokens = [int(t) for t in np.random.default_rng(3).integers(10, 2000, size=1025)]
    long_batch = [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                              loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 1024})] * 12
    sampler.sample(types.ModelInput.from_ints(tokens[:8]), 1, types.SamplingParams(max_tokens=2)).result()  # warm

    finished: dict[str, float] = {}
    training = trainer.forward_backward(long_batch, "cross_entropy")  # seconds of compute
    time.sleep(0.5)  # the pass is running
    sampled = sampler.sample(types.ModelInput.from_ints(tokens[:16]), 2,
                             types.SamplingParams(max_tokens=4, temperature=1.0, seed=3))

    def wait(name, future):
        future.result()
        finished[name] = time.monotonic()

    waiters = [threading.Thread(target=wait, args=(name, fut)) for name, fut in (("train", training),
                                                                                  ("sample", sampled))]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(timeout=600)
    assert set(finished) == {"train", "sample"}
    assert finished["sample"] < finished["train"], finished


def test_out_of_order_and_retried_requests_of_two_tenants_run_in_order_once(server):
    a, b = Raw(server, server.keys["alice"]), Raw(server, server.keys["bob"])
    model_a, model_b = a.create_model(seed=31), b.create_model(seed=32)
    # alice sends her step before the forward_backward it follows; bob retries both after "lost" replies
    step_a = a.optim_step(model_a, 2)
    fb_b = b.forward_backward(model_b, 1)
    fb_a = a.forward_backward(model_a, 1)
    assert b.forward_backward(model_b, 1) == fb_b
    step_b = b.optim_step(model_b, 2)
    assert b.optim_step(model_b, 2) == step_b
    losses = {"a": a.loss(fb_a), "b": b.loss(fb_b)}
    a.result(step_a)
    b.result(step_b)
    after = {"a": a.loss(a.forward_backward(model_a, 3, forward_only=True)),
             "b": b.loss(b.forward_backward(model_b, 3, forward_only=True))}

    for name, raw, seed in (("a", a, 31), ("b", b, 32)):  # the same, in order and once, alone
        model = raw.create_model(seed=seed)
        assert raw.loss(raw.forward_backward(model, 1)) == losses[name]
        raw.result(raw.optim_step(model, 2))
        assert raw.loss(raw.forward_backward(model, 3, forward_only=True)) == after[name]


def test_quotas_answer_429_naming_the_limit(server):
    from tests.server.conftest import QUOTA_TENANT

    raw = Raw(server, server.keys["quota"])
    model = raw.create_model(seed=1)

    raw.result(raw.post("save_weights", {"model_id": model, "path": "first"})["request_id"])  # within the quota
    reply = raw.http.post(f"{raw.url}/save_weights", json={"model_id": model, "path": "second"}, timeout=60)
    assert reply.status_code == 429 and "limit of 1 checkpoints" in reply.json()["error"], reply.text

    route, body = raw.forward_body(model, 1, copies=QUOTA_TENANT["max_tokens_per_request"] // 31 + 1)
    reply = raw.http.post(f"{raw.url}/{route}", json=body, timeout=60)
    assert reply.status_code == 429 and "limit of 256 per request" in reply.json()["error"], reply.text

    raw.create_model(seed=3)  # the second model is within the quota, the third is not
    reply = raw.http.post(f"{raw.url}/create_model", json={"session_id": raw.session_id, "model_seq_id": 9,
                                                            "base_model": BASE, "lora_config": {"rank": 4}},
                          timeout=60)
    assert reply.status_code == 429 and "limit of 2 per tenant" in reply.json()["error"], reply.text

    # seq_ids 10, 11, 12 wait for the missing 2..9: the tenant's queue is full at the limit (3)
    for seq in (10, 11, 12):
        raw.forward_backward(model, seq, forward_only=True)
    route, body = raw.forward_body(model, 13, forward_only=True)
    reply = raw.http.post(f"{raw.url}/{route}", json=body, timeout=60)
    assert reply.status_code == 429 and "3 requests queued" in reply.json()["error"], reply.text
    other = Raw(server, server.keys["bob"])  # another tenant is not affected
    other.loss(other.forward_backward(other.create_model(seed=2), 1, forward_only=True))


@pytest.fixture(autouse=True)
def _quiet_pass(server):
    """Each test starts with the model's lanes drained (earlier tests' requests have finished)."""
    deadline = time.time() + 120
    while _status(server)["queued"] and time.time() < deadline:
        time.sleep(0.2)


def test_a_tenant_over_its_request_rate_gets_429_and_others_do_not(server):
    slow = {"X-API-Key": server.keys["slow"]}
    codes = [requests.get(f"{server.url}/api/v1/training_runs", headers=slow, timeout=30) for _ in range(12)]
    refused = [r for r in codes if r.status_code == 429]
    assert refused and codes[0].status_code == 200  # a burst of 4 passes, then 2 per second
    assert "2 requests per second" in refused[0].json()["error"] and int(refused[0].headers["Retry-After"]) >= 1
    fine = [requests.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": server.keys["bob"]},
                         timeout=30).status_code for _ in range(12)]
    assert fine == [200] * 12


def test_a_reused_seq_id_for_another_request_is_a_conflict_and_too_long_a_datum_is_refused(server):
    raw = Raw(server, server.keys["alice"])
    model = raw.create_model(seed=7)
    first = raw.forward_backward(model, 1)
    assert raw.forward_backward(model, 1) == first  # a retry: the same request
    reply = raw.http.post(f"{raw.url}/optim_step", json={"model_id": model, "seq_id": 1}, timeout=60)
    assert reply.status_code == 409 and "seq_id 1" in reply.json()["error"], reply.text
    route, body = raw.forward_body(model, 1, tokens=list(range(40, 60)))  # the same method, other data
    reply = raw.http.post(f"{raw.url}/{route}", json=body, timeout=60)
    assert reply.status_code == 409 and "different" in reply.json()["error"], reply.text
    raw.loss(first)

    route, body = raw.forward_body(model, 2, forward_only=True, tokens=[20 + i % 1000 for i in range(2051)])
    reply = raw.http.post(f"{raw.url}/{route}", json=body, timeout=60)
    assert reply.status_code == 413 and "context is 2048 tokens" in reply.json()["error"], reply.text
    raw.loss(raw.forward_backward(model, 3, forward_only=True))  # and the model goes on
