"""End-to-end training through the unmodified Tinker SDK (0.38) against a real `twinkle serve`.

Every test drives the server through `tinker.ServiceClient` and the clients it creates, the way a
Tinker user would (one test also lowers the SDK's `fwdbwd_max_chunk_len` on its own client, as a
server's client/config reply could, to force chunked, out-of-order submission). The assertions check
the *numbers* the server computes (loss math, logprobs, checkpoint round trips), not just that calls
succeed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
torch = pytest.importorskip("torch")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # per test, including a first-use server start

BASE = "twinkle-tiny"
RANK = 8

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold, and not all who wander are lost.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
]


# ------------------------------------------------------------------ helpers
def new_training_client(service_client, seed: int, rank: int = RANK):
    return service_client.create_lora_training_client(base_model=BASE, rank=rank, seed=seed).result()


def sft_datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """Next-token prediction on `tokens`; `weights` (one per target) default to 1."""
    tokens = [int(t) for t in tokens]
    weights = [1.0] * (len(tokens) - 1) if weights is None else [float(w) for w in weights]
    assert len(weights) == len(tokens) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def rl_datum(tokens: list[int], q: np.ndarray, advantages: np.ndarray, **extra) -> types.Datum:
    inputs = {"target_tokens": [int(t) for t in tokens[1:]],
              "logprobs": np.asarray(q, dtype=np.float32),
              "advantages": np.asarray(advantages, dtype=np.float32)}
    inputs.update({k: np.asarray(v, dtype=np.float32) for k, v in extra.items()})
    return types.Datum(model_input=types.ModelInput.from_ints([int(t) for t in tokens[:-1]]), loss_fn_inputs=inputs)


def logprobs_of(output) -> list[np.ndarray]:
    """Per-datum logprobs of a ForwardBackwardOutput as float64 numpy arrays."""
    return [np.asarray(item["logprobs"].to_numpy(), dtype=np.float64) for item in output.loss_fn_outputs]


def loss_sum(output) -> float:
    return float(output.metrics["loss:sum"])


def train_step(client, data, lr: float = 1e-2, loss_fn: str = "cross_entropy") -> float:
    """One pipelined step: submit forward_backward and optim_step, then wait for both."""
    fb = client.forward_backward(data, loss_fn)
    opt = client.optim_step(types.AdamParams(learning_rate=lr))
    out = fb.result()
    opt.result()
    return loss_sum(out)


def close(a: float, b: float, rel: float = 1e-6, abs_: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(10, 2000, size=n).tolist()


@pytest.fixture(scope="module")
def tokenizer(service):
    """The tokenizer the SDK loads from get_info's tokenizer_id (a folder this machine shares)."""
    client = new_training_client(service, seed=0)
    return client.get_tokenizer()


@pytest.fixture
def sft_batch(tokenizer):
    return [sft_datum(tokenizer.encode(s)) for s in SENTENCES]


# -------------------------------------------------------------------- tests
def test_sft_loss_falls(service, tokenizer, sft_batch):
    client = new_training_client(service, seed=1)
    assert client.get_info().model_data.model_name == BASE
    assert len(tokenizer.encode("hello world")) > 0
    losses = [train_step(client, sft_batch, lr=3e-3) for _ in range(15)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_state_resume_is_exact(service, sft_batch):
    n_steps, k = 6, 3
    run_a = new_training_client(service, seed=11)
    losses_a, path = [], None
    for step in range(n_steps):
        if step == k:  # after k optimizer steps
            path = run_a.save_state(f"resume-{k}").result().path
        losses_a.append(train_step(run_a, sft_batch))
    assert path is not None and path.startswith("tinker://") and path.endswith(f"/weights/resume-{k}")
    assert len(set(losses_a)) == n_steps, losses_a  # training actually moves

    # Weights and optimizer state: continues exactly like the uninterrupted run.
    run_b = service.create_training_client_from_state_with_optimizer(path).result()
    losses_b = [train_step(run_b, sft_batch) for _ in range(k, n_steps)]
    for got, want in zip(losses_b, losses_a[k:]):
        assert close(got, want, rel=1e-6), (losses_b, losses_a[k:])

    # Weights only: the same weights (forward loss equals run A's loss at step k)...
    run_c = service.create_training_client_from_state(path).result()
    assert close(loss_sum(run_c.forward(sft_batch, "cross_entropy").result()), losses_a[k], rel=1e-6)
    # ...but a fresh optimizer, so the next step differs from the uninterrupted run.
    assert close(train_step(run_c, sft_batch), losses_a[k], rel=1e-6)
    after_c = loss_sum(run_c.forward(sft_batch, "cross_entropy").result())
    assert not close(after_c, losses_a[k + 1], rel=1e-4), (after_c, losses_a[k + 1])
    # and a second weights-only resume takes that same fresh-optimizer step
    run_d = service.create_training_client_from_state(path).result()
    train_step(run_d, sft_batch)
    assert close(loss_sum(run_d.forward(sft_batch, "cross_entropy").result()), after_c, rel=1e-6)


@pytest.fixture(scope="module")
def memorised(service, tokenizer):
    """A training client that has memorised one continuation, and its sampling client."""
    prompt = tokenizer.encode("Q: What is the secret phrase?\nA:")
    answer = tokenizer.encode(" purple elephants dance")
    tokens = prompt + answer
    datum = sft_datum(tokens, [0.0] * (len(prompt) - 1) + [1.0] * len(answer))
    client = new_training_client(service, seed=5)
    # lr 2e-3 memorises in 37-43 steps for every seed tried (0-5); 5e-3 oscillated (21 to over 150)
    adam = types.AdamParams(learning_rate=2e-3, beta2=0.999, eps=1e-8)
    worst = []  # the lowest logprob of an answer token: above log(1/2) means greedy decoding gives it
    for _ in range(100):
        fb = client.forward_backward([datum], "cross_entropy")
        opt = client.optim_step(adam)
        worst.append(float(logprobs_of(fb.result())[0][-len(answer):].min()))
        opt.result()
        if worst[-1] > -0.4:
            now = logprobs_of(client.forward([datum], "cross_entropy").result())[0][-len(answer):]
            if now.min() > -0.5:
                break
    else:
        pytest.fail(f"the datum was not memorised in 100 steps: {worst}")
    sampler = client.save_weights_and_get_sampling_client().result()
    return client, sampler, prompt, answer


def test_sampler_reflects_trained_adapter(service, memorised):
    _, sampler, prompt, answer = memorised
    greedy = types.SamplingParams(max_tokens=len(answer), temperature=0.0)
    out = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=greedy).result()
    assert list(out.sequences[0].tokens) == answer

    base = service.create_sampling_client(base_model=BASE).result()
    base_out = base.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=greedy).result()
    assert len(base_out.sequences) == 1
    assert list(base_out.sequences[0].tokens) != answer


def test_compute_logprobs_and_sample_logprobs_match_forward(memorised):
    client, sampler, prompt, answer = memorised
    seq = prompt + answer
    prompt_lps = sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    assert len(prompt_lps) == len(seq) and prompt_lps[0] is None
    fwd = logprobs_of(client.forward([sft_datum(seq)], "cross_entropy").result())[0]
    np.testing.assert_allclose(np.asarray(prompt_lps[1:], dtype=np.float64), fwd, atol=1e-4, rtol=0)

    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    out = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=3, sampling_params=params).result()
    assert len(out.sequences) == 3
    data, sampled = [], []
    for sequence in out.sequences:
        tokens = list(sequence.tokens)
        assert tokens and sequence.logprobs is not None and len(sequence.logprobs) == len(tokens)
        data.append(sft_datum(prompt + tokens))
        sampled.append(np.asarray(sequence.logprobs, dtype=np.float64))
    for lps, fwd in zip(sampled, logprobs_of(client.forward(data, "cross_entropy").result())):
        np.testing.assert_allclose(lps, fwd[-len(lps):], atol=1e-4, rtol=0)


def test_topk_sample_logprobs_rank_the_model_distribution(memorised):
    client, sampler, prompt, _ = memorised
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    out = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=greedy,
                         topk_sample_logprobs=4).result()
    for sequence in out.sequences:
        topk = sequence.topk_logprobs
        assert topk is not None and len(topk) == len(sequence.tokens)
        for token, logprob, row in zip(sequence.tokens, sequence.logprobs, topk):
            assert len(row) == 4 and [lp for _, lp in row] == sorted((lp for _, lp in row), reverse=True)
            assert row[0][0] == token and row[0][1] == pytest.approx(logprob, abs=1e-5)  # greedy = top-1
    # and they are the trainer's numbers: the top-k of the first sampled position from forward
    first = out.sequences[0]
    fwd = logprobs_of(client.forward([sft_datum(prompt + [tok]) for tok, _ in first.topk_logprobs[0]],
                                     "cross_entropy").result())
    np.testing.assert_allclose([lps[-1] for lps in fwd], [lp for _, lp in first.topk_logprobs[0]], atol=1e-4)


def test_target_prompt_logprobs_and_alternative_tokens(memorised):
    _, sampler, prompt, answer = memorised
    seq = prompt + answer
    n = len(seq) - 1
    exact = np.asarray(sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()[1:], dtype=np.float64)
    targets = np.full((n, 2), -1, dtype=np.int64)
    targets[:, 0] = seq[1:]  # the actual next token: its logprob is compute_logprobs'
    targets[::2, 1] = 7  # another token at every second position
    greedy = types.SamplingParams(max_tokens=1, temperature=0.0)
    out = sampler.sample(types.ModelInput.from_ints(seq), num_samples=1, sampling_params=greedy,
                         topk_prompt_logprobs=1, target_prompt_logprobs=types.TensorData.from_numpy(targets),
                         prompt_alt_tokens_k=3).result()
    scored = out.target_prompt_logprobs.to_numpy().reshape(n, 2)
    np.testing.assert_allclose(scored[:, 0], exact, atol=1e-4)
    assert np.all(scored[1::2, 1] == 0.0) and np.all(scored[::2, 1] < 0)
    # greedy alternatives are the most likely token at every position, with its logprob
    alt_tokens = out.prompt_alt_tokens.tokens.to_numpy().reshape(n, 3)
    alt_logprobs = out.prompt_alt_tokens.logprobs.to_numpy().reshape(n, 3)
    top1 = out.topk_prompt_logprobs[1:]
    assert alt_tokens.tolist() == [[row[0][0]] * 3 for row in top1]
    np.testing.assert_allclose(alt_logprobs[:, 0], [row[0][1] for row in top1], atol=1e-5)
    # a sparse request: only the listed cells are scored
    sparse = types.TensorData(data=[seq[1], seq[2]], dtype="int64", shape=[n, 2],
                              sparse_crow_indices=[0, 1, 2] + [2] * (n - 2), sparse_col_indices=[0, 1])
    out = sampler.sample(types.ModelInput.from_ints(seq), num_samples=1, sampling_params=greedy,
                         target_prompt_logprobs=sparse).result()
    scored = out.target_prompt_logprobs.to_numpy().reshape(n, 2)
    np.testing.assert_allclose([scored[0, 0], scored[1, 1]], exact[:2], atol=1e-4)
    assert np.count_nonzero(scored) == 2


@pytest.fixture
def rl_setup(service):
    """A client, a few sequences, and the client's current (on-policy) logprobs of them."""
    client = new_training_client(service, seed=21)
    rng = np.random.default_rng(0)
    seqs = [random_tokens(rng, n) for n in (7, 11, 16)]
    lps = logprobs_of(client.forward([sft_datum(s) for s in seqs], "cross_entropy").result())
    advs = [rng.normal(0.0, 1.0, size=len(s) - 1) for s in seqs]
    return client, seqs, lps, advs, rng


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_on_policy_rl_loss_is_minus_sum_of_advantages(rl_setup, loss_fn):
    client, seqs, lps, advs, _ = rl_setup
    data = [rl_datum(s, q, a) for s, q, a in zip(seqs, lps, advs)]
    out = client.forward_backward(data, loss_fn).result()
    expected = -float(sum(a.astype(np.float32).astype(np.float64).sum() for a in advs))
    assert abs(loss_sum(out) - expected) < 1e-3, (loss_sum(out), expected)
    for got, want in zip(logprobs_of(out), lps):  # forward_backward reports the same logprobs
        np.testing.assert_allclose(got, want, atol=1e-5)


def _ppo_terms(lp, q, adv, low, high):
    ratio = np.exp(lp - q)
    return np.minimum(ratio * adv, np.clip(ratio, low, high) * adv)


def test_other_losses_with_config_and_per_datum_clips(rl_setup):
    client, seqs, lps, advs, rng = rl_setup
    # off-policy: the sampler's q differs, so ratios spread over ~[0.5, 1.8] and clipping matters
    deltas = [rng.uniform(-0.6, 0.7, size=len(lp)) for lp in lps]
    qs = [(lp + d).astype(np.float32).astype(np.float64) for lp, d in zip(lps, deltas)]
    advs = [a.astype(np.float32).astype(np.float64) for a in advs]
    data = [rl_datum(s, q, a) for s, q, a in zip(seqs, qs, advs)]

    def run(loss_fn, config=None, batch=data):
        out = client.forward_backward(batch, loss_fn, config).result()
        assert out.loss_fn_outputs and "logprobs" in out.loss_fn_outputs[0]
        return loss_sum(out)

    # ppo: config thresholds change the clipping exactly as the formula says
    for low, high in ((0.8, 1.2), (0.5, 2.0)):
        want = -sum(_ppo_terms(lp, q, a, low, high).sum() for lp, q, a in zip(lps, qs, advs))
        got = run("ppo", {"clip_low_threshold": low, "clip_high_threshold": high})
        assert close(got, want, rel=1e-3, abs_=1e-3), ("ppo", low, high, got, want)
    assert not close(run("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
                     run("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}), rel=1e-3)

    # cispo: -sum(sg(clip(r)) * logp * A)
    low, high = 0.9, 1.1
    want = -sum((np.clip(np.exp(lp - q), low, high) * lp * a).sum() for lp, q, a in zip(lps, qs, advs))
    got = run("cispo", {"clip_low_threshold": low, "clip_high_threshold": high})
    assert close(got, want, rel=1e-3, abs_=1e-3), ("cispo", got, want)

    # dro: -sum(logp*A - beta/2 (logp - q)^2)
    for beta in (0.05, 1.0):
        want = -sum((lp * a - 0.5 * beta * (lp - q) ** 2).sum() for lp, q, a in zip(lps, qs, advs))
        got = run("dro", {"beta": beta})
        assert close(got, want, rel=1e-3, abs_=1e-3), ("dro", beta, got, want)

    # gspo: every token carries its sequence's geometric-mean ratio, PPO-clipped
    low, high = 0.95, 1.05
    want = 0.0
    for lp, q, a in zip(lps, qs, advs):
        mask = (a != 0).astype(np.float64)
        seq_ratio = math.exp(((lp - q) * mask).sum() / mask.sum())
        want -= (np.minimum(seq_ratio * a, np.clip(seq_ratio, low, high) * a) * mask).sum()
    got = run("gspo", {"clip_low_threshold": low, "clip_high_threshold": high})
    assert close(got, want, rel=1e-3, abs_=1e-3), ("gspo", got, want)

    # per-datum clip thresholds in loss_fn_inputs override the config, datum by datum
    clips = [(0.9, 1.1), (0.5, 3.0), (0.99, 1.01)]
    per_datum = [rl_datum(s, q, a, clip_low_threshold=np.full(len(a), lo), clip_high_threshold=np.full(len(a), hi))
                 for s, q, a, (lo, hi) in zip(seqs, qs, advs, clips)]
    want = -sum(_ppo_terms(lp, q, a, lo, hi).sum() for lp, q, a, (lo, hi) in zip(lps, qs, advs, clips))
    got = run("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, batch=per_datum)
    assert close(got, want, rel=1e-3, abs_=1e-3), ("ppo per-datum clips", got, want)


def test_cross_entropy_with_top_k_targets(rl_setup):
    """(N, K) target_tokens with (N, K) real-valued weights: -sum_ik w_ik log p(t_ik) (distillation)."""
    client, seqs, _, _, rng = rl_setup
    tokens, k = seqs[1], 3
    n = len(tokens) - 1
    targets = np.stack([np.asarray(tokens[1:])] + [rng.integers(10, 2000, size=n) for _ in range(k - 1)], axis=1)
    weights = rng.uniform(-0.5, 1.0, size=(n, k)).astype(np.float32)
    model_input = types.ModelInput.from_ints(tokens[:-1])
    topk = types.Datum(model_input=model_input, loss_fn_inputs={
        "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
        "weights": types.TensorData.from_numpy(weights)})
    columns = [types.Datum(model_input=model_input, loss_fn_inputs={
        "target_tokens": targets[:, j].astype(np.int64).tolist(), "weights": [1.0] * n}) for j in range(k)]
    out = client.forward_backward([topk], "cross_entropy").result()
    per_column = np.stack(logprobs_of(client.forward(columns, "cross_entropy").result()), axis=1)
    got = np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
    assert got.shape == (n, k)
    np.testing.assert_allclose(got, per_column, atol=1e-5)
    want = -float((weights.astype(np.float64) * per_column).sum())
    assert close(loss_sum(out), want, rel=1e-4, abs_=1e-4), (loss_sum(out), want)


def test_forward_backward_custom_dpo_margin_rises(service, tokenizer):
    prompt = tokenizer.encode("Which is better, tea or coffee? Answer:")
    pairs = [(" tea, always tea.", " coffee, sadly."), (" green tea with honey.", " burnt coffee.")]
    data = []
    for chosen, rejected in pairs:
        for text in (chosen, rejected):
            answer = tokenizer.encode(text)
            data.append(sft_datum(prompt + answer, [0.0] * (len(prompt) - 1) + [1.0] * len(answer)))
    weights = [torch.tensor(d.loss_fn_inputs["weights"].data, dtype=torch.float32) for d in data]

    client = new_training_client(service, seed=31)
    # the reference policy: a frozen copy of the starting weights, evaluated before any training
    ref = [torch.tensor(x, dtype=torch.float32) for x in logprobs_of(client.forward(data, "cross_entropy").result())]
    beta = 0.5
    margins: list[float] = []

    def dpo_loss(batch, logprobs_list):
        rewards = [(w * (lp - r)).sum() for w, lp, r in zip(weights, logprobs_list, ref)]
        margin = torch.stack([rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)])
        margins.append(float(margin.detach().mean()))
        loss = -torch.nn.functional.logsigmoid(beta * margin).sum()
        return loss, {"dpo_margin:mean": margins[-1]}

    losses = []
    for _ in range(5):
        fb = client.forward_backward_custom(data, dpo_loss)
        opt = client.optim_step(types.AdamParams(learning_rate=2e-2))
        out = fb.result()
        opt.result()
        losses.append(out.metrics["loss:sum"])
        assert "dpo_margin:mean" in out.metrics
        assert len(out.loss_fn_outputs) == len(data)
    assert abs(margins[0]) < 1e-3, margins  # starts at the reference
    assert margins[-1] > margins[0] + 0.5, margins
    assert losses[-1] < losses[0], losses


def test_large_batch_equals_sum_of_single_forwards(service):
    rng = np.random.default_rng(7)
    data = [sft_datum(random_tokens(rng, int(rng.integers(4, 24)))) for _ in range(30)]
    client = new_training_client(service, seed=41)
    batch = client.forward(data, "cross_entropy").result()
    singles = [client.forward([d], "cross_entropy") for d in data]  # all in flight at once
    singles = [f.result() for f in singles]
    assert close(loss_sum(batch), sum(loss_sum(s) for s in singles), rel=1e-5)
    assert len(batch.loss_fn_outputs) == len(data)
    for got, single in zip(logprobs_of(batch), singles):
        np.testing.assert_allclose(got, logprobs_of(single)[0], atol=1e-5)


def test_sdk_chunked_batch_arrives_out_of_order(tinker_client):
    """With a small fwdbwd_max_chunk_len the SDK splits a batch into chunks and sends the first chunk
    last; the server must still run them in seq order, accumulate all chunks' gradients into one step
    and return per-datum outputs in order."""
    rng = np.random.default_rng(8)
    data = [sft_datum(random_tokens(rng, int(rng.integers(4, 24)))) for _ in range(30)]
    chunked_service = tinker_client("alice")
    chunked = new_training_client(chunked_service, seed=51)
    holder = chunked.holder
    if not hasattr(holder, "_client_config"):
        pytest.skip("this SDK keeps its client config elsewhere")
    # what a server's client/config reply of {"fwdbwd_max_chunk_len": 4} would do
    holder._client_config = holder._client_config.model_copy(update={"fwdbwd_max_chunk_len": 4})
    assert len(list(chunked._chunked_requests_generator(data))) == 8
    whole = new_training_client(tinker_client("alice"), seed=51)

    for _ in range(2):
        fb_c, fb_w = chunked.forward_backward(data, "cross_entropy"), whole.forward_backward(data, "cross_entropy")
        opt_c = chunked.optim_step(types.AdamParams(learning_rate=1e-2))
        opt_w = whole.optim_step(types.AdamParams(learning_rate=1e-2))
        out_c, out_w = fb_c.result(), fb_w.result()
        opt_c.result(), opt_w.result()
        assert close(loss_sum(out_c), loss_sum(out_w), rel=1e-5), (loss_sum(out_c), loss_sum(out_w))
        assert len(out_c.loss_fn_outputs) == len(data)
        for got, want in zip(logprobs_of(out_c), logprobs_of(out_w)):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_snapshot_sampling_clients_stay_usable(service):
    """A snapshot SamplingClient keeps sampling its own weights after later snapshots of the same model
    (an RL loop that samples a few steps off-policy keeps old clients around)."""
    client = new_training_client(service, seed=61)
    data = [sft_datum([4, 5, 6, 7, 8, 9, 10, 11])]
    probe = types.ModelInput.from_ints([4, 5, 6, 7, 8, 9])
    first = client.save_weights_and_get_sampling_client().result()
    before = first.compute_logprobs(probe).result()
    for _ in range(10):
        train_step(client, data, lr=1e-2)
        later = client.save_weights_and_get_sampling_client().result()
        later.compute_logprobs(probe).result()  # loads each newer snapshot on the sampler
    assert later.compute_logprobs(probe).result() != before  # the model did change
    assert first.compute_logprobs(probe).result() == before


def test_finishing_a_session_deletes_its_temporary_snapshots(server, tokenizer):
    """Unnamed sampler snapshots (one per RL step) go with their session; named ones stay."""
    svc = tinker.ServiceClient(base_url=server.url, api_key=server.keys["alice"])
    client = new_training_client(svc, seed=3)
    train_step(client, [sft_datum(tokenizer.encode(SENTENCES[0]))])
    first = client.save_weights_and_get_sampling_client().result()
    train_step(client, [sft_datum(tokenizer.encode(SENTENCES[1]))])
    client.save_weights_and_get_sampling_client().result()
    client.save_weights_for_sampler("kept-after-finish").result()
    (named,) = list(server.state_dir.rglob("sampler_weights/kept-after-finish"))
    snapshots = sorted(named.parent.glob("snapshot-step*"))
    assert len(snapshots) == 2
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    assert first.sample(types.ModelInput.from_ints(tokenizer.encode("The")), 1, params).result().sequences

    svc.close("success").result(timeout=30)
    assert not any(path.exists() for path in snapshots)
    assert (named / "adapter_model.safetensors").exists()
