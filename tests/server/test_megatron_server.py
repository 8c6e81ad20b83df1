"""A server whose model trains on megatron-core (the cookbook's TP=2 config), driven by the Tinker SDK.

The server is `twinkle serve` with cookbook/client/server/megatron/server_config.yaml: two Ray actors
(one per TP rank) started with .venv-megatron's interpreter, gloo between them. The same SDK script
runs against the shared transformers server for the reference losses.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.server.conftest import start_twinkle_server
from tests.server.raw import Raw
from tests.server.sdk_sessions import sdk_session

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / ".venv-megatron" / "bin" / "python").exists() and not os.environ.get("TWINKLE_MEGATRON_PYTHON"):
    pytest.skip("megatron-core's virtualenv is missing: run `make megatron-venv` (make test builds it)",
                allow_module_level=True)

KEY = "tml-megatron-key"
COOKBOOK = ROOT / "cookbook" / "client" / "server" / "megatron" / "server_config.yaml"
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "A journey of a thousand miles begins with a single step.",
             "All that glitters is not gold, and not all who wander are lost."]
LOSS_RTOL = 1e-5  # the same fp32 sums in another order (TP=2 gathers logits, sums gradients over ranks)


@pytest.fixture(scope="module")
def megatron_server(tmp_path_factory):
    config = {k: v for k, v in yaml.safe_load(COOKBOOK.read_text()).items() if k not in ("host", "port")}
    config["timeouts"] = {"autosave_s": 0, "seq_gap_s": 5.0}
    handle = start_twinkle_server(tmp_path_factory.mktemp("megatron"), extra_config=config, keys={"meg": KEY})
    yield handle
    handle.stop()


def _sft_losses(url: str, key: str, steps: int = 5) -> list[float]:
    """The cookbook's SFT loop through the unmodified SDK: the loss:sum of each step."""
    with sdk_session(url, key) as service:
        return _sft_losses_of(service.create_lora_training_client(base_model="twinkle-tiny", rank=8, seed=7).result(),
                              steps)


def _sft_losses_of(client, steps: int) -> list[float]:
    tokenizer = client.get_tokenizer()
    data = []
    for text in SENTENCES:
        tokens = tokenizer.encode(text)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
    losses = []
    for _ in range(steps):
        fb = client.forward_backward(data, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return losses


def test_the_tinker_sdk_trains_on_megatron_like_on_transformers(megatron_server, server):
    status = requests.get(f"{megatron_server.url}/api/v1/twinkle/status", headers={"X-API-Key": KEY},
                          timeout=30).json()["models"]["twinkle-tiny"]
    assert status["running"]
    megatron = _sft_losses(megatron_server.url, KEY)
    reference = _sft_losses(server.url, server.keys["alice"])
    assert megatron[-1] < 0.8 * megatron[0], megatron
    assert megatron == pytest.approx(reference, rel=LOSS_RTOL)


def _rank_pids(server) -> list[int]:
    """The server's megatron rank processes (Ray workers titled MegatronWorker in its own session)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "MegatronWorker" in title and os.getsid(int(entry)) == server.process.pid:
                pids.append(int(entry))
        except (OSError, ProcessLookupError):
            continue
    return sorted(pids)


def _error_of(raw: Raw, request_id: str) -> dict:
    while True:
        out = raw.post("retrieve_future", {"request_id": request_id})
        if out.get("type") != "try_again":
            return out


def test_killing_one_rank_fails_its_requests_clearly_and_the_group_is_rebuilt(megatron_server):
    raw = Raw(megatron_server, KEY)
    model = raw.create_model(seed=3)
    raw.result(raw.forward_backward(model, 1))
    raw.result(raw.optim_step(model, 2))
    raw.result(raw.post("save_weights", {"model_id": model, "path": "step1", "seq_id": 3})["request_id"])
    at_checkpoint = raw.loss(raw.forward_backward(model, 4, forward_only=True))
    ranks = _rank_pids(megatron_server)
    assert len(ranks) == 2, ranks

    in_flight = raw.forward_backward(model, 5, tokens=list(range(30, 1055)), copies=12)
    time.sleep(1.0)
    killed_at = time.time()
    os.kill(ranks[1], signal.SIGKILL)  # one rank of two: the whole group is lost with it
    failed = _error_of(raw, in_flight)
    assert failed.get("category") == "server" and "died" in failed["error"], failed
    assert "restored from its state saved at step 1" in failed["error"], failed

    probe = raw.forward_backward(model, 6, forward_only=True)  # waits for the rebuilt group
    assert raw.loss(probe) == pytest.approx(at_checkpoint, rel=1e-6)
    print(f"megatron group rebuilt and serving {time.time() - killed_at:.1f}s after the kill")
    new_ranks = _rank_pids(megatron_server)
    assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks)
    raw.result(raw.optim_step(model, 7))  # and training goes on
