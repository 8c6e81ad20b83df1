"""Malformed requests: each gets a 400/404/422 with a JSON body that names the field, and changes nothing.

A module-wide pair of alice models created with the same seed is kept in lockstep: `victim` receives
every rejected request, `reference` never does, and after each case both take the same valid training
step. Their losses must stay identical (a rejected request left no trace: no gradients, no optimizer
step), and the victim's step must not wait for the rejected seq_id: the server must free the seq_id of
a request it rejected instead of waiting `seq_gap_s` for it (the SDK advances its turn counter even
for failed requests). The evidence is the scheduler's "seq_id N never arrived" warning in the server
log, which it prints when it gives up waiting. Meanwhile bob trains in a background thread and must
never notice, and /healthz stays 200. The lockstep check runs in the `lockstep` fixture's teardown,
so its failures show as ERROR of the case.
"""

from __future__ import annotations

import json
import threading
import time
import warnings

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
VOCAB = 2048
SEQ_GAP_S = 3.0  # conftest's timeouts.seq_gap_s: a step that waited for a missing seq_id takes longer
ADAM = types.AdamParams(learning_rate=1e-2)


# ------------------------------------------------------------------ helpers
def datum(tokens, targets=None, **inputs) -> types.Datum:
    tokens = [int(t) for t in tokens]
    loss_inputs = {"target_tokens": list(targets) if targets is not None else tokens[1:] + [tokens[0]]}
    for key, value in inputs.items():
        loss_inputs[key] = np.asarray(value, dtype=np.float32)
    if "weights" not in inputs and "advantages" not in inputs:
        loss_inputs["weights"] = np.ones(len(tokens), dtype=np.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=loss_inputs)


TOKENS = [11, 523, 77, 1020, 5, 1999, 64]
N = len(TOKENS)
GOOD = [datum(TOKENS), datum([300, 301, 302, 303])]


def api(server, path: str) -> str:
    return f"{server.url}/api/v1/{path}"


def headers(server, tenant="alice", **extra) -> dict:
    return {"X-API-Key": server.keys[tenant], **extra}


def check_error_body(status: int, body, expected_status, names: str | None) -> dict:
    expected = (expected_status,) if isinstance(expected_status, int) else tuple(expected_status)
    assert status in expected, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    if names is not None:
        text = f"{body.get('field')} {body['error']}"
        assert names in text, f"the error should name {names!r}: {body}"
    return body


def check_response(response: requests.Response, expected_status, names: str | None) -> dict:
    assert "application/json" in response.headers.get("content-type", ""), (response.status_code, response.text)
    return check_error_body(response.status_code, response.json(), expected_status, names)


def check_sdk_error(excinfo, expected_status, names: str | None) -> dict:
    exc = excinfo.value
    assert isinstance(exc, tinker.APIStatusError), repr(exc)
    return check_error_body(exc.status_code, exc.body, expected_status, names)


def fb_proto(model_id: str, seq_id: int, data, loss_fn: str = "cross_entropy", forward_only=False) -> bytes:
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn))
    message = request_conv.forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    return message.SerializeToString()


def poll(server, request_id: str, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        r = requests.post(api(server, "retrieve_future"), json={"request_id": request_id},
                          headers=headers(server, Accept="application/json"), timeout=50)
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("type") != "try_again":
            return body
        assert time.time() < deadline, f"future {request_id} still pending after {timeout}s"


def loss_of(output) -> float:
    return float(output.metrics["loss:sum"])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def alice(server):
    service = tinker.ServiceClient(base_url=server.url, api_key=server.keys["alice"])
    yield service
    end_sdk_session(service)


class Lockstep:
    """victim (gets the bad requests) and reference (never does), created with the same seed."""

    def __init__(self, server, service):
        self.server = server
        self.service = service
        self.reset()
        self.initial_loss = loss_of(self.reference.forward(GOOD, "cross_entropy").result())

    def reset(self) -> None:
        """A fresh pair, so that one case's damage does not fail the cases after it."""
        self.victim = self.service.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()
        self.reference = self.service.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()

    def log_size(self) -> int:
        return self.server.log_path.stat().st_size

    def gap_warnings(self, since: int, model_id: str | None = None) -> list[str]:
        """The scheduler's "seq_id N never arrived" warnings for a model, logged since `since`."""
        model_id = model_id or self.victim.model_id
        with open(self.server.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if "never arrived" in line and f"{model_id}:" in line]

    def check(self, log_mark: int) -> None:
        """The victim still trains promptly and exactly like the untouched reference."""
        started = time.time()
        fb_v = self.victim.forward_backward(GOOD, "cross_entropy")
        opt_v = self.victim.optim_step(ADAM)
        # after the step: catches gradients a rejected request may have left for that optimizer step
        after_v = self.victim.forward(GOOD, "cross_entropy")
        fb_r = self.reference.forward_backward(GOOD, "cross_entropy")
        opt_r = self.reference.optim_step(ADAM)
        after_r = self.reference.forward(GOOD, "cross_entropy")
        loss_v = loss_of(fb_v.result())
        elapsed = time.time() - started
        loss_r = loss_of(fb_r.result())
        opt_v.result(), opt_r.result()
        after_v, after_r = loss_of(after_v.result()), loss_of(after_r.result())
        warnings_ = self.gap_warnings(log_mark)
        if not warnings_ and elapsed > SEQ_GAP_S - 0.5:  # slow: let Ray forward the log, then look again
            time.sleep(1.5)
            warnings_ = self.gap_warnings(log_mark)
        # (the log, not the clock, is the evidence: on a loaded machine a normal step can be slow too)
        assert not warnings_, (f"the server waited for the seq_id of a request it had rejected (the next "
                               f"forward_backward took {elapsed:.1f}s, seq_gap_s={SEQ_GAP_S}):\n"
                               + "\n".join(warnings_))
        assert loss_v == loss_r, f"rejected request changed the model: victim {loss_v} != reference {loss_r}"
        assert after_v == after_r, (f"rejected request changed the optimizer step: victim {after_v} != "
                                    f"reference {after_r}")
        assert requests.get(api(self.server, "healthz"), timeout=10).status_code == 200


@pytest.fixture(scope="module")
def pair(server, alice):
    return Lockstep(server, alice)


class BobTrainer(threading.Thread):
    """Bob trains his own model for the whole module; he must never see an error."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.losses: list[float] = []
        self.errors: list[BaseException] = []

    def run(self):
        service = tinker.ServiceClient(base_url=self.server.url, api_key=self.server.keys["bob"])
        try:
            client = service.create_lora_training_client(base_model=BASE, rank=RANK, seed=4).result()
            data = [datum([40, 41, 42, 43, 44, 45])]
            while not self.stop.is_set():
                fb = client.forward_backward(data, "cross_entropy")
                opt = client.optim_step(ADAM)
                self.losses.append(loss_of(fb.result()))
                opt.result()
                self.stop.wait(0.2)
        except BaseException as exc:  # reported by test_bob_kept_training
            self.errors.append(exc)
        finally:
            end_sdk_session(service)


@pytest.fixture(scope="module")
def bob_trainer(server):
    trainer = BobTrainer(server)
    trainer.start()
    yield trainer
    trainer.stop.set()
    trainer.join(timeout=60)


@pytest.fixture
def lockstep(pair, bob_trainer):
    """Run a case, then check that the victim still trains promptly and exactly like the reference."""
    mark = pair.log_size()
    yield pair
    try:
        pair.check(mark)
    except BaseException:
        pair.reset()
        raise


# --------------------------------------------------- SDK training requests
def _fb(data, loss_fn="cross_entropy", config=None):
    return lambda client: client.forward_backward(data, loss_fn, config).result()


def _image_datum():
    chunk = types.ImageChunk(data=b"\x89PNG\r\n\x1a\nnot-really-an-image", format="png", expected_tokens=4)
    return types.Datum(model_input=types.ModelInput(chunks=[chunk]),
                       loss_fn_inputs={"target_tokens": [1, 2, 3, 4], "weights": [1.0] * 4})


def _rl(tokens=TOKENS, **overrides):
    inputs = {"logprobs": np.full(len(tokens), -1.0), "advantages": np.ones(len(tokens))}
    inputs.update(overrides)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return datum(tokens, **inputs)


SDK_CASES = {
    # token ids outside the vocabulary
    "input-token-too-big": (_fb([datum(TOKENS[:-1] + [VOCAB + 10])]), 400, "model_input"),
    "input-token-negative": (_fb([datum([-1] + TOKENS[1:])]), 400, "model_input"),
    "target-token-too-big": (_fb([datum(TOKENS, targets=TOKENS[1:] + [VOCAB])]), 400, "target_tokens"),
    "forward-only-bad-token": (lambda c: c.forward([datum(TOKENS[:-1] + [VOCAB])], "cross_entropy").result(),
                               400, "model_input"),
    "bad-datum-among-good": (_fb([GOOD[0], datum(TOKENS, targets=TOKENS[1:] + [VOCAB]), GOOD[1]]), 400,
                             "data[1]"),
    # shapes
    "targets-longer-than-input": (_fb([datum(TOKENS, targets=TOKENS + [5])]), 400, "target_tokens"),
    "weights-shorter-than-input": (_fb([datum(TOKENS, weights=np.ones(N - 1))]), 400, "weights"),
    "weights-2d": (_fb([datum(TOKENS, weights=np.ones((N, 2)))]), 400, "weights"),
    "advantages-wrong-length": (_fb([_rl(advantages=np.ones(N + 2))], "importance_sampling"), 400, "advantages"),
    "missing-advantages": (_fb([_rl(advantages=None)], "importance_sampling"), 400, "advantages"),
    # losses and their config
    "loss-stable_reinforce": (_fb([_rl()], "stable_reinforce"), 400, "loss_fn"),
    "loss-bogus": (_fb(GOOD, "bogus"), 400, "loss_fn"),
    "loss-empty": (_fb(GOOD, ""), 400, "loss_fn"),
    "config-unknown-key-ce": (_fb(GOOD, "cross_entropy", {"beta": 0.1}), 400, "loss_fn_config"),
    "config-unknown-key-ppo": (_fb([_rl()], "ppo", {"clip_ratio": 0.2}), 400, "loss_fn_config"),
    "config-text-for-number": (_fb([_rl()], "ppo", {"clip_low_threshold": "low"}), 400, "clip_low_threshold"),
    "config-nan": (_fb([_rl()], "dro", {"beta": float("nan")}), 400, "beta"),
    # non-finite numbers
    "nan-weights": (_fb([datum(TOKENS, weights=[1.0] * (N - 1) + [float("nan")])]), 400, "weights"),
    "inf-weights": (_fb([datum(TOKENS, weights=[float("inf")] + [1.0] * (N - 1))]), 400, "weights"),
    "nan-advantages": (_fb([_rl(advantages=[float("nan")] * N)], "importance_sampling"), 400, "advantages"),
    "inf-advantages": (_fb([_rl(advantages=[1.0] * (N - 1) + [float("-inf")])], "ppo"), 400, "advantages"),
    "nan-logprobs": (_fb([_rl(logprobs=[float("nan")] * N)], "importance_sampling"), 400, "logprobs"),
    # inputs a text model cannot take
    "image-chunk": (_fb([_image_datum()]), 400, "model_input"),  # 400 naming the chunk: a text-only model
    # checkpoint names
    "save-state-dotdot": (lambda c: c.save_state("../x").result(), 400, "path"),
    "save-state-slash": (lambda c: c.save_state("a/b").result(), 400, "path"),
    "save-sampler-dotdot": (lambda c: c.save_weights_for_sampler("../x").result(), 400, "path"),
    # optimizer parameters
    "adam-negative-lr": (lambda c: c.optim_step(types.AdamParams(learning_rate=-1.0)).result(), 400,
                         "learning_rate"),
    "adam-nan-lr": (lambda c: c.optim_step(types.AdamParams(learning_rate=float("nan"))).result(), 400,
                    "learning_rate"),
    "adam-beta1-above-1": (lambda c: c.optim_step(types.AdamParams(learning_rate=1e-3, beta1=2.0)).result(), 400,
                           "beta1"),
    "dimuon-step": (lambda c: c.optim_step(types.DimuonParams(learning_rate=1e-3)).result(), 422,
                    "optimizer_params"),
}


@pytest.mark.parametrize("case", list(SDK_CASES), ids=list(SDK_CASES))
def test_sdk_training_request_rejected(alice, lockstep, case):
    call, status, names = SDK_CASES[case]
    with pytest.raises(tinker.APIStatusError) as excinfo:
        call(lockstep.victim)
    check_sdk_error(excinfo, status, names)
    if case.startswith("save-"):  # no checkpoint record was created under any name
        assert rest_client(alice).list_checkpoints(lockstep.victim.model_id).result().checkpoints == []


def rest_client(service):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return service.create_rest_client()


def test_bad_names_left_no_files(server):
    """'../x' and 'a/b' did not escape into (or create) folders named x, a or b anywhere."""
    root = server.state_dir.parent
    strays = [p for p in root.rglob("*") if p.name in ("x", "a", "b") and "models" not in p.parts]
    assert strays == []


# ------------------------------------------------------- SDK model creation
CREATE_CASES = {
    "unknown-base-model": (dict(base_model="no-such-model", rank=RANK), 400, "base_model"),
    "rank-above-max": (dict(base_model=BASE, rank=4096), 400, "rank"),
    "rank-zero": (dict(base_model=BASE, rank=0), 400, "rank"),
    "dimuon-optimizer": (dict(base_model=BASE, rank=RANK, optimizer=types.DimuonOptimizerConfig()), 422,
                         "optimizer_config"),
}


@pytest.mark.parametrize("case", list(CREATE_CASES), ids=list(CREATE_CASES))
def test_sdk_create_model_rejected(alice, lockstep, case):
    kwargs, status, names = CREATE_CASES[case]
    with pytest.raises(tinker.APIStatusError) as excinfo:
        alice.create_lora_training_client(**kwargs).result()
    check_sdk_error(excinfo, status, names)


def test_service_client_still_creates_models(alice):
    client = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()
    assert client.forward(GOOD, "cross_entropy").result().metrics["loss:sum"] > 0


# ------------------------------------------------------------- raw requests
def _session_id(alice) -> str:
    return alice.holder.get_session_id()


RAW_JSON_CASES = {
    # invalid JSON
    "create_model-invalid-json": ("create_model", b"{not json", 400, "body"),
    "optim_step-invalid-json": ("optim_step", b'{"model_id": "x",', 400, "body"),
    "retrieve_future-invalid-json": ("retrieve_future", b"\xff\xfe", 400, "body"),
    "get_info-json-array": ("get_info", b"[1, 2]", 400, "body"),
    "forward-old-json-invalid": ("forward_backward", b"{]", 400, "body"),
}


@pytest.mark.parametrize("case", list(RAW_JSON_CASES), ids=list(RAW_JSON_CASES))
def test_raw_invalid_json(server, case):
    path, body, status, names = RAW_JSON_CASES[case]
    r = requests.post(api(server, path), data=body, headers=headers(server, **{"Content-Type": "application/json"}))
    check_response(r, status, names)


def _raw_field_cases(alice, victim_id):
    session = _session_id(alice)
    return {
        "create_model-missing-base_model": ("create_model", {"session_id": session, "model_seq_id": 9000,
                                                             "type": "create_model"}, 400, "base_model"),
        "create_model-missing-session_id": ("create_model", {"base_model": BASE, "model_seq_id": 9001}, 400,
                                            "session_id"),
        "create_model-rank-not-a-number": ("create_model", {"session_id": session, "model_seq_id": 9002,
                                                            "base_model": BASE, "lora_config": {"rank": "abc"}},
                                           400, "rank"),
        "create_model-unknown-session": ("create_model", {"session_id": "no-such-session", "model_seq_id": 1,
                                                          "base_model": BASE}, 404, "session_id"),
        "get_info-missing-model_id": ("get_info", {"type": "get_info"}, 400, "model_id"),
        "get_info-unknown-model": ("get_info", {"model_id": "nope:train:0", "type": "get_info"}, 404, "model_id"),
        "optim_step-missing-model_id": ("optim_step", {"seq_id": 1, "adam_params": {"learning_rate": 0.1}}, 400,
                                        "model_id"),
        "optim_step-unknown-model": ("optim_step", {"model_id": "nope:train:0", "seq_id": 1,
                                                    "adam_params": {"learning_rate": 0.1}}, 404, "model_id"),
        "save_weights-unknown-model": ("save_weights", {"model_id": "nope:train:0", "seq_id": 1, "path": "c"}, 404,
                                       "model_id"),
        "retrieve_future-missing-request_id": ("retrieve_future", {}, 400, "request_id"),
        "retrieve_future-unknown-request": ("retrieve_future", {"request_id": "no-such-request"}, 404,
                                            "request_id"),
        "asample-unknown-session": ("asample", {"sampling_session_id": "nope:sample:0", "seq_id": 0,
                                                "num_samples": 1, "sampling_params": {"max_tokens": 2},
                                                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5]}]}},
                                    404, "sampling_session_id"),
        "create_sampling_session-bad-path": ("create_sampling_session", {"session_id": session,
                                                                         "sampling_session_seq_id": 9000,
                                                                         "model_path": "http://elsewhere/x"},
                                             400, "model_path"),
        "load_weights-unknown-checkpoint": ("load_weights", {"session_id": session, "model_seq_id": 9003,
                                                             "path": f"tinker://{victim_id}/weights/nope",
                                                             "optimizer": False}, 404, "path"),
    }


RAW_FIELD_CASE_NAMES = ["create_model-missing-base_model", "create_model-missing-session_id",
                        "create_model-rank-not-a-number", "create_model-unknown-session", "get_info-missing-model_id",
                        "get_info-unknown-model", "optim_step-missing-model_id", "optim_step-unknown-model",
                        "save_weights-unknown-model", "retrieve_future-missing-request_id",
                        "retrieve_future-unknown-request", "asample-unknown-session",
                        "create_sampling_session-bad-path", "load_weights-unknown-checkpoint"]


@pytest.mark.parametrize("case", RAW_FIELD_CASE_NAMES, ids=RAW_FIELD_CASE_NAMES)
def test_raw_missing_or_wrong_fields(server, alice, pair, case):
    path, body, status, names = _raw_field_cases(alice, pair.victim.model_id)[case]
    r = requests.post(api(server, path), data=json.dumps(body).encode(),
                      headers=headers(server, **{"Content-Type": "application/json"}))
    check_response(r, status, names)


def test_raw_json_cases_changed_nothing(lockstep):
    """The raw JSON cases above did not touch the victim (checked by the lockstep fixture)."""


PROTO = {"Content-Type": "application/x-protobuf"}


def test_raw_undecodable_protobuf(server, lockstep):
    for body in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"garbage!!"):
        r = requests.post(api(server, "forward_backward"), data=body, headers=headers(server, **PROTO))
        check_response(r, 400, "body")
    r = requests.post(api(server, "forward_backward"), data=fb_proto(lockstep.victim.model_id, 0, GOOD),
                      headers=headers(server, **PROTO, **{"Content-Encoding": "zstd"}))  # not zstd at all
    check_response(r, 400, "body")


def test_raw_protobuf_unknown_or_missing_model(server, lockstep):
    r = requests.post(api(server, "forward_backward"), data=fb_proto("nope:train:0", 1, GOOD),
                      headers=headers(server, **PROTO))
    check_response(r, 404, "model_id")
    r = requests.post(api(server, "forward_backward"), data=fb_proto("", 1, GOOD), headers=headers(server, **PROTO))
    check_response(r, (400, 404), "model_id")


def test_raw_oversized_batch_then_next_seq_runs_promptly(server, alice, pair):
    """1025 datums (> limits.max_datums_per_request) on a model driven by raw requests with known seq ids:
    rejected at seq 1, then seq 2 must run at once and see the untouched weights."""
    raw = alice.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()
    mark = pair.log_size()
    tiny = [datum([5, 6])] * 1025
    r = requests.post(api(server, "forward_backward"), data=fb_proto(raw.model_id, 1, tiny),
                      headers=headers(server, **PROTO))
    check_response(r, 400, "data")
    # a batch at the limit is fine (and is the SDK's own chunk size), seq 2; forward_only
    started = time.time()
    r = requests.post(api(server, "forward_backward"), data=fb_proto(raw.model_id, 2, GOOD, forward_only=True),
                      headers=headers(server, **PROTO))
    assert r.status_code == 200, r.text
    result = poll(server, r.json()["request_id"])
    elapsed = time.time() - started
    if elapsed > SEQ_GAP_S - 0.5:
        time.sleep(1.5)  # let Ray forward the scheduler's log
    gaps = pair.gap_warnings(mark, raw.model_id)
    assert not gaps, f"seq 2 waited ({elapsed:.1f}s) for the rejected seq 1: {gaps}"
    assert result["metrics"]["loss:sum"] == pair.initial_loss


# ---------------------------------------------------------------- the end
def test_bob_kept_training(server, bob_trainer):
    deadline = time.time() + 30
    while len(bob_trainer.losses) < 3 and time.time() < deadline and not bob_trainer.errors:
        time.sleep(0.2)
    assert not bob_trainer.errors, bob_trainer.errors
    assert len(bob_trainer.losses) >= 3, bob_trainer.losses
    assert bob_trainer.losses[-1] < bob_trainer.losses[0]
    assert requests.get(api(server, "healthz"), timeout=10).json() == {"status": "ok"}


def test_unknown_routes_and_methods_say_what_is_wrong(server):
    missing = requests.post(api(server, "no_such_route"), json={}, headers=headers(server))
    assert "/api/v1/no_such_route" in check_response(missing, 404, "path")["error"]
    wrong_method = requests.get(api(server, "forward_backward"), headers=headers(server))
    assert "GET" in check_response(wrong_method, 405, "path")["error"]
