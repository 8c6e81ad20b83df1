"""Sampling: logprobs that agree with forward, seeds, greedy decoding, stop conditions, prompt logprobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twinkle.tiny.build import CORPUS_DIR
from twinkle.types import AdamParams, Datum, LoraConfig, SamplingParams

ADAPTER = "trained"
PROMPT_TEXT = "User: Hello!\nAssistant:"


@pytest.fixture(scope="module")
def engine(state_dir):
    """One engine with an adapter trained a little on the dialogue corpus (a peaked distribution)."""
    from tests.core.solo import Solo
    from twinkle.backends import BackendConfig, make_training_backend

    engine = Solo(make_training_backend(BackendConfig(base_model="twinkle-tiny", state_dir=state_dir)))
    text = (CORPUS_DIR / "dialogues.txt").read_text()[:1200]
    data = [Datum.from_sequence(engine.tokenizer.encode(text[i:i + 300])) for i in range(0, 1200, 300)]
    engine.create_adapter(ADAPTER, LoraConfig(rank=8, seed=0), adam=AdamParams(learning_rate=2e-2))
    for _ in range(5):
        engine.forward_backward(ADAPTER, data)
        engine.optim_step(ADAPTER)
    return engine


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode(PROMPT_TEXT)


def _forward_logprobs(engine, adapter, tokens: list[int]) -> np.ndarray:
    """logprob of tokens[i] given tokens[:i], for i >= 1, through Engine.forward."""
    return engine.forward(adapter, [Datum.from_sequence(tokens)]).loss_outputs[0]["logprobs"]


def _full_logprobs(engine, adapter, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) next-token log-distribution after each prefix, through Engine.forward."""
    vocab = engine.vocab_size
    datum = Datum(input_tokens=np.asarray(tokens),
                  loss_inputs={"target_tokens": np.tile(np.arange(vocab), (len(tokens), 1))})
    return engine.forward(adapter, [datum]).loss_outputs[0]["logprobs"]


def test_sampled_logprobs_agree_with_forward(engine, prompt):
    newline = engine.tokenizer.encode("\n")
    assert len(newline) == 1
    results = [
        engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=16, seed=1), num_samples=4),
        # rows stop at different lengths, so the batch shrinks while decoding
        engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=20, seed=2, stop=newline), num_samples=6),
        engine.sample(ADAPTER, engine.tokenizer.encode("The capital of"), SamplingParams(max_tokens=7, seed=3),
                      num_samples=2),
    ]
    lengths = {len(s.tokens) for s in results[1].sequences}
    assert len(lengths) > 1, "expected samples of different lengths"
    checked = 0
    for result, p in zip(results, [prompt, prompt, engine.tokenizer.encode("The capital of")]):
        # one padded forward batch per call: sequences of different lengths
        data = [Datum.from_sequence(list(p) + seq.tokens) for seq in result.sequences]
        outputs = engine.forward(ADAPTER, data).loss_outputs
        for seq, out in zip(result.sequences, outputs):
            assert len(seq.logprobs) == len(seq.tokens) > 0
            np.testing.assert_allclose(seq.logprobs, out["logprobs"][len(p) - 1:], rtol=0, atol=1e-4)
            checked += 1
    assert checked == 12
    # the trained adapter is not the base model: logprobs under the base differ
    seq = results[0].sequences[0]
    base = _forward_logprobs(engine, None, list(prompt) + seq.tokens)[len(prompt) - 1:]
    assert np.abs(base - np.asarray(seq.logprobs)).max() > 1e-2


def test_same_seed_same_samples_different_seed_differs(engine, prompt):
    params = SamplingParams(max_tokens=12, seed=123, stop=[])
    a = engine.sample(ADAPTER, prompt, params, num_samples=3)
    b = engine.sample(ADAPTER, prompt, params, num_samples=3)
    c = engine.sample(ADAPTER, prompt, params.model_copy(update={"seed": 124}), num_samples=3)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.logprobs for s in a.sequences] == [s.logprobs for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # the rows of one call differ too


@pytest.mark.parametrize("adapter", [ADAPTER, None])
def test_temperature_zero_is_greedy(engine, prompt, adapter):
    result = engine.sample(adapter, prompt, SamplingParams(max_tokens=10, temperature=0, stop=[]), num_samples=2)
    tokens = result.sequences[0].tokens
    assert result.sequences[1].tokens == tokens
    assert len(tokens) == 10
    full = list(prompt) + tokens
    dist = _full_logprobs(engine, adapter, full[:-1])[len(prompt) - 1:]
    assert dist.argmax(axis=-1).tolist() == tokens
    np.testing.assert_allclose(result.sequences[0].logprobs, dist.max(axis=-1), rtol=0, atol=1e-4)
    # the seed does not matter for greedy decoding
    other = engine.sample(adapter, prompt, SamplingParams(max_tokens=10, temperature=0, stop=[], seed=99))
    assert other.sequences[0].tokens == tokens


@pytest.mark.parametrize("adapter", [ADAPTER, None])
def test_top_k_one_equals_greedy(engine, prompt, adapter):
    greedy = engine.sample(adapter, prompt, SamplingParams(max_tokens=10, temperature=0, stop=[]))
    top1 = engine.sample(adapter, prompt, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=5, stop=[]),
                         num_samples=2)
    for seq in top1.sequences:
        assert seq.tokens == greedy.sequences[0].tokens
        np.testing.assert_allclose(seq.logprobs, greedy.sequences[0].logprobs, rtol=0, atol=1e-5)


def test_stop_token_ids(engine, prompt):
    # one row with a fixed seed: a run with a stop condition is a prefix of the run without
    free = SamplingParams(max_tokens=12, seed=21, stop=[])
    run = engine.sample(ADAPTER, prompt, free).sequences[0]
    k = next(i for i in range(2, len(run.tokens)) if run.tokens[i] not in run.tokens[:i])
    stop_token = run.tokens[k]
    seq = engine.sample(ADAPTER, prompt, free.model_copy(update={"stop": [stop_token]})).sequences[0]
    assert seq.stop_reason == "stop"
    assert seq.tokens == run.tokens[: k + 1]  # the stop token is included as the last token
    assert seq.logprobs == pytest.approx(run.logprobs[: k + 1], abs=1e-6)

    # several rows: every row either ends at its first stop token or runs to max_tokens
    stops = sorted(set(run.tokens[:4]))
    sampled = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=8, seed=7, stop=stops), num_samples=6)
    reasons = set()
    for s in sampled.sequences:
        reasons.add(s.stop_reason)
        assert not set(s.tokens[:-1]) & set(stops)
        if s.stop_reason == "stop":
            assert s.tokens[-1] in stops
        else:
            assert len(s.tokens) == 8 and s.tokens[-1] not in stops
    assert "stop" in reasons


def test_default_stop_is_eos(engine):
    """stop=None stops at the model's eos tokens (<|im_end|>, <|endoftext|>)."""
    eos = engine.eos_token_ids
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") == eos[0]
    # train a throwaway adapter to answer with eos right away
    engine.create_adapter("eos", LoraConfig(rank=4, seed=1), adam=AdamParams(learning_rate=5e-2))
    prompt = engine.tokenizer.encode("Say nothing:")
    datum = Datum.from_sequence(prompt + [eos[0]], [0.0] * len(prompt) + [1.0])  # learn only the eos
    try:
        for _ in range(3):
            engine.forward_backward("eos", [datum])
            engine.optim_step("eos")
        result = engine.sample("eos", prompt, SamplingParams(max_tokens=5, temperature=0))
        assert result.sequences[0].tokens == [eos[0]]
        assert result.sequences[0].stop_reason == "stop"
        # an explicit stop list replaces the default: eos is then an ordinary token
        other = engine.sample("eos", prompt, SamplingParams(max_tokens=3, temperature=0, stop=[eos[0] + 1]))
        assert other.sequences[0].tokens[0] == eos[0] and len(other.sequences[0].tokens) >= 2
        # stop=[] disables eos: generation goes on to max_tokens
        result = engine.sample("eos", prompt, SamplingParams(max_tokens=5, temperature=0, stop=[]))
        assert result.sequences[0].tokens[0] == eos[0]
        assert len(result.sequences[0].tokens) == 5
        assert result.sequences[0].stop_reason == "length"
    finally:
        engine.remove_adapter("eos")


def test_stop_strings(engine, prompt):
    decode = lambda toks: engine.tokenizer.decode(toks, skip_special_tokens=False)  # noqa: E731
    # one row with a fixed seed: a run with a stop condition is a prefix of the run without
    free = SamplingParams(max_tokens=16, seed=21, stop=[])
    run = engine.sample(ADAPTER, prompt, free).sequences[0]
    text = decode(run.tokens)
    # a 2-character stop string whose first occurrence starts inside the continuation's k-th token
    stop = None
    for k in range(2, len(run.tokens) - 1):
        at = len(decode(run.tokens[:k]))
        candidate = text[at:at + 2]
        if len(candidate) == 2 and "\ufffd" not in candidate and text.find(candidate) == at:
            stop = candidate
            break
    assert stop is not None, text
    end = next(j for j in range(len(run.tokens)) if stop in decode(run.tokens[: j + 1]))
    for spec in ([stop], stop):
        seq = engine.sample(ADAPTER, prompt, free.model_copy(update={"stop": spec})).sequences[0]
        assert seq.stop_reason == "stop"
        assert seq.tokens == run.tokens[: end + 1]  # the token completing the stop string is kept
        assert stop in decode(seq.tokens)

    # several stop strings, several rows stopping at different times
    stops = [" ", "\n"]
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=16, seed=11, stop=stops), num_samples=4)
    stopped = 0
    for seq in result.sequences:
        if seq.stop_reason == "stop":
            stopped += 1
            assert any(s in decode(seq.tokens) for s in stops)
            assert not any(s in decode(seq.tokens[:-1]) for s in stops)  # it stopped at the first occurrence
        else:
            assert len(seq.tokens) == 16 and not any(s in decode(seq.tokens) for s in stops)
    assert stopped >= 1


def test_stop_empty_list_reaches_max_tokens(engine, prompt):
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=9, seed=3, stop=[]), num_samples=3)
    for seq in result.sequences:
        assert len(seq.tokens) == 9
        assert seq.stop_reason == "length"


@pytest.mark.parametrize("n", [1, 2, 5])
def test_num_samples(engine, prompt, n):
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=4, seed=1), num_samples=n)
    assert len(result.sequences) == n
    assert result.prompt_logprobs is None and result.topk_prompt_logprobs is None


def test_include_prompt_logprobs(engine, prompt):
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=2, seed=1), include_prompt_logprobs=True)
    lp = result.prompt_logprobs
    assert len(lp) == len(prompt)
    assert lp[0] is None
    np.testing.assert_allclose(lp[1:], _forward_logprobs(engine, ADAPTER, prompt), rtol=0, atol=1e-4)
    # a one-token prompt has just the None
    single = engine.sample(ADAPTER, prompt[:1], SamplingParams(max_tokens=1), include_prompt_logprobs=True)
    assert single.prompt_logprobs == [None]


def test_topk_prompt_logprobs(engine, prompt):
    k = 5
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=1, seed=1), topk_prompt_logprobs=k)
    topk = result.topk_prompt_logprobs
    assert len(topk) == len(prompt)
    assert topk[0] is None
    dist = _full_logprobs(engine, ADAPTER, prompt[:-1])
    for position, entries in enumerate(topk[1:]):
        assert len(entries) == k
        tokens = [t for t, _ in entries]
        values = [v for _, v in entries]
        assert values == sorted(values, reverse=True)
        assert len(set(tokens)) == k
        expected = np.sort(dist[position])[::-1][:k]
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-4)
        np.testing.assert_allclose(values, dist[position][tokens], rtol=0, atol=1e-4)


def test_topk_sample_logprobs(engine, prompt):
    k = 4
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=5, temperature=0.7, seed=3), num_samples=2,
                           topk_sample_logprobs=k)
    for seq in result.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens)
        # position i of the sampled tokens is predicted from prompt + tokens[:i]
        dist = _full_logprobs(engine, ADAPTER, prompt + seq.tokens[:-1])[len(prompt) - 1:]
        for position, entries in enumerate(seq.topk_logprobs):
            tokens = [t for t, _ in entries]
            values = [v for _, v in entries]
            np.testing.assert_allclose(values, np.sort(dist[position])[::-1][:k], rtol=0, atol=1e-4)
            np.testing.assert_allclose(values, dist[position][tokens], rtol=0, atol=1e-4)
    plain = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=2, seed=3))
    assert plain.sequences[0].topk_logprobs is None


def test_sampler_compute_logprobs_local_mode(state_dir):
    from twinkle import Sampler, TrainingModel
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir)
    try:
        model = TrainingModel("twinkle-tiny", LoraConfig(rank=4, seed=2), optimizer=AdamParams(learning_rate=2e-2),
                              backend=backend)
        tok = model.get_tokenizer()
        tokens = tok.encode("User: What is 2 + 2?\nAssistant: 4.")
        for _ in range(3):
            model.forward_backward([Datum.from_sequence(tokens)])
            model.step()
        trained = model.sampler()
        base = Sampler("twinkle-tiny", backend=backend)

        got = trained.compute_logprobs(tokens).result()
        assert len(got) == len(tokens) and got[0] is None
        expected = model.forward([Datum.from_sequence(tokens)]).result().loss_outputs[0]["logprobs"]
        np.testing.assert_allclose(got[1:], expected, rtol=0, atol=1e-4)

        base_lp = base.compute_logprobs(tokens).result()
        assert base_lp[0] is None
        assert np.abs(np.asarray(base_lp[1:]) - expected).max() > 1e-2  # the base model differs

        # the same numbers through the prompt-scoring options of sample()
        targets = [[t, -1] for t in tokens[1:]]
        scored = trained.sample(tokens, SamplingParams(max_tokens=1, temperature=0.0),
                                target_prompt_logprobs=targets, prompt_alt_tokens_k=2).result()
        np.testing.assert_allclose([row[0] for row in scored.target_prompt_logprobs], expected, rtol=0, atol=1e-4)
        assert all(row[1] == 0.0 for row in scored.target_prompt_logprobs)
        assert len(scored.prompt_alt_tokens) == len(tokens) - 1 and all(len(r) == 2 for r in scored.prompt_alt_tokens)
    finally:
        backend.close()


def test_named_sampler_snapshot_has_current_weights(state_dir):
    """model.sampler(name) snapshots the weights at call time, also when the name was used before."""
    from twinkle import TrainingModel
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir)
    try:
        model = TrainingModel("twinkle-tiny", LoraConfig(rank=4, seed=3), optimizer=AdamParams(learning_rate=5e-2),
                              backend=backend)
        tokens = model.get_tokenizer().encode("User: What is 2 + 2?\nAssistant: 4.")
        data = [Datum.from_sequence(tokens)]
        before = model.sampler(name="latest").compute_logprobs(tokens).result()
        for _ in range(2):
            model.forward_backward(data)
            model.step()
        now = model.forward(data).result().loss_outputs[0]["logprobs"]
        assert np.abs(np.asarray(before[1:]) - now).max() > 1e-2  # training changed the model
        after = model.sampler(name="latest").compute_logprobs(tokens).result()
        np.testing.assert_allclose(after[1:], now, rtol=0, atol=1e-4)
    finally:
        backend.close()


def test_only_the_newest_unnamed_snapshots_are_kept(state_dir, monkeypatch):
    """One unnamed snapshot per RL step would fill the disk: older ones are deleted, named ones kept."""
    import twinkle.api.service as service
    from twinkle import TrainingModel
    from twinkle.api.local import LocalBackend
    from twinkle.errors import NotFoundError

    monkeypatch.setattr(service, "SNAPSHOTS_KEPT", 2)
    backend = LocalBackend(state_dir)
    try:
        model = TrainingModel("twinkle-tiny", LoraConfig(rank=4, seed=4), backend=backend)
        named = model.sampler(name="kept-by-name")
        samplers = [model.sampler() for _ in range(3)]
        folders = [Path(s.info.model_path) for s in samplers]
        assert not folders[0].exists() and folders[1].exists() and folders[2].exists()
        with pytest.raises(NotFoundError):
            samplers[0].compute_logprobs([5, 6, 7]).result()
        for sampler in (named, *samplers[1:]):
            assert len(sampler.compute_logprobs([5, 6, 7]).result()) == 3
    finally:
        backend.close()
