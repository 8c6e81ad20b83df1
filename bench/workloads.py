"""The fixed workloads every benchmark measures, so that in-process and remote numbers compare."""

from __future__ import annotations

import numpy as np

from twinkle.types import Datum

BENCH_MODEL = "bench-small"
BATCH_SIZE = 8
SEQ_LEN = 128
LORA_RANK = 16
WARMUP_STEPS = 3
MEASURED_STEPS = 20


def sft_batch(vocab_size: int, seed: int = 0, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> list[Datum]:
    """A fixed batch of random token sequences with cross-entropy weights 1."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(batch_size):
        tokens = rng.integers(10, vocab_size - 1, size=seq_len + 1)
        data.append(Datum.from_sequence(tokens.tolist()))
    return data


def trivial_batch(vocab_size: int) -> list[Datum]:
    """One 16-token datum: a forward of it is almost no compute (the trivial round trip)."""
    return sft_batch(vocab_size, seed=1, batch_size=1, seq_len=16)


def tinker_batch(batch: list[Datum]) -> list:
    """The same batch as the Tinker SDK's datums (cross-entropy inputs), for SDK clients."""
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(d.input_tokens.tolist()),
                        loss_fn_inputs={"target_tokens": d.loss_inputs["target_tokens"].tolist(),
                                        "weights": d.loss_inputs["weights"].tolist()}) for d in batch]


def tokens_in(batch: list[Datum]) -> int:
    return int(sum(len(d.input_tokens) for d in batch))


def summarize(times: list[float]) -> dict:
    arr = np.asarray(times)
    return {"p50_s": float(np.median(arr)), "p90_s": float(np.percentile(arr, 90)), "min_s": float(arr.min()),
            "n": int(arr.size)}
