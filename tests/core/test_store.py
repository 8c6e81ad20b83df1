"""The SQLite store's session, model and future rules that the server relies on."""

from __future__ import annotations

import time

from twinkle.store import Store


def test_a_heartbeat_after_expiry_revives_the_session_with_a_fresh_heartbeat(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.create_session("s1", "alice")
    store.set_session_status("s1", "expired")  # the janitor expired it while the client paused
    time.sleep(0.01)
    before = time.time()
    assert store.heartbeat("s1", "alice") == "expired"
    session = store.get_session("s1", "alice")
    assert session["status"] == "active" and session["last_heartbeat"] >= before
    assert [s["session_id"] for s in store.stale_sessions(before - 1)] == []  # not expired again at once
    store.set_session_status("s1", "finished")
    assert store.heartbeat("s1", "alice") == "finished"  # a finished session stays finished
    assert store.get_session("s1", "alice")["status"] == "finished"
    assert store.heartbeat("s1", "bob") is None  # another tenant's session is unknown


def test_live_models_count_only_active_sessions(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for session in ("live", "ended"):
        store.create_session(session, "alice")
    for i, session in enumerate(("live", "live", "ended")):
        store.create_model(f"m{i}", "alice", session_id=session, base_model="b", lora={"rank": 4}, run_dir=f"r{i}")
    store.set_session_status("ended", "finished")
    store.set_model_status("m1", "unloaded")
    assert store.live_model_count("alice") == 1
    assert store.live_model_count("bob") == 0


def test_a_deleted_future_lets_its_retry_start_afresh(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    first, created = store.create_future("r1", "alice", kind="train", target_id="m", seq_id=3)
    assert created
    store.delete_future("r1")  # refused by a quota before it was queued
    second, created = store.create_future("r2", "alice", kind="train", target_id="m", seq_id=3)
    assert created and second.request_id == "r2"
    store.complete_future("r2", b"x")
    store.delete_future("r2")  # finished futures are never deleted this way
    assert store.get_future("r2").status == "done"
