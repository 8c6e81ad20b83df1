"""Status routes are tenant-scoped; the operator's view of every tenant needs an operator key."""

from __future__ import annotations

import requests

from tests.server.conftest import OPERATOR_KEY
from tests.server.raw import Raw

BASE = "twinkle-tiny"


def _get(server, path: str, key: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", headers={"X-API-Key": key}, timeout=30)


def test_a_tenant_sees_only_its_own_models_in_the_status(server):
    alice, bob = Raw(server, server.keys["alice"]), Raw(server, server.keys["bob"])
    mine = alice.create_model(seed=41)
    theirs = bob.create_model(seed=42)
    alice.loss(alice.forward_backward(mine, 1, forward_only=True))
    bob.loss(bob.forward_backward(theirs, 1, forward_only=True))
    for raw, own, other in ((alice, mine, theirs), (bob, theirs, mine)):
        status = _get(server, "/api/v1/twinkle/status", raw.http.headers["X-API-Key"]).json()["models"][BASE]
        assert own in status["resident_models"] and other not in status["resident_models"]
        assert "queued_by_tenant" not in status and "tenants" not in status
    # each batch kind's median time, and how much of it the workers computed (the rest is Ray's hops)
    assert 0 < status["compute_ms_p50"]["pass"] <= status["execute_ms_p50"]["pass"], status


def test_the_operator_view_needs_an_operator_key(server):
    Raw(server, server.keys["alice"]).create_model(seed=43)
    reply = _get(server, "/api/v1/admin/status", OPERATOR_KEY)
    assert reply.status_code == 200, reply.text
    view = reply.json()
    assert {"alice", "bob"} <= set(view["tenants"]) and view["tenants"]["alice"]["models"]
    assert "queued_by_tenant" in view["models"][BASE] and view["models"][BASE]["resident_models"]

    refused = _get(server, "/api/v1/admin/status", server.keys["alice"])
    assert refused.status_code == 403 and "operator key" in refused.json()["error"]
    assert _get(server, "/api/v1/admin/status", "no-such-key").status_code == 401
    # and an operator key is not a tenant key
    wrong_way = _get(server, "/api/v1/training_runs", OPERATOR_KEY)
    assert wrong_way.status_code == 401 and "operator key" in wrong_way.json()["error"]
