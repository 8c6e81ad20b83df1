"""B3, B4 and sampling: the same SDK workload on a batched and a time-sliced server, and the same
comparison on the backend alone (what batching can gain before any server cost).

Measured rounds alternate between the servers (ABBA...), so a noisy machine weighs on both alike.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.fleet import LEARNING_RATE, SdkFleet
from bench.inprocess import make_engine, request_id, train_step
from bench.tenancy import BATCHED, MODEL, MODES, TENANTS, TIME_SLICED, VOCAB, delta, say, status_of
from bench.workloads import sft_batch, summarize
from twinkle.devserver import DevServer

BATCH_SIZE, SEQ_LEN = 2, 128  # per tenant and step
LORA_RANK = 8
WARMUP_STEPS = 3
ROUNDS = 4  # measured rounds per mode, alternated batched/time_sliced (ABBA...)
ROUND_STEPS = 8  # steps per tenant per round
GOAL_RATIO, GOAL_FAIRNESS = 1.5, 1.2

PROMPTS, PROMPT_LEN, SAMPLE_TOKENS = 4, 24, 64
SAMPLE_BURSTS = 2  # measured bursts per mode after a warm-up burst, alternated
INPROCESS_SEQUENTIAL = TENANTS  # one-at-a-time requests timed in-process (its rate does not depend on count)


def tenant_batches() -> list:
    return [sft_batch(VOCAB, seed=i, batch_size=BATCH_SIZE, seq_len=SEQ_LEN) for i in range(TENANTS)]


def alternating(count: int) -> list[str]:
    """MODES in ABBA order, `count` of each."""
    return [mode for r in range(count) for mode in (MODES if r % 2 == 0 else MODES[::-1])]


def train_comparison(servers: dict[str, DevServer], fleets: dict[str, SdkFleet]) -> dict:
    """Aggregate and per-tenant training throughput, batched vs time-sliced, same rounds on both."""
    for mode in MODES:
        fleets[mode].train_round(WARMUP_STEPS)
    before = {mode: status_of(servers[mode]) for mode in MODES}
    walls = {mode: [] for mode in MODES}
    tenant_s = {mode: np.zeros(TENANTS) for mode in MODES}
    order = alternating(ROUNDS)
    for mode in order:
        timing = fleets[mode].train_round(ROUND_STEPS)
        walls[mode].append(timing.wall_s)
        tenant_s[mode] += timing.tenant_s
    after = {mode: status_of(servers[mode]) for mode in MODES}

    result = {}
    for mode in MODES:
        fleet = fleets[mode]
        steps = ROUNDS * ROUND_STEPS
        tokens = steps * sum(fleet.tokens_per_step)
        per_tenant = [steps * fleet.tokens_per_step[i] / tenant_s[mode][i] for i in range(TENANTS)]
        passes = delta(after[mode], before[mode], "train_passes")
        requests = delta(after[mode], before[mode], "train_pass_requests")
        result[mode] = {
            "tokens": tokens, "wall_s": sum(walls[mode]), "round_wall_s": walls[mode],
            "train_tokens_per_s": tokens / sum(walls[mode]),
            "per_tenant_tokens_per_s": per_tenant,
            "fairness_max_over_min": max(per_tenant) / min(per_tenant),
            "passes": passes, "pass_requests": requests,
            "mean_requests_per_pass": requests / passes if passes else 0.0,
            "shared_passes": delta(after[mode], before[mode], "shared_train_passes"),
            "max_models_per_pass": after[mode]["max_models_per_pass"],
            "execute_ms_p50": after[mode].get("execute_ms_p50"),
        }
    batched, sliced = result[BATCHED], result[TIME_SLICED]
    ratio = batched["train_tokens_per_s"] / sliced["train_tokens_per_s"]
    for mode in MODES:
        say(f"B3 {mode}: {result[mode]['train_tokens_per_s']:.0f} train tok/s, "
            f"{result[mode]['mean_requests_per_pass']:.2f} requests per pass")
    say(f"B3 ratio batched/time_sliced: {ratio:.2f} (goal >= {GOAL_RATIO})")
    say(f"B4 fairness max/min per-tenant throughput (batched): {batched['fairness_max_over_min']:.2f} "
        f"(goal <= {GOAL_FAIRNESS})")
    return {
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "fairness_max_over_min": batched["fairness_max_over_min"],
        "goal_fairness": GOAL_FAIRNESS,
        "tenants": TENANTS, "batch": [BATCH_SIZE, SEQ_LEN], "lora_rank": LORA_RANK, "loss": "cross_entropy",
        "warmup_steps": WARMUP_STEPS, "measured_steps_per_tenant": ROUNDS * ROUND_STEPS, "round_order": order,
        **result,
        "note": "aggregate = all tenants' tokens / wall time of the measured rounds; mean_requests_per_pass from "
                "the status endpoint over those rounds (a step counts as its own ops batch, not a pass)",
    }


def inprocess_training(state_dir: str) -> dict:
    """The backend alone: the tenants' steps in one shared pass vs one pass each. On CPU a pass costs
    about its tokens, so this bounds what batching can gain on this machine before any server cost."""
    from twinkle.backends import ForwardRequest, StepRequest
    from twinkle.types import AdamParams, LoraConfig

    engine = make_engine(state_dir, MODEL)
    adam = AdamParams(learning_rate=LEARNING_RATE)
    adapters = [f"tenant{i}" for i in range(TENANTS)]
    batches = tenant_batches()
    for i, adapter in enumerate(adapters):
        engine.create_adapter(adapter, LoraConfig(rank=LORA_RANK, seed=i))

    def shared_step() -> None:
        engine.forward_backward([ForwardRequest(request_id("fb"), a, b) for a, b in zip(adapters, batches)])
        engine.optim_step([StepRequest(request_id("step"), a, adam) for a in adapters])

    def sliced_step() -> None:
        for adapter, batch in zip(adapters, batches):
            train_step(engine, adapter, batch, adam)

    times: dict[str, list[float]] = {BATCHED: [], TIME_SLICED: []}
    for step in (shared_step, sliced_step):
        step()  # warm-up
    for _ in range(ROUNDS):
        for mode, step in ((BATCHED, shared_step), (TIME_SLICED, sliced_step)):
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    tokens = TENANTS * BATCH_SIZE * SEQ_LEN
    result = {mode: {"step_of_all_tenants": summarize(t), "train_tokens_per_s": tokens / statistics.median(t)}
              for mode, t in times.items()}
    ratio = result[BATCHED]["train_tokens_per_s"] / result[TIME_SLICED]["train_tokens_per_s"]
    say(f"in-process training: one shared pass for {TENANTS} tenants is {ratio:.2f}x the throughput of one pass "
        "each")
    return {"ratio": ratio, **result}


# ------------------------------------------------------------------ sampling
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(10, VOCAB - 1, size=PROMPT_LEN).tolist() for _ in range(PROMPTS)]


def sampling_comparison(servers: dict[str, DevServer], fleets: dict[str, SdkFleet]) -> dict:
    """Sampled tokens/s of all tenants' requests submitted at once, batched vs time-sliced."""
    batch = prompts()
    for mode in MODES:
        fleets[mode].snapshot_samplers()
        fleets[mode].sample_burst(batch[:1], max_tokens=4)  # warm-up
    before = {mode: status_of(servers[mode]) for mode in MODES}
    times = {mode: [] for mode in MODES}
    tokens = {mode: 0 for mode in MODES}
    for mode in alternating(SAMPLE_BURSTS):
        wall, n = fleets[mode].sample_burst(batch, SAMPLE_TOKENS)
        times[mode].append(wall)
        tokens[mode] += n
        say(f"sampling burst on {mode}: {n} tokens in {wall:.2f}s")
    after = {mode: status_of(servers[mode]) for mode in MODES}
    result = {}
    for mode in MODES:
        batches = delta(after[mode], before[mode], "sample_batches")
        requests = delta(after[mode], before[mode], "sample_requests")
        result[mode] = {"tokens": tokens[mode], "wall_s": times[mode],
                        "sampled_tokens_per_s": tokens[mode] / sum(times[mode]),
                        "sample_batches": batches, "sample_requests": requests,
                        "mean_requests_per_batch": requests / batches if batches else 0.0}
    ratio = result[BATCHED]["sampled_tokens_per_s"] / result[TIME_SLICED]["sampled_tokens_per_s"]
    say(f"sampling: batched {result[BATCHED]['sampled_tokens_per_s']:.0f} tok/s vs time_sliced "
        f"{result[TIME_SLICED]['sampled_tokens_per_s']:.0f} tok/s -> ratio {ratio:.2f}")
    return {"ratio": ratio, "requests_per_burst": TENANTS * PROMPTS, "max_tokens": SAMPLE_TOKENS,
            "prompt_tokens": PROMPT_LEN, **result}


def inprocess_sampling(state_dir: str) -> dict:
    """The backend alone: 32 requests of 8 adapters in one call vs one request per call."""
    from twinkle.backends import SampleRequest
    from twinkle.types import AdamParams, LoraConfig, SamplingParams

    engine = make_engine(state_dir, MODEL)
    adapters = [f"sampler{i}" for i in range(TENANTS)]
    batch = sft_batch(VOCAB, batch_size=BATCH_SIZE, seq_len=SEQ_LEN)
    for i, adapter in enumerate(adapters):  # one step each: eight different adapters
        engine.create_adapter(adapter, LoraConfig(rank=LORA_RANK, seed=i))
        train_step(engine, adapter, batch, AdamParams(learning_rate=1e-3))

    def requests(n: int) -> list:
        return [SampleRequest(request_id("sample"), adapter, prompt,
                              SamplingParams(max_tokens=SAMPLE_TOKENS, stop=[], seed=100 * t + j))
                for t, adapter in enumerate(adapters) for j, prompt in enumerate(prompts())][:n]

    engine.sample(requests(2))  # warm-up
    all_at_once = requests(TENANTS * PROMPTS)
    start = time.perf_counter()
    engine.sample(all_at_once)
    batched_s = time.perf_counter() - start
    one_by_one = requests(TENANTS * PROMPTS)[::PROMPTS][:INPROCESS_SEQUENTIAL]  # one prompt of each adapter
    start = time.perf_counter()
    for request in one_by_one:
        engine.sample([request])
    sequential_s = time.perf_counter() - start
    batched_rate = len(all_at_once) * SAMPLE_TOKENS / batched_s
    sequential_rate = len(one_by_one) * SAMPLE_TOKENS / sequential_s
    ratio = batched_rate / sequential_rate
    say(f"in-process sampling: {len(all_at_once)} requests at once {batched_rate:.0f} tok/s vs one at a time "
        f"{sequential_rate:.0f} tok/s -> ratio {ratio:.2f}")
    return {"ratio": ratio,
            "batched": {"requests": len(all_at_once), "wall_s": batched_s, "sampled_tokens_per_s": batched_rate},
            "one_at_a_time": {"requests": len(one_by_one), "wall_s": sequential_s,
                              "sampled_tokens_per_s": sequential_rate}}
