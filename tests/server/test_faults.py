"""Faults on a server of its own: a training worker killed (kill -9) mid-run is replaced at once and
every model comes back from its newest saved state, or is reported lost; a restarted server
restores the models it saved when it stopped."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from tests.server.conftest import start_twinkle_server
from tests.server.raw import TOKENS, Raw

KEY = "tml-fault-key"
RECOVERY_LIMIT_S = 30.0


def _start(work):
    # autosave off: which models have saved state is then exactly what this test arranges
    return start_twinkle_server(work, keys={"fault": KEY},
                                extra_config={"timeouts": {"autosave_s": 0, "seq_gap_s": 5.0}})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def _kill_worker(server) -> int:
    """kill -9 the server's training worker process: the Ray worker titled BackendWorker in the
    server's own session (other tests' servers run in sessions of their own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "BackendWorker" in title and os.getsid(int(entry)) == server.process.pid:
                pids.append(int(entry))
        except (OSError, ProcessLookupError):
            continue
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def _train(raw: Raw, model: str, steps: int, seq: int) -> int:
    for _ in range(steps):
        raw.result(raw.forward_backward(model, seq))
        raw.result(raw.optim_step(model, seq + 1))
        seq += 2
    return seq


def _error_of(raw: Raw, request_id: str) -> dict:
    while True:
        out = raw.post("retrieve_future", {"request_id": request_id})
        if out.get("type") != "try_again":
            return out


def test_a_killed_worker_is_replaced_and_models_come_back_from_their_saved_state(work):
    server = _start(work)
    try:
        raw = Raw(server, KEY)
        saved, unsaved = raw.create_model(seed=1), raw.create_model(seed=2)
        seq = _train(raw, saved, 2, 1)
        raw.result(raw.post("save_weights", {"model_id": saved, "path": "step2", "seq_id": seq})["request_id"])
        at_checkpoint = raw.loss(raw.forward_backward(saved, seq + 1, forward_only=True))
        seq = _train(raw, saved, 1, seq + 2)  # step 3: lost with the worker
        _train(raw, unsaved, 2, 1)

        # a long pass is running when the worker dies: its request fails, it does not hang
        in_flight = raw.forward_backward(saved, seq, tokens=list(range(30, 1055)), copies=12)
        time.sleep(1.0)
        killed_at = time.time()
        _kill_worker(server)
        failed = _error_of(raw, in_flight)
        ready = requests.get(f"{server.url}/api/v1/readyz", timeout=30)
        assert ready.status_code in (200, 503) and requests.get(f"{server.url}/api/v1/healthz").status_code == 200
        assert failed.get("category") == "server" and "died" in failed["error"], failed
        assert "restored from its state saved at step 2" in failed["error"] and "step 3 was lost" in failed["error"]

        # the model answers again, from its checkpoint, within the recovery limit
        probe = raw.forward_backward(saved, seq + 1, forward_only=True)
        assert raw.loss(probe) == pytest.approx(at_checkpoint, rel=1e-6)
        recovery_s = time.time() - killed_at
        print(f"recovered {recovery_s:.1f}s after the kill")
        assert recovery_s < RECOVERY_LIMIT_S, recovery_s
        lost = _error_of(raw, raw.forward_backward(unsaved, 5, forward_only=True))
        assert lost.get("category") == "server" and "no saved state" in lost["error"], lost
        run = requests.get(f"{raw.url}/training_runs/{unsaved}", headers={"X-API-Key": KEY}, timeout=30).json()
        assert run["corrupted"] is True
        fresh = raw.create_model(seed=3)  # and new work runs as usual
        _train(raw, fresh, 1, 1)
        status = requests.get(f"{server.url}/api/v1/twinkle/status", headers={"X-API-Key": KEY},
                              timeout=30).json()["models"]["twinkle-tiny"]
        assert status["worker_losses"] == 1 and status["running"] and not status["rebuilding"]
        assert requests.get(f"{server.url}/api/v1/readyz", timeout=30).json() == {"status": "ok"}

        # SIGTERM mid-pass: the running request finishes and is stored, the one queued behind it is
        # reported as not run, and every model is saved; the restarted server restores them exactly
        before = {model: raw.loss(raw.forward_backward(model, s, forward_only=True))
                  for model, s in ((saved, seq + 2), (fresh, 3))}
        running = raw.forward_backward(fresh, 4, tokens=list(range(30, 1055)), copies=12)
        queued = raw.forward_backward(fresh, 5, tokens=list(range(30, 1055)), copies=12)
        time.sleep(1.0)
    finally:
        assert server.stop() == 0
    server = _start(work)
    try:
        again = Raw(server, KEY)
        again.session_id = raw.session_id
        assert again.loss(running) > 0  # it ran before the stop: its result is kept
        not_run = _error_of(again, queued)
        assert not_run.get("category") == "server" and "before this request ran" in not_run["error"], not_run
        after = {model: again.loss(again.forward_backward(model, s, forward_only=True))
                 for model, s in ((saved, seq + 3), (fresh, 6))}
        assert after == pytest.approx(before, rel=1e-6)  # pending gradients do not change a forward
        again.result(again.optim_step(fresh, 7))  # and training goes on
    finally:
        server.stop()


def test_tokens_and_requests_keep_flowing_while_a_worker_is_rebuilt(work):
    """Another tenant's requests during the rebuild wait for the new worker instead of failing."""
    server = start_twinkle_server(work / "second", keys={"fault": KEY})
    try:
        raw = Raw(server, KEY)
        model = raw.create_model(seed=4)
        _train(raw, model, 1, 1)  # autosaved after its first step (default autosave)
        results: list = []

        def keep_sending():
            for i in range(6):
                results.append(_error_of(raw, raw.forward_backward(model, 3 + i, forward_only=True)))
                time.sleep(0.3)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        _kill_worker(server)
        sender.join(timeout=120)
        assert len(results) == 6
        ok = [r for r in results if "error" not in r]
        failed = [r for r in results if "error" in r]
        assert ok, results  # the model came back from its autosave
        assert all(r.get("category") == "server" for r in failed), failed  # never a user error, never a hang
    finally:
        server.stop()


assert TOKENS  # the default sequence of the raw client is what the losses above are computed on
