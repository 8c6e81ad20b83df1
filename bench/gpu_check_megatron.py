"""The megatron backend on this machine's accelerator: the same SFT loop through the Tinker SDK on a
megatron server and a transformers server, with losses compared and step times printed.

    .venv/bin/python -m bench.gpu_check_megatron                   # TP=2 with 2+ GPUs, TP=1 with one, CPU otherwise
    .venv/bin/python -m bench.gpu_check_megatron --require-gpu --dtype bfloat16 --tp 2

Needs megatron-core's environment for the workers: `.venv-megatron` (`make megatron-venv`) or
$TWINKLE_MEGATRON_PYTHON (on GPU images with Python >= 3.12, a venv with a newer megatron-core works
the same way: the backend uses only megatron-core's public GPTModel API and the local layer spec).
Prints one JSON line: losses of both backends, their max relative difference, ms per step, devices.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

from twinkle.devserver import start_dev_server

KEY = "tml-megatron-check"
BASE = "twinkle-tiny"


def _sft(url: str, steps: int, rows: int, length: int) -> tuple[list[float], list[float]]:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    client = service.create_lora_training_client(base_model=BASE, rank=16, seed=5).result()
    rng = np.random.default_rng(0)
    data = []
    for _ in range(rows):
        tokens = [int(t) for t in rng.integers(10, 2000, size=length + 1)]
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    losses, times = [], []
    for _ in range(steps):
        started = time.perf_counter()
        fb = client.forward_backward(data, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
        times.append(time.perf_counter() - started)
    service.close("success").result(timeout=60)  # a reply landing during exit would abort the process
    return losses, times


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tp", type=int, default=None, help="default: 2 with two GPUs or on CPU, else 1")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--require-gpu", action="store_true", help="fail unless there is a GPU")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.require_gpu and not gpus:
        print("no GPU visible", file=sys.stderr)
        return 1
    tp = args.tp or (1 if gpus == 1 else 2)
    common = {"name": BASE, "device": "auto", "dtype": args.dtype}
    configs = {
        "transformers": {**common, "gpus_per_worker": 1 if gpus else 0},
        "megatron": {**common, "backend": "megatron", "gpus_per_worker": tp if gpus else 0,
                     "parallelism": {"tensor_parallel": tp}},
    }
    figures: dict = {"tp": tp, "gpus": gpus, "gpu": torch.cuda.get_device_name(0) if gpus else None,
                     "dtype": args.dtype}
    for name, model in configs.items():  # one after the other: each server gets every GPU it asks for
        with tempfile.TemporaryDirectory(prefix=f"tw-check-{name}-") as work:
            server = start_dev_server(work, config={"models": [model]}, keys={"check": KEY}, timeout_s=600)
            try:
                losses, times = _sft(server.url, args.steps, args.rows, args.length)
            finally:
                server.stop()
        figures[name] = {"losses": losses, "ms_per_step_p50": 1000 * float(np.median(times[1:] or times))}
    ref, ours = np.asarray(figures["transformers"]["losses"]), np.asarray(figures["megatron"]["losses"])
    figures["max_rel_loss_diff"] = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    figures["megatron_over_transformers_step_time"] = (figures["megatron"]["ms_per_step_p50"]
                                                       / figures["transformers"]["ms_per_step_p50"])
    print(json.dumps(figures))
    tolerance = 2e-2 if args.dtype == "bfloat16" else 1e-4
    ok = figures["max_rel_loss_diff"] <= tolerance and ours[-1] < ours[0]
    print("OK" if ok else f"FAILED: losses differ by more than {tolerance} or do not fall", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
