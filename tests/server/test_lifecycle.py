"""Server lifecycle on its own server with short timeouts: exactly-once retries, futures that
survive an ingress restart, idle offload and scale to zero with exact resumption, clean SIGTERM,
and init_tinker_client with a key that lacks Tinker's prefix."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.server.conftest import start_twinkle_server
from tests.server.raw import Raw

KEY = "tml-life-key"
PLAIN_KEY = "carol-plain-secret"  # no tml- prefix: needs init_tinker_client


@pytest.fixture(scope="module")
def life(tmp_path_factory):
    server = start_twinkle_server(
        tmp_path_factory.mktemp("life"), keys={"life": KEY, "carol": PLAIN_KEY},
        extra_config={"timeouts": {"seq_gap_s": 30.0, "sweep_interval_s": 0.5, "adapter_idle_s": 2.0,
                                   "model_idle_release_s": 4.0, "session_timeout_s": 600.0}})
    yield server
    server.stop()


def _train(raw: Raw, model_id: str, steps: int, start_seq: int = 1) -> tuple[list[float], int]:
    losses, seq = [], start_seq
    for _ in range(steps):
        fb = raw.forward_backward(model_id, seq)
        opt = raw.optim_step(model_id, seq + 1)
        losses.append(raw.loss(fb))
        raw.result(opt)
        seq += 2
    return losses, seq


def test_retried_request_runs_once(life):
    raw = Raw(life, KEY)
    model = raw.create_model()
    fb = raw.forward_backward(model, 1)
    first = raw.optim_step(model, 2)
    retry = raw.optim_step(model, 2)  # a client retry after a lost reply: same model, same seq_id
    assert retry == first
    raw.result(first)
    after = raw.loss(raw.forward_backward(model, 3, forward_only=True))

    reference = Raw(life, KEY)
    ref_model = reference.create_model()
    assert reference.loss(reference.forward_backward(ref_model, 1)) == raw.loss(fb)
    reference.result(reference.optim_step(ref_model, 2))
    expected = reference.loss(reference.forward_backward(ref_model, 3, forward_only=True))
    assert after == expected  # the step was applied exactly once


def _kill_ingress(life) -> None:
    """Kill the ingress replica through the server's Ray cluster; Serve starts a new one."""
    info = json.loads((life.state_dir / "server.json").read_text())
    script = f"""
import ray
ray.init(address={info['ray_address']!r}, log_to_driver=False)
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if 'TwinkleIngress' in a['name']]
assert names, ray.util.list_named_actors(all_namespaces=True)
for a in names:
    ray.kill(ray.get_actor(a['name'], namespace=a['namespace']), no_restart=False)
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_futures_survive_an_ingress_restart(life):
    raw = Raw(life, KEY)
    model = raw.create_model()
    done_fb = raw.forward_backward(model, 1)
    raw.result(done_fb)
    waiting = raw.forward_backward(model, 3, forward_only=True)  # held back until seq 2 arrives
    _kill_ingress(life)
    deadline = time.time() + 90
    while True:
        try:
            if requests.get(f"{life.url}/api/v1/healthz", timeout=2).status_code == 200:
                reply = raw.http.post(f"{raw.url}/retrieve_future", json={"request_id": done_fb}, timeout=60)
                if reply.status_code == 200:
                    break
        except requests.RequestException:
            pass
        assert time.time() < deadline, "the ingress did not come back"
        time.sleep(0.5)
    assert raw.loss(done_fb) > 0  # a finished result is still there
    raw.result(raw.optim_step(model, 2))  # the held request now runs, in order
    assert raw.loss(waiting) > 0


def _status(life) -> dict:
    reply = requests.get(f"{life.url}/api/v1/twinkle/status", headers={"X-API-Key": KEY}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["models"]["twinkle-tiny"]


def test_idle_adapters_offload_and_resume_exactly(life):
    raw = Raw(life, KEY)
    model = raw.create_model(seed=21)
    first, seq = _train(raw, model, 2)
    deadline = time.time() + 60
    while model in _status(life)["resident_models"]:  # idle > adapter_idle_s: saved to disk, freed
        assert time.time() < deadline, "the idle adapter was never offloaded"
        time.sleep(0.5)
    deadline = time.time() + 60
    while _status(life)["running"]:  # no resident adapters for a while: workers released
        assert time.time() < deadline, "the model's workers were never released"
        time.sleep(0.5)
    later, _ = _train(raw, model, 2, start_seq=seq)  # restored transparently

    reference = Raw(life, KEY)
    ref_model = reference.create_model(seed=21)
    expected, _ = _train(reference, ref_model, 4)
    assert first + later == expected


def test_init_tinker_client_with_a_plain_key(life, tmp_path, monkeypatch):
    monkeypatch.setenv("TWINKLE_TOKENIZER_CACHE", str(tmp_path / "tok"))
    from twinkle.tinker_patch import init_tinker_client
    from twinkle.tinker_patch.patch import _fetch_tokenizer

    service = init_tinker_client(base_url=life.url, api_key=PLAIN_KEY)
    training = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=1)
    training = training.result() if hasattr(training, "result") else training
    sampler = training.save_weights_and_get_sampling_client()
    sampler = sampler.result() if hasattr(sampler, "result") else sampler
    tokenizer = sampler.get_tokenizer()  # no tokenizer id here: fetched from the server
    assert tokenizer.decode(tokenizer.encode("I am Twinkle")) == "I am Twinkle"
    folder = _fetch_tokenizer(life.url, PLAIN_KEY, "twinkle-tiny")
    assert (tmp_path / "tok") in __import__("pathlib").Path(folder).parents
    # the key is sent as is; a wrong plain key is refused by the server
    bad = requests.get(f"{life.url}/api/v1/training_runs", headers={"X-API-Key": "carol-wrong"}, timeout=30)
    assert bad.status_code == 401 and "invalid API key" in bad.json()["error"]


def test_tinker_patch_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import twinkle.tinker_patch; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _session_processes(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1] == str(pid) and parts[0] != str(pid):
            rows.append(line)
    return rows


def test_sigterm_stops_cleanly_without_leftovers(tmp_path):
    server = start_twinkle_server(tmp_path)
    pid = server.process.pid
    assert _session_processes(pid), "the server should have started Ray processes"
    assert server.stop() == 0
    deadline = time.time() + 30
    while _session_processes(pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session_processes(pid), "processes left behind:\n" + "\n".join(_session_processes(pid))


def test_check_config_cli(tmp_path):
    twinkle = str(__import__("pathlib").Path(sys.executable).with_name("twinkle"))
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - name: twinkle-tiny\n    num_workers: 1\nport: 8100\n")
    done = subprocess.run([twinkle, "check-config", str(good)], capture_output=True, text=True)
    assert done.returncode == 0 and "OK" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: twinkle-tiny\n    num_wrokers: 2\n")
    done = subprocess.run([twinkle, "check-config", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "num_wrokers" in done.stderr
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text("host: 0.0.0.0\n")
    done = subprocess.run([twinkle, "check-config", str(exposed)], capture_output=True, text=True,
                          env={k: v for k, v in __import__("os").environ.items() if k != "TWINKLE_API_KEYS"})
    assert done.returncode == 1 and "API keys" in done.stderr
