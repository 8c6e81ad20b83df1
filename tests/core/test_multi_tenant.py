"""Many tenants in one pass: batched training and sampling give each tenant exactly its solo results.

Every test compares a shared pass of several adapters (different ranks, alphas, targets and losses)
with the same adapters trained alone on fresh backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinkle.backends import ForwardRequest, SampleRequest, StepRequest, run_one
from twinkle.types import AdamParams, Datum, LoraConfig, SamplingParams

ADAM = AdamParams(learning_rate=1e-2)
# (adapter, LoRA, loss, loss_config): ranks, alphas and targets differ between tenants
TENANTS = [
    ("ce-r4", LoraConfig(rank=4, alpha=8.0, seed=1), "cross_entropy", None),
    ("ppo-r16", LoraConfig(rank=16, alpha=32.0, seed=2, train_unembed=False), "ppo", {"clip_low_threshold": 0.9}),
    ("is-r8-attn", LoraConfig(rank=8, alpha=16.0, seed=3, train_mlp=False, train_unembed=False),
     "importance_sampling", None),
    ("dpo-r12-mlp", LoraConfig(rank=12, alpha=24.0, seed=4, train_attn=False), "dpo", None),
]


def _datum(rng, length: int, loss: str) -> Datum:
    tokens = rng.integers(10, 2000, size=length + 1)
    inputs = {"target_tokens": tokens[1:].astype(np.int64)}
    if loss == "cross_entropy":
        inputs["weights"] = rng.uniform(0.0, 1.0, size=length).astype(np.float32)
    elif loss == "dpo":
        inputs["ref_logprobs"] = rng.normal(-7.0, 0.5, size=length).astype(np.float32)
    else:
        inputs["logprobs"] = rng.normal(-7.5, 0.3, size=length).astype(np.float32)
        inputs["advantages"] = rng.normal(0.0, 1.0, size=length).astype(np.float32)
    return Datum(input_tokens=tokens[:-1].astype(np.int64), loss_inputs=inputs)


def _batches(lengths_of, steps: int = 2, seed: int = 0) -> dict[str, list[list[Datum]]]:
    """Per tenant, `steps` batches of two datums (the DPO pair is one chosen/rejected pair)."""
    rng = np.random.default_rng(seed)
    return {name: [[_datum(rng, n, loss) for n in lengths_of(name, step)] for step in range(steps)]
            for name, _, loss, _ in TENANTS}


def _create(engine, names=None) -> None:
    for name, lora, _, _ in TENANTS:
        if names is None or name in names:
            engine.create_adapter(name, lora, adam=ADAM)


def _request(name: str, batch, step: int) -> ForwardRequest:
    _, _, loss, config = next(t for t in TENANTS if t[0] == name)
    return ForwardRequest(f"{name}-{step}", name, batch, loss, config)


def _train_together(engine, batches) -> dict[str, list]:
    """Every tenant's forward_backward in one call per step (one shared pass), then all their steps."""
    results = {name: [] for name in batches}
    steps = len(next(iter(batches.values())))
    for step in range(steps):
        passes = engine.passes
        outcomes = engine.backend.forward_backward([_request(n, batches[n][step], step) for n in batches])
        assert engine.passes == passes + 1  # really one pass
        grads = {n: engine.grads(n) for n in batches}
        engine.backend.optim_step([StepRequest(f"s-{n}-{step}", n) for n in batches])
        for name in batches:
            results[name].append((outcomes[f"{name}-{step}"].unwrap(), grads[name]))
    return results


def _train_alone(make_engine, name, batches) -> tuple[list, dict]:
    engine = make_engine()
    _create(engine, [name])
    results = []
    for step, batch in enumerate(batches):
        result = run_one(engine.backend.forward_backward, _request(name, batch, step))
        results.append((result, engine.grads(name)))
        engine.optim_step(name)
    return results, engine.adapter_weights(name)


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((torch.as_tensor(a[k]) - torch.as_tensor(b[k])) ** 2).sum()) for k in a)
    den = sum(float((torch.as_tensor(b[k]) ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def test_batched_pass_equals_each_tenant_alone_exactly(make_engine):
    """Equal sequence lengths: the shared pass reproduces every solo run bit for bit."""
    batches = _batches(lambda name, step: (24, 24))
    engine = make_engine()
    _create(engine)
    together = _train_together(engine, batches)
    for name in batches:
        alone, weights = _train_alone(make_engine, name, batches[name])
        for (got, got_grads), (want, want_grads) in zip(together[name], alone):
            assert got.metrics == want.metrics, name
            for a, b in zip(got.loss_outputs, want.loss_outputs):
                np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
            assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads), name
        got_weights = engine.adapter_weights(name)
        assert all(np.array_equal(got_weights[k], weights[k]) for k in weights), name


def test_batched_pass_with_padding_matches_alone_within_float32(make_engine):
    """Different lengths pad the shared batch; each tenant still gets its solo numbers (fp32, 1e-6)."""
    lengths = {"ce-r4": (7, 31), "ppo-r16": (19, 12), "is-r8-attn": (40, 5), "dpo-r12-mlp": (16, 16)}
    batches = _batches(lambda name, step: lengths[name], steps=1, seed=1)
    engine = make_engine()
    _create(engine)
    together = _train_together(engine, batches)
    for name in batches:
        alone, weights = _train_alone(make_engine, name, batches[name])
        (got, got_grads), (want, want_grads) = together[name][0], alone[0]
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-6, abs=1e-6)
        for a, b in zip(got.loss_outputs, want.loss_outputs):
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-5)
        assert _rel(got_grads, want_grads) < 1e-6, name
        assert _rel(engine.adapter_weights(name), weights) < 1e-6, name


def test_adapter_trained_in_a_shared_pass_loads_in_peft(make_engine, tmp_path, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batches = _batches(lambda name, step: (20, 20))
    engine = make_engine()
    _create(engine)
    _train_together(engine, batches)
    ids = list(range(40, 70))
    datum = Datum(input_tokens=np.asarray(ids[:-1]), loss_inputs={"target_tokens": np.asarray(ids[1:])})
    for name, lora, _, _ in TENANTS:
        folder = tmp_path / name
        engine.save(name, folder, with_optimizer=False)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(folder)).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        got = engine.forward(name, [datum]).loss_outputs[0]["logprobs"]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-5)


def test_a_bad_request_fails_alone_in_a_shared_pass(make_engine):
    """An out-of-vocabulary token and a raising custom loss fail their own requests; the other
    tenants' results are their solo results, and the failed adapters are untouched."""
    batches = _batches(lambda name, step: (18, 18), steps=1, seed=2)
    engine = make_engine()
    _create(engine)
    bad_token = Datum(input_tokens=np.asarray([5, 6, 10_000]), loss_inputs={"target_tokens": np.asarray([6, 7, 8])})

    def broken_loss(logprobs, inputs):
        raise RuntimeError("user bug")

    weights_before = {name: engine.adapter_weights(name) for name in ("ce-r4", "is-r8-attn")}
    requests = [_request(n, batches[n][0], 0) for n in ("ppo-r16", "dpo-r12-mlp")]
    requests += [ForwardRequest("bad-token", "ce-r4", batches["ce-r4"][0] + [bad_token]),
                 ForwardRequest("bad-loss", "is-r8-attn", batches["is-r8-attn"][0], broken_loss)]
    outcomes = engine.backend.forward_backward(requests)
    assert outcomes["bad-token"].error["status_code"] == 400 and "vocabulary" in outcomes["bad-token"].error["error"]
    assert outcomes["bad-loss"].error["status_code"] == 400 and "user bug" in outcomes["bad-loss"].error["error"]
    for name in ("ce-r4", "is-r8-attn"):
        assert all(g is None for g in engine.grads(name).values())
        engine.optim_step(name)  # nothing pending: the step leaves the weights as they were
        after = engine.adapter_weights(name)
        assert all(np.array_equal(after[k], w) for k, w in weights_before[name].items())
    for name in ("ppo-r16", "dpo-r12-mlp"):
        alone, _ = _train_alone(make_engine, name, batches[name])
        assert outcomes[f"{name}-0"].unwrap().metrics == alone[0][0].metrics


def test_offload_beyond_the_slot_count_restores_exactly(make_engine, state_dir, tmp_path):
    """Three models on two resident slots, trained round robin: every switch offloads one to disk
    and restores another, and each ends exactly where it would have alone."""
    from twinkle.api.service import ModelService
    from twinkle.api.spec import CreateModelArgs, ForwardArgs, StepArgs

    backend = make_engine(max_adapters=2).backend
    service = ModelService("twinkle-tiny", backend, lambda m, k, n: tmp_path / "ckpt" / m / k / n,
                           offload_path=lambda m: tmp_path / "offload" / m, max_resident_models=2)
    names = [name for name, *_ in TENANTS[:3]]
    batches = _batches(lambda name, step: (16, 16), steps=3, seed=3)
    for name, lora, _, _ in TENANTS[:3]:
        service.create_model(name, CreateModelArgs(base_model="twinkle-tiny", lora=lora, optimizer=ADAM))
    losses = {name: [] for name in names}
    for step in range(3):
        for name, _, loss, config in TENANTS[:3]:
            result = service.forward_backward(name, ForwardArgs(data=batches[name][step], loss=loss,
                                                                loss_config=config))
            service.step(name, StepArgs())
            losses[name].append(result.metrics)
    assert service.offloads >= 6 and service.restores >= 6
    assert len(service.resident_models) == 2
    for name in names:
        alone, weights = _train_alone(make_engine, name, batches[name])
        assert losses[name] == [result.metrics for result, _ in alone], name
        service.forward(name, ForwardArgs(data=batches[name][0][:1], loss="cross_entropy"))  # restore it
        got = backend.adapter_weights(name)
        assert all(np.array_equal(got[k], weights[k]) for k in weights), name


def test_a_higher_rank_tenant_arriving_mid_training_changes_nothing(make_engine):
    """A new adapter of higher rank re-lays out the bank; optimizer state moves with the weights."""
    batches = _batches(lambda name, step: (20, 20), steps=3, seed=4)
    name = "ce-r4"
    engine = make_engine()
    _create(engine, [name])
    for step in range(3):
        engine.forward_backward(name, batches[name][step], "cross_entropy")
        if step == 1:  # grads pending across the re-layout, too
            engine.create_adapter("big", LoraConfig(rank=64, seed=9))
        engine.optim_step(name)
    _, weights = _train_alone(make_engine, name, batches[name])
    assert engine.bank.rank >= 64
    got = engine.adapter_weights(name)
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


def test_sampling_many_adapters_in_one_generation_equals_one_at_a_time(make_engine):
    engine = make_engine()
    _create(engine)
    _train_together(engine, _batches(lambda name, step: (20, 20), steps=1, seed=5))
    requests = []
    for i, (name, *_rest) in enumerate(TENANTS + [(None,)]):
        for j in range(2):
            prompt = list(range(30 + i, 38 + i + 3 * j))  # prompts of different lengths: left padding
            requests.append(SampleRequest(f"{name}-{j}", name, prompt,
                                          SamplingParams(max_tokens=6, seed=10 * i + j, stop=[]),
                                          num_samples=2, include_prompt_logprobs=True, topk_sample_logprobs=2))
    together = engine.backend.sample(requests)
    for request in requests:
        got, want = together[request.request_id].unwrap(), run_one(engine.backend.sample, request)
        for a, b in zip(got.sequences, want.sequences):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], rtol=1e-5, atol=1e-5)


def test_bfloat16_base_model_trains_tenants_in_one_pass(make_engine):
    """dtype is honoured: the base model runs in bfloat16, adapters and losses stay in float32."""
    engine = make_engine(dtype="bfloat16")
    assert engine.info()["dtype"] == "bfloat16" and engine.model.dtype == torch.bfloat16
    _create(engine, ["ce-r4", "is-r8-attn"])
    assert all(p.dtype == torch.float32 for _, p in engine.params("ce-r4"))
    rng = np.random.default_rng(6)
    batches = {name: [_datum(rng, 24, loss) for _ in range(2)]
               for name, _, loss, _ in TENANTS if name in ("ce-r4", "is-r8-attn")}
    first = last = None
    for step in range(12):
        outcomes = engine.backend.forward_backward([_request(n, batches[n], step) for n in batches])
        engine.backend.optim_step([StepRequest(f"s{n}{step}", n) for n in batches])
        loss = outcomes[f"ce-r4-{step}"].unwrap().metrics["loss:sum"]
        assert outcomes[f"ce-r4-{step}"].unwrap().loss_outputs[0]["logprobs"].dtype == np.float32
        first, last = first or loss, loss
    assert last < 0.8 * first, (first, last)
    sampled = engine.sample("ce-r4", [5, 6, 7], SamplingParams(max_tokens=4, seed=0))
    assert len(sampled.sequences[0].tokens) == 4 and all(np.isfinite(sampled.sequences[0].logprobs))


@pytest.mark.parametrize("lora", [LoraConfig(rank=8, seed=0), LoraConfig(rank=4, seed=123, train_mlp=False)])
def test_a_seed_starts_the_adapter_where_peft_would(make_engine, tiny_path, lora):
    """Same seed, same starting weights as peft's default LoRA init on the same base model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from twinkle.lora import peft_config

    engine = make_engine()
    engine.create_adapter("seeded", lora)
    torch.manual_seed(lora.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path),
                           peft_config(engine.table.leaf_kinds, lora, tiny_path))
    want = {name.replace(".default.", "."): p.detach().numpy() for name, p in model.named_parameters()
            if "lora_" in name}
    got = engine.adapter_weights("seeded")
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
