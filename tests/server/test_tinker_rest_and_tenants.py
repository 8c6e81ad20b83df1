"""The Tinker REST surface (RestClient) and tenant isolation, through the unmodified Tinker SDK.

Raw `requests` calls are used only where the SDK cannot express the request (another tenant's ids,
wrong keys). Note: the SDK itself refuses an api_key without the `tml-` (or `eyJ`) prefix before
sending anything (`ApiKeyAuthProvider.__init__` raises TinkerError) - that is SDK behaviour, so
it is not tested here.
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import pytest
import requests

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv  # noqa: E402

from tests.server.sdk_sessions import end_sdk_session  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # per test, including a first-use server start

BASE = "twinkle-tiny"
RANK = 8


# ------------------------------------------------------------------ helpers
def sft_datum(tokens: list[int]) -> types.Datum:
    tokens = [int(t) for t in tokens]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def batch(seed: int, n: int = 3) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    return [sft_datum(rng.integers(10, 2000, size=int(rng.integers(6, 16))).tolist()) for _ in range(n)]


def train(client, data, steps: int, lr: float = 1e-2) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(float(fb.result().metrics["loss:sum"]))
        opt.result()
    return losses


def rest_of(service):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return service.create_rest_client()


def api(server, path: str) -> str:
    return f"{server.url}/api/v1/{path}"


def assert_json_error(response: requests.Response, status: int, mentions: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and body.get("error"), body
    if mentions is not None:
        assert mentions in (str(body.get("field")) + " " + body["error"]), body
    return body


def fb_proto(model_id: str, seq_id: int, data: list[types.Datum], loss_fn: str = "cross_entropy") -> bytes:
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn))
    return request_conv.forward_backward_request_to_proto(request).SerializeToString()


def checkpoint_paths(response) -> set[str]:
    return {c.tinker_path for c in response.checkpoints}


def service_for(server, tenant: str):
    return tinker.ServiceClient(base_url=server.url, api_key=server.keys[tenant])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def alice(server):
    service = service_for(server, "alice")
    yield service
    end_sdk_session(service)


@pytest.fixture(scope="module")
def bob(server):
    service = service_for(server, "bob")
    yield service
    end_sdk_session(service)


@pytest.fixture(scope="module")
def alice_run(alice):
    """An alice training run with two training checkpoints and one sampler checkpoint."""
    client = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=1,
                                               user_metadata={"purpose": "rest-test"}).result()
    train(client, batch(0), steps=1)
    paths = {name: client.save_state(name).result().path for name in ("c1", "c2", "c3", "c4")}
    paths["s1"] = client.save_weights_for_sampler("s1").result().path
    return {"client": client, "model_id": client.model_id, "paths": paths}


# ------------------------------------------------------------------ REST
def test_training_runs(alice, alice_run):
    rest = rest_of(alice)
    model_id = alice_run["model_id"]
    runs = rest.list_training_runs(limit=1000).result()
    assert model_id in {r.training_run_id for r in runs.training_runs}
    assert runs.cursor.total_count >= 1

    run = rest.get_training_run(model_id).result()
    assert run.training_run_id == model_id
    assert run.base_model == BASE
    assert run.model_owner == "alice"
    assert run.is_lora is True and run.lora_rank == RANK
    assert run.user_metadata == {"purpose": "rest-test"}
    assert run.last_checkpoint is not None and run.last_checkpoint.checkpoint_type == "training"
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == alice_run["paths"]["s1"]
    by_path = rest.get_training_run_by_tinker_path(alice_run["paths"]["c1"]).result()
    assert by_path.training_run_id == model_id


def test_checkpoint_listings_and_weights_info(alice, alice_run):
    rest = rest_of(alice)
    paths = alice_run["paths"]
    listed = rest.list_checkpoints(alice_run["model_id"]).result()
    by_id = {c.checkpoint_id: c for c in listed.checkpoints}
    assert {"weights/c1", "weights/c2", "weights/c3", "sampler_weights/s1"} <= set(by_id)
    assert by_id["weights/c1"].checkpoint_type == "training"
    assert by_id["sampler_weights/s1"].checkpoint_type == "sampler"
    assert by_id["weights/c1"].tinker_path == paths["c1"]
    assert by_id["weights/c1"].public is False
    assert (by_id["weights/c1"].size_bytes or 0) > 0
    assert set(paths.values()) <= checkpoint_paths(rest.list_user_checkpoints(limit=1000).result())

    for name in ("c1", "s1"):
        info = rest.get_weights_info_by_tinker_path(paths[name]).result()
        assert info.base_model == BASE
        assert info.is_lora is True and info.lora_rank == RANK


def test_delete_checkpoint(alice, alice_run):
    rest = rest_of(alice)
    path = alice_run["paths"]["c3"]
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert path not in checkpoint_paths(rest.list_checkpoints(alice_run["model_id"]).result())
    assert path not in checkpoint_paths(rest.list_user_checkpoints(limit=1000).result())
    with pytest.raises(tinker.NotFoundError):
        alice.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(path).result()
    # the other checkpoints are untouched and still load
    assert alice_run["paths"]["c1"] in checkpoint_paths(rest.list_checkpoints(alice_run["model_id"]).result())


def test_publish_unpublish(alice, bob, alice_run):
    rest, bob_rest = rest_of(alice), rest_of(bob)
    path = alice_run["paths"]["c1"]

    def public() -> bool:
        listed = rest.list_checkpoints(alice_run["model_id"]).result()
        return next(c for c in listed.checkpoints if c.tinker_path == path).public

    with pytest.raises(tinker.NotFoundError):  # private: bob cannot see it
        bob_rest.get_weights_info_by_tinker_path(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    assert public() is True
    assert bob_rest.get_weights_info_by_tinker_path(path).result().base_model == BASE  # published: readable
    with pytest.raises(tinker.NotFoundError):  # ...but still not bob's to unpublish or delete
        bob_rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(path).result()
    assert public() is True
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    assert public() is False
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(path).result()


def test_checkpoint_ttl(alice, alice_run):
    rest = rest_of(alice)
    path = alice_run["paths"]["c2"]

    def expires_at():
        listed = rest.list_checkpoints(alice_run["model_id"]).result()
        return next(c for c in listed.checkpoints if c.tinker_path == path).expires_at

    assert expires_at() is None
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    when = expires_at()
    assert when is not None
    delta = when.replace(tzinfo=when.tzinfo or timezone.utc).timestamp() - datetime.now(timezone.utc).timestamp()
    assert 3300 < delta <= 3600 + 5, delta
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert expires_at() is None


def test_checkpoint_ttl_expiry(alice, alice_run):
    rest = rest_of(alice)
    path = alice_run["paths"]["c4"]
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    deadline = time.time() + 20  # the server sweeps every second in this configuration
    while path in checkpoint_paths(rest.list_checkpoints(alice_run["model_id"]).result()):
        assert time.time() < deadline, "an expired checkpoint is still listed"
        time.sleep(0.5)
    with pytest.raises(tinker.NotFoundError):
        alice.create_training_client_from_state(path).result()


def test_save_state_ttl_and_overwrite(alice):
    client = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()
    data = batch(3)
    first = client.save_state("o1").result().path
    train(client, data, steps=1)
    trained = float(client.forward(data, "cross_entropy").result().metrics["loss:sum"])
    with pytest.raises(tinker.RequestFailedError, match="overwrite"):  # the name is taken
        client.save_state("o1").result()
    assert client.save_state("o1", overwrite=True).result().path == first
    restored = alice.create_training_client_from_state(first).result()
    assert float(restored.forward(data, "cross_entropy").result().metrics["loss:sum"]) == trained

    path = client.save_state("t1", ttl_seconds=3600).result().path
    listed = rest_of(alice).list_checkpoints(client.model_id).result()
    when = next(c for c in listed.checkpoints if c.tinker_path == path).expires_at
    assert when is not None
    delta = when.timestamp() - datetime.now(timezone.utc).timestamp()
    assert 3300 < delta <= 3605, delta


def test_training_runs_pagination(alice, alice_run):
    rest = rest_of(alice)
    everything = rest.list_training_runs(limit=1000).result()
    total = everything.cursor.total_count
    assert total == len(everything.training_runs) >= 1
    pages = [rest.list_training_runs(limit=1, offset=i).result() for i in range(min(total, 3))]
    ids = [p.training_runs[0].training_run_id for p in pages]
    assert len(set(ids)) == len(ids)
    assert ids == [r.training_run_id for r in everything.training_runs[:len(ids)]]
    assert all(p.cursor.total_count == total and p.cursor.limit == 1 for p in pages)


def test_server_capabilities(alice):
    capabilities = rest_of(alice).get_server_capabilities().result()
    names = {m.model_name for m in capabilities.supported_models}
    assert BASE in names


def test_sessions(alice, bob, alice_run):
    rest = rest_of(alice)
    session_id = alice.holder.get_session_id()
    assert session_id in rest.list_sessions(limit=1000).result().sessions
    session = rest.get_session(session_id).result()
    assert alice_run["model_id"] in session.training_run_ids
    assert isinstance(session.sampler_ids, list)
    bob_rest = rest_of(bob)
    assert session_id not in bob_rest.list_sessions(limit=1000).result().sessions
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_session(session_id).result()


# ------------------------------------------------------------- isolation
def test_bob_cannot_see_alice_runs_or_checkpoints(alice, bob, alice_run):
    bob_rest = rest_of(bob)
    model_id, paths = alice_run["model_id"], alice_run["paths"]
    assert model_id not in {r.training_run_id for r in bob_rest.list_training_runs(limit=1000).result().training_runs}
    assert not set(paths.values()) & checkpoint_paths(bob_rest.list_user_checkpoints(limit=1000).result())
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.list_checkpoints(model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.set_checkpoint_ttl_from_tinker_path(paths["c2"], 1).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.publish_checkpoint_from_tinker_path(paths["c2"]).result()
    # bob's attempts changed nothing
    listed = rest_of(alice).list_checkpoints(model_id).result()
    c2 = next(c for c in listed.checkpoints if c.tinker_path == paths["c2"])
    assert c2.public is False and c2.expires_at is None


def test_bob_cannot_load_alice_checkpoints(bob, alice_run):
    paths = alice_run["paths"]
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(paths["c1"]).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state_with_optimizer(paths["c1"]).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=paths["s1"]).result()
    with pytest.raises(tinker.NotFoundError):
        rest_of(bob).get_weights_info_by_tinker_path(paths["c1"]).result()


def test_bob_cannot_use_alice_model_or_futures(server, alice, alice_run):
    bob_key = {"X-API-Key": server.keys["bob"]}
    alice_key = {"X-API-Key": server.keys["alice"]}
    model_id = alice_run["model_id"]
    data = batch(1)

    r = requests.post(api(server, "get_info"), json={"model_id": model_id, "type": "get_info"}, headers=bob_key)
    assert_json_error(r, 404, "model_id")
    r = requests.post(api(server, "forward_backward"), data=fb_proto(model_id, 10_000, data),
                      headers={**bob_key, "Content-Type": "application/x-protobuf"})
    assert_json_error(r, 404, "model_id")
    r = requests.post(api(server, "optim_step"), json={"model_id": model_id, "adam_params": {"learning_rate": 1.0},
                                                       "type": "optim_step"}, headers=bob_key)
    assert_json_error(r, 404, "model_id")
    r = requests.post(api(server, "save_weights"), json={"model_id": model_id, "path": "stolen",
                                                         "type": "save_weights"}, headers=bob_key)
    assert_json_error(r, 404, "model_id")

    # a future of alice's: submitted raw on a fresh model of hers (seq 1 is its first request)
    own = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=2).result()
    r = requests.post(api(server, "forward_backward"), data=fb_proto(own.model_id, 1, data),
                      headers={**alice_key, "Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    r = requests.post(api(server, "retrieve_future"), json={"request_id": request_id}, headers=bob_key)
    assert_json_error(r, 404, "request_id")
    deadline = time.time() + 60
    while True:  # alice can poll it
        r = requests.post(api(server, "retrieve_future"), json={"request_id": request_id}, headers=alice_key)
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("type") != "try_again":
            break
        assert time.time() < deadline
    assert "loss:sum" in body["metrics"], body
    r = requests.post(api(server, "retrieve_future"), json={"request_id": request_id}, headers=bob_key)
    assert_json_error(r, 404, "request_id")  # finished results are just as private

    # alice's sampler: bob can neither read nor sample from it
    # alice's sampling session: bob can neither read nor sample from it (its id is the one the SDK sends)
    sampler = alice.create_sampling_client(model_path=alice_run["paths"]["s1"]).result()
    sampling_session_id = getattr(sampler, "_sampling_session_id", None)
    if sampling_session_id is None:
        pytest.skip("this SDK keeps the sampling session id elsewhere")
    sample_body = {"sampling_session_id": sampling_session_id, "seq_id": 1000, "num_samples": 1,
                   "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
                   "sampling_params": {"max_tokens": 2}, "type": "sample"}
    r = requests.get(api(server, f"samplers/{sampling_session_id}"), headers=bob_key)
    assert_json_error(r, 404, "sampler_id")
    r = requests.post(api(server, "asample"), headers=bob_key, json=sample_body)
    assert_json_error(r, 404, "sampling_session_id")
    assert requests.get(api(server, f"samplers/{sampling_session_id}"), headers=alice_key).status_code == 200


def test_concurrent_tenants_do_not_interfere(alice, bob):
    data_a, data_b, steps = batch(10), batch(11), 5

    def run(service, seed, data, out, key):
        client = service.create_lora_training_client(base_model=BASE, rank=RANK, seed=seed).result()
        out[key] = train(client, data, steps)

    alone: dict = {}
    run(alice, 7, data_a, alone, "alice")
    run(bob, 9, data_b, alone, "bob")

    together: dict = {}
    errors: list = []

    def guarded(*args):
        try:
            run(*args)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(alice, 7, data_a, together, "alice")),
               threading.Thread(target=guarded, args=(bob, 9, data_b, together, "bob"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    # Shared passes change only float rounding: a row's matmul may take another kernel path when the
    # pass holds more rows (on an AVX2-only AMD CPU step 4 differed in the 7th digit). Interference
    # between tenants would move the losses by far more than 1e-5 of their size.
    assert together["alice"] == pytest.approx(alone["alice"], rel=1e-5), (together["alice"], alone["alice"])
    assert together["bob"] == pytest.approx(alone["bob"], rel=1e-5), (together["bob"], alone["bob"])
    assert len(set(alone["alice"])) == steps  # both really trained


# ------------------------------------------------------------------ keys
@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": "tml-wrong-key"},
    {"Authorization": "Bearer tml-wrong-key"},
    {"X-API-Key": ""},
], ids=["missing", "wrong", "wrong-bearer", "empty"])
def test_bad_key_is_401_with_json_body(server, headers):
    for method, path, body in (("post", "client/config", {"sdk_version": "0.38.0"}),
                               ("post", "create_session", {"tags": [], "type": "create_session"}),
                               ("get", "training_runs", None),
                               ("post", "retrieve_future", {"request_id": "x"})):
        r = requests.request(method, api(server, path), json=body, headers=headers, timeout=30)
        assert_json_error(r, 401)
    assert requests.get(api(server, "healthz"), timeout=10).status_code == 200


def test_sdk_with_wrong_key_raises_authentication_error(server, sdk_sessions):
    service = sdk_sessions(server.url, "tml-not-a-real-key")
    started = time.time()
    with pytest.raises(tinker.AuthenticationError):
        service.create_lora_training_client(base_model=BASE, rank=RANK).result(timeout=120)
    assert time.time() - started < 60


def test_copy_weights(server, alice, bob):
    client = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=7).result()
    train(client, batch(7), steps=2, lr=5e-2)
    source = client.save_weights_for_sampler("to-copy").result().path
    rest = rest_of(alice)
    copied = rest.copy_weights(source, "archive").result()
    assert copied != source and copied.endswith("/sampler_weights/to-copy")
    run_id = copied[len("tinker://"):].split("/")[0]
    assert checkpoint_paths(rest.list_checkpoints(run_id).result()) == {copied}

    prompt = types.ModelInput.from_ints([5, 6, 7, 8, 9])
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)

    def sample(path: str) -> list[int]:
        sampler = alice.create_sampling_client(model_path=path).result()
        return list(sampler.sample(prompt, 1, greedy).result().sequences[0].tokens)

    expected = sample(source)
    assert sample(copied) == expected
    rest.delete_checkpoint_from_tinker_path(source).result()
    assert sample(copied) == expected  # the copy does not depend on the source's record or folder

    key = server.keys["alice"]
    refused = requests.post(api(server, "forward_backward"), data=fb_proto(run_id, 1, batch(1)),
                            headers={"X-API-Key": key, "Content-Type": "application/x-protobuf"})
    assert_json_error(refused, 404)  # a copy holds weights; it is not a model to train
    body = {"source_path": copied, "destination_project_id": "p"}
    assert_json_error(requests.post(api(server, "copy_weights"), json={**body, "ttl_seconds": 5},
                                    headers={"X-API-Key": key}), 400, "ttl_seconds")
    assert_json_error(requests.post(api(server, "copy_weights"), json=body,
                                    headers={"X-API-Key": server.keys["bob"]}), 404, "source_path")
    retried = [requests.post(api(server, "copy_weights"), json=body,
                             headers={"X-API-Key": key, "X-Idempotency-Key": "copy-once"}).json()["tinker_path"]
               for _ in range(2)]
    assert retried[0] == retried[1] != copied  # a retried copy is one copy
