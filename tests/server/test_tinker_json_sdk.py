"""An old JSON-protocol Tinker SDK (0.24.x, its own venv) trains and samples against the server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("tinker024_client.py")
PYTHON = os.environ.get("TWINKLE_TINKER024_PYTHON") or str(Path(__file__).resolve().parents[2] / ".venv-tinker024"
                                                              / "bin" / "python")


@pytest.fixture(scope="module")
def report(server):
    if not Path(PYTHON).exists():
        pytest.fail(f"the tinker 0.24 venv is missing at {PYTHON}; `make test` creates it")
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": server.keys["alice"]}
    done = subprocess.run([PYTHON, str(SCRIPT), "10"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\nserver log:\n{server.log_tail()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_old_sdk_is_really_the_json_protocol(report):
    assert report["version"].startswith("0.24")


def test_sft_loop_loss_falls(report):
    losses = report["losses"]
    assert len(losses) == 10
    assert losses[-1] < 0.5 * losses[0]


def test_forward_logprobs_and_samples_come_back(report):
    n_targets = 31
    assert len(report["forward_logprobs"]) == n_targets
    assert report["forward_loss"] == pytest.approx(-sum(report["forward_logprobs"]), rel=1e-4)
    assert len(report["samples"]) == 2
    for sample in report["samples"]:
        assert 1 <= len(sample["tokens"]) <= 6
        assert sample["logprobs"] is not None and len(sample["logprobs"]) == len(sample["tokens"])
        assert all(lp <= 0 for lp in sample["logprobs"])
    assert report["state_path"].startswith("tinker://") and report["state_path"].endswith("/weights/json-sdk-state")
