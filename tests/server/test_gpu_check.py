"""`bench/gpu_check.py`, the script operators run on a GPU machine, runs here on CPU so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_trains_and_samples_through_the_server():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--steps", "12", "--tenants", "3", "--rows", "2",
                           "--length", "64"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("gpu_check: "))
    figures = json.loads(line[len("gpu_check: "):])
    import torch

    assert figures["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert figures["loss_last"] < 0.8 * figures["loss_first"]
    assert figures["sample_logprob_max_gap"] < 1e-3
