"""One short end-to-end check of the server on this machine's accelerator, with the figures it saw.

    .venv/bin/python -m bench.gpu_check                 # CUDA if this machine has a GPU, else CPU
    .venv/bin/python -m bench.gpu_check --require-gpu --dtype bfloat16
    TWINKLE_VLLM_PYTHON=/path/to/venv-vllm/bin/python .venv/bin/python -m bench.gpu_check --require-gpu --vllm

With `--vllm` the model samples with a vLLM sampler worker (on its own GPU when there are two or
more; the GPU `vllm` wheel in the environment $TWINKLE_VLLM_PYTHON names, see clusters/README.md;
without it `.venv-vllm` from `make vllm-venv`), and an importance-sampling step on the sampled
tokens must give loss -sum(advantages) (ratio 1: sampler and trainer agree). Run it with and
without `--vllm` to compare sampling tokens/s.

It starts `twinkle serve` for `twinkle-tiny` (on a GPU when there is one: `gpus_per_worker: 1`,
`device: auto`), trains several tenants' adapters at once through the unmodified Tinker SDK, samples
from a snapshot, checks that losses fall and that sampled-token logprobs agree with the trainer's,
and prints one line of figures. The test suite runs it on CPU so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time

import numpy as np
import requests

from twinkle.devserver import start_dev_server

KEY = "tml-gpu-check"
BASE = "twinkle-tiny"


def _batch(rng, tokenizer_size: int, rows: int, length: int):
    from tinker import types

    data = []
    for _ in range(rows):
        tokens = [int(t) for t in rng.integers(10, tokenizer_size, size=length + 1)]
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return data


def _train(service, tenant: int, steps: int, rows: int, length: int, out: dict) -> None:
    from tinker import types

    client = service.create_lora_training_client(base_model=BASE, rank=8, seed=tenant).result()
    batch = _batch(np.random.default_rng(tenant), 2000, rows, length)  # one batch, learned by heart
    losses, started = [], time.perf_counter()
    for _ in range(steps):
        fb = client.forward_backward(batch, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"] / (rows * length))
        step.result()
    out[tenant] = {"losses": losses, "seconds": time.perf_counter() - started, "client": client}


def _check_sampling(client, max_tokens: int) -> dict:
    """Sample from a snapshot; the sampler's logprobs must equal the trainer's forward on those tokens."""
    from tinker import types

    sampler = client.save_weights_and_get_sampling_client("gpu-check")
    sampler = sampler.result() if hasattr(sampler, "result") else sampler  # a future in newer SDKs
    prompt = [int(t) for t in range(40, 56)]
    started = time.perf_counter()
    result = sampler.sample(types.ModelInput.from_ints(prompt), 4,
                            types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)).result()
    seconds = time.perf_counter() - started
    sequence = result.sequences[0]
    tokens = prompt + list(sequence.tokens)
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    forward = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    gap = float(np.abs(forward[len(prompt) - 1:] - np.asarray(sequence.logprobs)).max())
    sampled = sum(len(s.tokens) for s in result.sequences)
    q = np.zeros(len(tokens) - 1, dtype=np.float32)
    q[len(prompt) - 1:] = sequence.logprobs
    advantages = np.zeros_like(q)
    advantages[len(prompt) - 1:] = 1.0
    rl = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                     loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": q, "advantages": advantages})
    loss = float(client.forward([rl], "importance_sampling").result().metrics["loss:sum"])
    return {"sample_tokens_per_s": sampled / seconds, "sample_logprob_max_gap": gap,
            "importance_ratio_gap": abs(loss + float(advantages.sum())) / float(advantages.sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--require-gpu", action="store_true", help="fail unless the worker ran on CUDA")
    parser.add_argument("--vllm", action="store_true", help="sample with a vLLM sampler worker")
    args = parser.parse_args(argv)

    import tinker
    import torch

    gpus = torch.cuda.device_count()
    model = {"name": BASE, "device": "auto", "dtype": args.dtype, "gpus_per_worker": 1 if gpus else 0}
    if args.vllm:  # a GPU of its own when there are two; else it shares the trainer's (a fraction each)
        share = 1 if gpus >= 2 else (0.5 if gpus else 0)
        model.update(gpus_per_worker=share, max_lora_rank=16)
        model["sampler"] = {"backend": "vllm", "num_workers": 1, "gpus_per_worker": share,
                            "gpu_memory_utilization": 0.3, "max_model_len": 1024, "max_loras": 4}
    with tempfile.TemporaryDirectory(prefix="twinkle-gpu-check-") as work:
        config = {"models": [model], **({"ray": {"num_cpus": 8}} if args.vllm else {})}  # slots for both groups
        server = start_dev_server(work, config=config, keys={"check": KEY}, timeout_s=900 if args.vllm else 240)
        try:
            service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
            runs: dict = {}
            threads = [threading.Thread(target=_train, args=(service, t, args.steps, args.rows, args.length, runs))
                       for t in range(args.tenants)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            if len(runs) != args.tenants:
                print(f"FAIL: only {len(runs)} of {args.tenants} tenants finished; server log:\n{server.log_tail()}")
                return 1
            sampling = _check_sampling(runs[0]["client"], max_tokens=32)
            status = requests.get(f"{server.url}/api/v1/twinkle/status", headers={"X-API-Key": KEY},
                                  timeout=30).json()["models"][BASE]
            service.close("success").result(timeout=60)  # a reply landing during exit would abort the process
        finally:
            server.stop()
    tokens = args.tenants * args.steps * args.rows * args.length
    figures = {
        "device": status.get("device"), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(0) if gpus else None,
        "tenants": args.tenants, "steps": args.steps,
        "train_tokens_per_s": round(tokens / wall, 1),
        "loss_first": round(float(np.mean([r["losses"][0] for r in runs.values()])), 4),
        "loss_last": round(float(np.mean([r["losses"][-1] for r in runs.values()])), 4),
        "mean_requests_per_pass": round(status["train_pass_requests"] / max(1, status["train_passes"]), 2),
        "sample_tokens_per_s": round(sampling["sample_tokens_per_s"], 1),
        "sample_logprob_max_gap": sampling["sample_logprob_max_gap"],
        "sampler": "vllm" if args.vllm else "transformers",
        "importance_ratio_gap": sampling["importance_ratio_gap"],
    }
    print("gpu_check: " + json.dumps(figures))
    problems = []
    fell = {t: round(r["losses"][-1] / r["losses"][0], 3) for t, r in runs.items()}
    if not all(ratio < 0.8 for ratio in fell.values()):
        problems.append(f"a tenant's loss did not fall by 20% (last/first per tenant: {fell})")
    if sampling["sample_logprob_max_gap"] > (5e-2 if args.dtype == "bfloat16" else 1e-3):
        problems.append("sampled-token logprobs disagree with the trainer's")
    if sampling["importance_ratio_gap"] > (5e-2 if args.dtype == "bfloat16" else 1e-3):
        problems.append("importance sampling at ratio 1 did not give -sum(advantages)")
    if args.require_gpu and not str(figures["device"]).startswith("cuda"):
        problems.append(f"the worker ran on {figures['device']}, not CUDA")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
