"""Property-based fuzzing of request bodies: whatever a tenant sends, the server answers without a
5xx and another tenant's state does not change.

Hypothesis draws bodies for the Tinker JSON routes and the native msgpack routes: well-formed
requests, near misses (wrong types, huge or negative numbers, unknown keys, deep nesting) and plain
garbage. Derandomized, so every run tries the same inputs.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.server.raw import Raw
from twinkle import wire

EXAMPLES = 120
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=20)
TOKEN = st.one_of(st.integers(min_value=0, max_value=2100), st.integers(), st.floats(), st.text(max_size=3))


def _tensor(values):
    return st.one_of(st.fixed_dictionaries({"data": values, "dtype": st.sampled_from(["int64", "float32", "bogus"])},
                                           optional={"shape": st.lists(st.integers(-2, 10**13), max_size=3)}),
                     values, JSON)


def _datum():
    tokens = st.lists(TOKEN, max_size=40)
    return st.fixed_dictionaries(
        {"model_input": st.one_of(st.fixed_dictionaries({"chunks": st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["encoded_text", "image", "x"]), "tokens": tokens}), max_size=2)}), JSON),
         "loss_fn_inputs": st.one_of(st.fixed_dictionaries({"target_tokens": _tensor(tokens)},
                                                           optional={"weights": _tensor(st.lists(st.floats(),
                                                                                                 max_size=40)),
                                                                     "advantages": _tensor(st.lists(st.floats()))}),
                                     JSON)})


def _routes(model_id: str, session_id: str):
    seq = st.one_of(st.integers(min_value=-3, max_value=2**64), st.text(max_size=4), st.none(), st.floats())
    model = st.one_of(st.just(model_id), st.text(max_size=20), st.integers())
    loss = st.one_of(st.sampled_from(["cross_entropy", "ppo", "dpo", "grpo", "stable_reinforce"]), JSON)
    return st.one_of(
        st.tuples(st.just("forward_backward"), st.fixed_dictionaries(
            {"model_id": model, "seq_id": seq, "forward_backward_input": st.one_of(st.fixed_dictionaries(
                {"data": st.lists(_datum(), max_size=3), "loss_fn": loss},
                optional={"loss_fn_config": JSON}), JSON)}, optional={"junk": JSON})),
        st.tuples(st.just("forward"), st.fixed_dictionaries(
            {"model_id": model, "seq_id": seq, "forward_input": st.one_of(st.fixed_dictionaries(
                {"data": st.lists(_datum(), max_size=3), "loss_fn": loss}), JSON)})),
        st.tuples(st.just("optim_step"), st.fixed_dictionaries(
            {"model_id": model, "seq_id": seq},
            optional={"adam_params": st.one_of(st.fixed_dictionaries(
                {"learning_rate": st.floats(), "beta1": st.floats(), "eps": st.floats()}), JSON)})),
        st.tuples(st.just("create_model"), st.fixed_dictionaries(
            {"session_id": st.one_of(st.just(session_id), st.text(max_size=8)), "model_seq_id": seq,
             "base_model": st.one_of(st.just("twinkle-tiny"), st.text(max_size=8)),
             "lora_config": st.one_of(st.fixed_dictionaries({"rank": st.integers(-5, 10**6)}), JSON)})),
        st.tuples(st.just("asample"), st.fixed_dictionaries(
            {"base_model": st.one_of(st.just("twinkle-tiny"), JSON), "num_samples": st.one_of(st.integers(-2, 10**6),
                                                                                                JSON),
             "prompt": st.one_of(st.fixed_dictionaries({"chunks": st.lists(st.fixed_dictionaries(
                 {"type": st.just("encoded_text"), "tokens": st.lists(TOKEN, max_size=10)}), max_size=2)}), JSON),
             "sampling_params": st.one_of(st.fixed_dictionaries(
                 {"max_tokens": st.one_of(st.integers(-2, 10**7), JSON), "temperature": st.floats(),
                  "top_k": st.integers(-10, 10), "top_p": st.floats(), "seed": st.integers(-5, 2**70)}), JSON)})),
        st.tuples(st.just("save_weights"), st.fixed_dictionaries(
            {"model_id": model, "path": st.one_of(st.text(max_size=20), JSON), "seq_id": seq})),
        st.tuples(st.just("retrieve_future"), st.fixed_dictionaries({"request_id": st.one_of(st.text(max_size=40),
                                                                                              JSON)})),
        st.tuples(st.just("native"), st.tuples(st.sampled_from(["forward_backward", "step", "sample", "save",
                                                                "create_model", "retrieve"]),
                                               st.dictionaries(st.sampled_from(["target_id", "seq_id", "args",
                                                                                "wait", "request_id"]),
                                                               JSON, max_size=5))),
    )


@pytest.fixture(scope="module")
def victim(server):
    """Bob's model and the numbers that fingerprint its state."""
    bob = Raw(server, server.keys["bob"])
    model = bob.create_model(seed=77)
    bob.result(bob.forward_backward(model, 1))
    bob.result(bob.optim_step(model, 2))
    return bob, model


def _fingerprint(bob: Raw, model: str, seq: int) -> tuple:
    loss = bob.loss(bob.forward_backward(model, seq, forward_only=True))
    runs = bob.http.get(f"{bob.url}/training_runs", timeout=30).json()["cursor"]["total_count"]
    return loss, runs


def test_no_request_body_gets_a_5xx_or_touches_another_tenant(server, victim):
    bob, bob_model = victim
    before = _fingerprint(bob, bob_model, 3)
    alice = Raw(server, server.keys["alice"])
    model = alice.create_model(seed=78)
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_routes(model, alice.session_id))
    def probe(case):
        route, body = case
        if route == "native":
            method, payload = body
            try:
                data = wire.dumps(payload)
            except (OverflowError, TypeError, ValueError):
                assume(False)  # not encodable as msgpack: no client could send it
            reply = alice.http.post(f"{server.url}/api/v1/twinkle/{method}", data=data,
                                    headers={"Content-Type": wire.CONTENT_TYPE}, timeout=60)
        else:
            reply = alice.http.post(f"{alice.url}/{route}", data=_dumps(body),
                                    headers={"Content-Type": "application/json"}, timeout=60)
        seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
        assert reply.status_code < 500, (route, body, reply.text[:500])

    probe()
    assert any(code >= 400 for code in seen) and any(code < 300 for code in seen), seen
    after = _fingerprint(bob, bob_model, 4)
    assert after == before


def _dumps(value) -> bytes:
    """JSON as a client might send it, non-finite floats included (as Python's json writes them)."""
    import json

    return json.dumps(value, allow_nan=True, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                      else str(o)).encode()

