"""Every named loss (and a custom callable) against an independent, token-by-token reference.

For each loss the engine's accumulated adapter gradients, its per-datum `logprobs` and its
`loss:sum` are compared with a reference written here from the math of the Tinker protocol
(section 11) and the loss docstrings: the peft model is run on each datum separately (no
padding), full log_softmax, gather, the formula written out per token, backward. Nothing from
`twinkle.losses.functions` is used by the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinkle.losses.specs import LOSS_SPECS
from twinkle.types import Datum, LoraConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ADAPTER = "a"
# Gradients are compared with rtol 1e-4 and an absolute tolerance of 1e-5 per unit of the largest
# gradient entry: the engine pads the batch (the reference runs each datum alone), and attention over
# padded rows rounds differently in float32 — measured up to 3e-6 of the largest entry (gradients of
# a summed loss over ~30 tokens reach ~30). A wrong term or adapter is off by the order of the scale.
RTOL, ATOL = 1e-4, 1e-5
LENGTHS = (9, 5, 13, 7)  # different lengths in one batch: the engine pads


# ---------------------------------------------------------------------------------- helpers
def _engine(make_engine, **overrides):
    """A fresh engine with one rank-4 adapter whose LoRA weights are pushed away from zero."""
    engine = make_engine(**overrides)
    engine.create_adapter(ADAPTER, LoraConfig(rank=4, seed=1234))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in engine.params(ADAPTER):
            if "lora_B" in name:  # B starts at zero: without this the adapter is a no-op
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return engine


def _params(engine):
    return [p for _, p in engine.params(ADAPTER)]


def _zero_grads(engine):
    engine.zero_grads(ADAPTER)


def _grads(engine):
    return [g if g is not None else torch.zeros_like(p) for g, (_, p) in zip(engine.grads(ADAPTER).values(),
                                                                              engine.params(ADAPTER))]


def _tokens(rng, n, vocab):
    return rng.integers(4, vocab, size=n).astype(np.int64)


def _datum(input_tokens, **inputs):
    return Datum(input_tokens=np.asarray(input_tokens, dtype=np.int64),
                 loss_inputs={k: np.asarray(v) for k, v in inputs.items()})


def _base_data(engine, rng, lengths=LENGTHS):
    return [_datum(_tokens(rng, n, engine.vocab_size), target_tokens=_tokens(rng, n, engine.vocab_size))
            for n in lengths]


def _current_logprobs(engine, data):
    """The adapter's current target logprobs, through the engine's forward (cross_entropy)."""
    plain = [_datum(d.input_tokens, target_tokens=d.loss_inputs["target_tokens"]) for d in data]
    return [out["logprobs"].astype(np.float64) for out in engine.forward(ADAPTER, plain).loss_outputs]


def _with(data, per_datum):
    """Copy of data with extra loss inputs per datum (a list of dicts)."""
    out = []
    for d, extra in zip(data, per_datum):
        inputs = dict(d.loss_inputs)
        inputs.update({k: np.asarray(v, dtype=np.float32) for k, v in extra.items()})
        out.append(Datum(input_tokens=d.input_tokens, loss_inputs=inputs))
    return out


def _rl_data(engine, rng, noise=0.35, lengths=LENGTHS, zero_frac=0.2):
    """Datums with sampler logprobs q = current + noise (so ratios leave [0.8, 1.2]) and mixed-sign advantages."""
    data = _base_data(engine, rng, lengths)
    current = _current_logprobs(engine, data)
    extras = []
    for lp in current:
        n = lp.shape[0]
        q = lp + rng.normal(0.0, noise, size=n)
        adv = rng.normal(0.0, 1.0, size=n)
        adv[rng.random(n) < zero_frac] = 0.0
        adv[0], adv[1] = 1.5, -1.5  # both signs in every datum
        extras.append({"logprobs": q, "advantages": adv})
    return _with(data, extras)


def _engine_run(engine, data, loss, config=None):
    """(a): the engine's forward_backward; returns its result and the accumulated gradients."""
    _zero_grads(engine)
    result = engine.forward_backward(ADAPTER, data, loss, config)
    grads = _grads(engine)
    _zero_grads(engine)
    return result, grads


def _peft_reference(engine):
    """The adapter as plain peft would run it: saved to a PEFT folder, loaded on a fresh base model.

    Returns the model and its LoRA parameters in the engine's order (by PEFT name)."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        engine.save(ADAPTER, folder + "/ref", with_optimizer=False)
        base = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, folder + "/ref", is_trainable=True).eval()
    params = {name.replace(".default.", "."): p for name, p in model.named_parameters() if "lora_" in name}
    return model, [params[name] for name, _ in engine.params(ADAPTER)]


def _reference_run(engine, data, loss_formula):
    """(b): each datum alone through a peft model of the adapter, full log_softmax, gather,
    `loss_formula(logprobs, data)` written per token, backward."""
    model, params = _peft_reference(engine)
    logprobs = []
    for d in data:
        ids = torch.as_tensor(np.asarray(d.input_tokens), dtype=torch.long)[None, :]
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.as_tensor(np.asarray(d.loss_inputs["target_tokens"]), dtype=torch.long)
        if targets.ndim == 1:
            logprobs.append(logp[torch.arange(len(targets)), targets])
        else:
            rows = torch.arange(targets.shape[0])[:, None].expand_as(targets)
            logprobs.append(logp[rows, targets])
    loss = loss_formula(logprobs, data)
    loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return float(loss.detach()), grads, [lp.detach() for lp in logprobs]


def _assert_matches(result, engine_grads, ref_loss, ref_grads, ref_logprobs):
    assert len(result.loss_outputs) == len(ref_logprobs)
    for out, ref in zip(result.loss_outputs, ref_logprobs):
        torch.testing.assert_close(torch.as_tensor(out["logprobs"]), ref, rtol=RTOL, atol=1e-5)
    assert result.metrics["loss:sum"] == pytest.approx(ref_loss, rel=RTOL, abs=1e-4)
    _assert_grads_close(engine_grads, ref_grads)


def _assert_grads_close(got_grads, want_grads):
    scale = max(float(g.abs().max()) for g in want_grads)
    assert scale > 0, "reference gradient is identically zero"
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * max(1.0, scale))


def _check(engine, data, loss, formula, config=None):
    result, grads = _engine_run(engine, data, loss, config)
    ref_loss, ref_grads, ref_lps = _reference_run(engine, data, formula)
    _assert_matches(result, grads, ref_loss, ref_grads, ref_lps)
    return result, ref_loss


def _arr(d, key):
    return np.asarray(d.loss_inputs[key], dtype=np.float64)


def _const(x):
    return torch.tensor(float(x), dtype=torch.float32)


def _clip(r, lo, hi):
    """clip(r, lo, hi) with the gradient of r inside the interval and none outside."""
    v = float(r.detach())
    return _const(lo) if v < lo else _const(hi) if v > hi else r


def _min(a, b):
    return a if float(a.detach()) <= float(b.detach()) else b


def _sum(terms):
    return torch.stack([t.reshape(()) for t in terms]).sum()


class _Clips:
    """Counts tokens whose clipped branch is the one the min() picks."""

    def __init__(self):
        self.active = 0
        self.total = 0

    def ppo_term(self, r, adv, lo, hi):
        unclipped, clipped = r * adv, _clip(r, lo, hi) * adv
        chosen = _min(unclipped, clipped)
        self.total += 1
        if adv != 0 and chosen is clipped and float(clipped.detach()) < float(unclipped.detach()):
            self.active += 1
        return chosen


def test_every_named_loss_is_covered_here():
    covered = {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "dpo", "grpo"}
    assert set(LOSS_SPECS) == covered


# ----------------------------------------------------------------------------- cross entropy
def _ce_formula(logprobs, data):
    terms = []
    for lp, d in zip(logprobs, data):
        w = _arr(d, "weights") if "weights" in d.loss_inputs else np.ones(tuple(lp.shape))
        if lp.ndim == 1:
            for i in range(lp.shape[0]):
                terms.append(-w[i] * lp[i])
        else:
            for i in range(lp.shape[0]):
                for k in range(lp.shape[1]):
                    terms.append(-w[i, k] * lp[i, k])
    return _sum(terms)


def test_cross_entropy_real_and_negative_weights(make_engine):
    engine = _engine(make_engine)
    rng = np.random.default_rng(0)
    data = _base_data(engine, rng)
    weights = [rng.normal(0.0, 1.5, size=n) for n in LENGTHS[:-1]]
    assert any((w < 0).any() for w in weights)
    weights[0][2] = 0.0
    # the last datum has no weights: they default to 1
    data = _with(data, [{"weights": w} for w in weights] + [{}])
    _check(engine, data, "cross_entropy", _ce_formula)


def test_cross_entropy_topk_targets_and_weights(make_engine):
    engine = _engine(make_engine)
    rng = np.random.default_rng(1)
    vocab = engine.vocab_size
    data = []
    for n, k in ((6, 3), (11, 2)):
        targets = rng.integers(4, vocab, size=(n, k)).astype(np.int64)
        weights = rng.normal(0.3, 0.7, size=(n, k)).astype(np.float32)  # soft targets, some negative
        data.append(_datum(_tokens(rng, n, vocab), target_tokens=targets, weights=weights))
    # top-K without weights (default 1 for every target) and a plain 1-D datum in the same batch
    data.append(_datum(_tokens(rng, 4, vocab), target_tokens=rng.integers(4, vocab, size=(4, 3))))
    data.append(_datum(_tokens(rng, 8, vocab), target_tokens=_tokens(rng, 8, vocab),
                       weights=rng.normal(0.0, 1.0, size=8).astype(np.float32)))
    result, _ = _check(engine, data, "cross_entropy", _ce_formula)
    assert result.loss_outputs[0]["logprobs"].shape == (6, 3)
    assert result.loss_outputs[2]["logprobs"].shape == (4, 3)
    assert result.loss_outputs[3]["logprobs"].shape == (8,)


# -------------------------------------------------------------------------- policy gradients
def _is_formula(logprobs, data):
    terms = []
    for lp, d in zip(logprobs, data):
        q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
        for i in range(lp.shape[0]):
            r = torch.exp(lp[i] - q[i])
            terms.append(-r * adv[i])
    return _sum(terms)


def test_importance_sampling(make_engine):
    engine = _engine(make_engine)
    data = _rl_data(engine, np.random.default_rng(2))
    _check(engine, data, "importance_sampling", _is_formula)


def _thresholds(d, config, i):
    lo = _arr(d, "clip_low_threshold")[i] if "clip_low_threshold" in d.loss_inputs else config["clip_low_threshold"]
    hi = _arr(d, "clip_high_threshold")[i] if "clip_high_threshold" in d.loss_inputs else config["clip_high_threshold"]
    return float(lo), float(hi)


def _ppo_formula(config, clips):
    def formula(logprobs, data):
        terms = []
        for lp, d in zip(logprobs, data):
            q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
            for i in range(lp.shape[0]):
                lo, hi = _thresholds(d, config, i)
                r = torch.exp(lp[i] - q[i])
                terms.append(-clips.ppo_term(r, float(adv[i]), lo, hi))
        return _sum(terms)
    return formula


DEFAULT_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@pytest.mark.parametrize("config", [None, {"clip_low_threshold": 0.7, "clip_high_threshold": 1.1}],
                         ids=["default-clip", "config-clip"])
def test_ppo(make_engine, config):
    engine = _engine(make_engine)
    data = _rl_data(engine, np.random.default_rng(3))
    clips = _Clips()
    _check(engine, data, "ppo", _ppo_formula({**DEFAULT_CLIP, **(config or {})}, clips), config)
    assert 0 < clips.active < clips.total, "clipping must be active for some tokens and not all"


def _cispo_formula(config, clips):
    def formula(logprobs, data):
        terms = []
        for lp, d in zip(logprobs, data):
            q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
            for i in range(lp.shape[0]):
                lo, hi = _thresholds(d, config, i)
                r = math.exp(float(lp[i].detach()) - q[i])  # stop-gradient ratio
                weight = min(max(r, lo), hi)
                clips.total += 1
                clips.active += int(adv[i] != 0 and (r < lo or r > hi))
                terms.append(-weight * lp[i] * adv[i])
        return _sum(terms)
    return formula


def test_cispo(make_engine):
    engine = _engine(make_engine)
    data = _rl_data(engine, np.random.default_rng(4))
    clips = _Clips()
    _check(engine, data, "cispo", _cispo_formula(DEFAULT_CLIP, clips))
    assert 0 < clips.active < clips.total


@pytest.mark.parametrize("config", [None, {"beta": 0.3}], ids=["default-beta", "beta-0.3"])
def test_dro(make_engine, config):
    beta = (config or {}).get("beta", 0.05)

    def formula(logprobs, data):
        terms = []
        for lp, d in zip(logprobs, data):
            q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
            for i in range(lp.shape[0]):
                terms.append(-(lp[i] * adv[i] - 0.5 * beta * (lp[i] - q[i]) ** 2))
        return _sum(terms)

    engine = _engine(make_engine)
    data = _rl_data(engine, np.random.default_rng(5))
    _check(engine, data, "dro", formula, config)


def _gspo_formula(config, clips, seq_ratios):
    """GSPO-token: the sequence ratio exp(mean over the masked tokens of (log p - log q)) is the value
    of every token's ratio, each token's own log p carries the gradient, and the clipped PPO
    objective is summed over all tokens (Tinker docs: L = -sum_t min(s_t A_t, clip(s_t) A_t))."""
    def formula(logprobs, data):
        terms = []
        for lp, d in zip(logprobs, data):
            q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
            if "sequence_ratio_mask" in d.loss_inputs:
                in_ratio = _arr(d, "sequence_ratio_mask") != 0
            else:
                in_ratio = adv != 0
            idx = [i for i in range(lp.shape[0]) if in_ratio[i]]
            log_s = sum(float(lp[i].detach()) - q[i] for i in idx) / len(idx)
            seq_ratios.append(math.exp(log_s))
            for i in range(lp.shape[0]):
                lo, hi = _thresholds(d, config, i)
                s_t = math.exp(log_s) * torch.exp(lp[i] - lp[i].detach())
                terms.append(-clips.ppo_term(s_t, float(adv[i]), lo, hi))
        return _sum(terms)
    return formula


def _gspo_data(engine, rng):
    data = _rl_data(engine, rng, noise=0.1)
    # shift q per sequence so the sequence ratios land below, inside and above [0.8, 1.2]
    shifts = (0.5, 0.0, -0.5, 0.35)
    extras = [{"logprobs": _arr(d, "logprobs") + s} for d, s in zip(data, shifts)]
    return _with(data, extras)


def test_gspo_without_mask(make_engine):
    engine = _engine(make_engine)
    data = _gspo_data(engine, np.random.default_rng(6))
    clips, ratios = _Clips(), []
    _check(engine, data, "gspo", _gspo_formula(DEFAULT_CLIP, clips, ratios))
    assert 0 < clips.active < clips.total
    assert min(ratios) < 0.8 and max(ratios) > 1.2 and any(0.8 <= r <= 1.2 for r in ratios)


def test_gspo_mask_covering_zero_advantage_tokens(make_engine):
    """sequence_ratio_mask decides which tokens form the sequence ratio; here it also includes tokens
    with zero advantage, so it changes the ratio (and the clipping) versus the default mask."""
    engine = _engine(make_engine)
    data = _gspo_data(engine, np.random.default_rng(7))
    masks = []
    for d in data:
        adv = _arr(d, "advantages")
        mask = (adv != 0).astype(np.float32)
        zero = np.flatnonzero(adv == 0)
        mask[zero[: max(1, len(zero) // 2 + 1)] if len(zero) else []] = 1.0
        masks.append(mask)
    assert any(((_arr(d, "advantages") != 0) != (m != 0)).any() for d, m in zip(data, masks))
    data = _with(data, [{"sequence_ratio_mask": m} for m in masks])
    clips, ratios = _Clips(), []
    _check(engine, data, "gspo", _gspo_formula(DEFAULT_CLIP, clips, ratios))
    assert 0 < clips.active < clips.total


def test_gspo_mask_excluding_advantage_tokens_still_trains_them(make_engine):
    """Tokens left out of sequence_ratio_mask are left out of the ratio's mean only: they still carry
    the sequence ratio and their advantage term (Tinker: the objective sums over all tokens)."""
    engine = _engine(make_engine)
    data = _gspo_data(engine, np.random.default_rng(8))
    masks = []
    for d in data:
        mask = np.ones(len(d.input_tokens), dtype=np.float32)
        mask[:2] = 0.0  # advantages there are +1.5 and -1.5
        masks.append(mask)
    data = _with(data, [{"sequence_ratio_mask": m} for m in masks])
    clips, ratios = _Clips(), []
    _check(engine, data, "gspo", _gspo_formula(DEFAULT_CLIP, clips, ratios))
    assert 0 < clips.active < clips.total


# ---------------------------------------------------------------------------------------- dpo
@pytest.mark.parametrize("config", [None, {"beta": 0.5}], ids=["default-beta", "beta-0.5"])
def test_dpo(make_engine, config):
    beta = (config or {}).get("beta", 0.1)
    engine = _engine(make_engine)
    rng = np.random.default_rng(9)
    data = _base_data(engine, rng, lengths=(9, 5, 13, 7, 6, 6))
    current = _current_logprobs(engine, data)
    extras = []
    for j, lp in enumerate(current):
        extra = {"ref_logprobs": lp + rng.normal(0.0, 0.5, size=lp.shape[0])}
        if j in (1, 2):  # real-valued weights on some sequences, e.g. a completion mask
            w = rng.uniform(0.0, 1.5, size=lp.shape[0])
            w[0] = 0.0
            extra["weights"] = w
        extras.append(extra)
    data = _with(data, extras)

    def formula(logprobs, data):
        rewards = []
        for lp, d in zip(logprobs, data):
            ref = _arr(d, "ref_logprobs")
            w = _arr(d, "weights") if "weights" in d.loss_inputs else np.ones(lp.shape[0])
            rewards.append(_sum([w[i] * (lp[i] - ref[i]) for i in range(lp.shape[0])]))
        terms = []
        for c in range(0, len(rewards), 2):
            margin = rewards[c] - rewards[c + 1]
            terms.append(-torch.log(torch.sigmoid(beta * margin)))
        return _sum(terms)

    _check(engine, data, "dpo", formula, config)


# --------------------------------------------------------------------------------------- grpo
def _grpo_data(engine, rng, with_ref=True):
    data = _rl_data(engine, rng, noise=0.3)
    extras = []
    for j, d in enumerate(data):
        extra = {}
        if with_ref:
            extra["ref_logprobs"] = _arr(d, "logprobs") + rng.normal(0.0, 0.4, size=len(d.input_tokens))
        if j == 1:  # a datum whose weights (not its advantages) say which tokens count
            w = np.ones(len(d.input_tokens))
            w[-2:] = 0.0
            extra["weights"] = w
        extras.append(extra)
    return _with(data, extras)


def _grpo_formula(config, clips):
    eps_low, eps_high = config["epsilon_low"], config["epsilon_high"]
    kl_beta, normalize = config["kl_beta"], config["normalize"]

    def formula(logprobs, data):
        seq_sums, counts = [], []
        for lp, d in zip(logprobs, data):
            q, adv = _arr(d, "logprobs"), _arr(d, "advantages")
            mask = _arr(d, "weights") if "weights" in d.loss_inputs else (adv != 0).astype(np.float64)
            terms = []
            for i in range(lp.shape[0]):
                if mask[i] == 0:
                    continue
                r = torch.exp(lp[i] - q[i])
                per_token = -clips.ppo_term(r, float(adv[i]), 1.0 - eps_low, 1.0 + eps_high)
                if kl_beta > 0:
                    delta = _arr(d, "ref_logprobs")[i] - lp[i]  # k3 estimator of KL(pi || ref)
                    per_token = per_token + kl_beta * (torch.exp(delta) - delta - 1.0)
                terms.append(mask[i] * per_token)
            seq_sums.append(_sum(terms))
            counts.append(float(mask.sum()))
        if normalize == "token_mean":
            return _sum(seq_sums) / sum(counts)
        if normalize == "sequence_mean":
            return _sum([s / c for s, c in zip(seq_sums, counts)]) / len(seq_sums)
        return _sum(seq_sums)
    return formula


GRPO_DEFAULTS = {"epsilon_low": 0.2, "epsilon_high": 0.2, "kl_beta": 0.0, "normalize": "token_mean"}


@pytest.mark.parametrize("normalize", ["token_mean", "sequence_mean", "sum"])
def test_grpo_with_kl(make_engine, normalize):
    config = {"kl_beta": 0.1, "normalize": normalize, "epsilon_low": 0.15, "epsilon_high": 0.25}
    engine = _engine(make_engine)
    data = _grpo_data(engine, np.random.default_rng(10))
    clips = _Clips()
    result, _ = _check(engine, data, "grpo", _grpo_formula({**GRPO_DEFAULTS, **config}, clips), config)
    assert 0 < clips.active < clips.total
    assert "kl:mean" in result.metrics


def test_grpo_defaults_without_kl(make_engine):
    engine = _engine(make_engine)
    data = _grpo_data(engine, np.random.default_rng(11), with_ref=False)
    clips = _Clips()
    _check(engine, data, "grpo", _grpo_formula(GRPO_DEFAULTS, clips))
    assert 0 < clips.active < clips.total


# ------------------------------------------------------------------------------- custom loss
def test_custom_loss_callable_two_args(make_engine):
    engine = _engine(make_engine)
    rng = np.random.default_rng(12)
    data = _base_data(engine, rng)
    data = _with(data, [{"weights": rng.normal(0.0, 1.0, size=n), "my_scale": np.full(n, 0.5)} for n in LENGTHS])

    def custom(logprobs, inputs):  # couples datums non-linearly, uses a custom input key
        total = logprobs[0].new_zeros(())
        for lp, inp in zip(logprobs, inputs):
            total = total + (inp["weights"] * lp).sum()
        return 0.01 * total ** 2 - sum(inp["my_scale"][0] * lp.mean() for lp, inp in zip(logprobs, inputs))

    def formula(logprobs, data):
        weighted = []
        means = []
        for lp, d in zip(logprobs, data):
            w, s = _arr(d, "weights"), _arr(d, "my_scale")
            weighted.extend(w[i] * lp[i] for i in range(lp.shape[0]))
            means.append(s[0] * _sum([lp[i] for i in range(lp.shape[0])]) / lp.shape[0])
        return 0.01 * _sum(weighted) ** 2 - _sum(means)

    _check(engine, data, custom, formula)


def test_custom_loss_callable_with_config_and_metrics(make_engine):
    engine = _engine(make_engine)
    rng = np.random.default_rng(13)
    data = _rl_data(engine, rng)
    seen = {}

    def custom(logprobs, inputs, config):
        seen.update(config)
        terms = [-(torch.exp(lp - inp["logprobs"]) * inp["advantages"]).sum() for lp, inp in zip(logprobs, inputs)]
        loss = config["scale"] * torch.stack(terms).sum()
        return loss, {"loss:sum": float(loss.detach()), "my_metric:mean": 3.0}

    def formula(logprobs, data):
        return 2.5 * _is_formula(logprobs, data)

    result, _ = _check(engine, data, custom, formula, {"scale": 2.5})
    assert seen == {"scale": 2.5}
    assert result.metrics["my_metric:mean"] == 3.0


# --------------------------------------------------------------------------- on-policy ratio
@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_on_policy_ratio_is_one(make_engine, loss):
    """With q equal to the current logprobs every ratio is 1: the loss is exactly -sum(advantages)
    and the gradient is the plain policy gradient -sum(A * grad log p)."""
    engine = _engine(make_engine)
    rng = np.random.default_rng(14)
    data = _base_data(engine, rng)
    q = _current_logprobs(engine, data)
    advs = [rng.normal(0.0, 1.0, size=n) for n in LENGTHS]
    data = _with(data, [{"logprobs": lp, "advantages": a} for lp, a in zip(q, advs)])
    result, grads = _engine_run(engine, data, loss)
    assert result.metrics["loss:sum"] == pytest.approx(-sum(float(a.astype(np.float32).sum()) for a in advs),
                                                       abs=1e-4)
    for out, lp in zip(result.loss_outputs, q):
        np.testing.assert_allclose(out["logprobs"], lp, rtol=0, atol=1e-6)

    def policy_gradient(logprobs, data):
        return _sum([-_arr(d, "advantages")[i] * lp[i] for lp, d in zip(logprobs, data) for i in range(lp.shape[0])])

    _, ref_grads, _ = _reference_run(engine, data, policy_gradient)
    _assert_grads_close(grads, ref_grads)


# ---------------------------------------------------------------------- per-datum thresholds
@pytest.mark.parametrize("loss", ["ppo", "cispo", "gspo"])
def test_per_datum_clip_thresholds_override_config(make_engine, loss):
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.6}
    engine = _engine(make_engine)
    rng = np.random.default_rng(15)
    data = _gspo_data(engine, rng) if loss == "gspo" else _rl_data(engine, rng)
    n0, n1 = len(data[0].input_tokens), len(data[2].input_tokens)
    per_datum = [
        {"clip_low_threshold": np.full(n0, 0.97), "clip_high_threshold": np.full(n0, 1.03)},
        {},
        {"clip_high_threshold": np.linspace(1.0, 1.1, n1)},  # only one bound; the other from config
        {},
    ]
    data = _with(data, per_datum)
    clips, overridden = _Clips(), _Clips()
    merged = {**DEFAULT_CLIP, **config}
    if loss == "ppo":
        formula = _ppo_formula(merged, clips)
        config_only = _ppo_formula(merged, overridden)
    elif loss == "cispo":
        formula = _cispo_formula(merged, clips)
        config_only = _cispo_formula(merged, overridden)
    else:
        formula = _gspo_formula(merged, clips, [])
        config_only = _gspo_formula(merged, overridden, [])
    _check(engine, data, loss, formula, config)
    # the same math with the per-datum tensors dropped clips fewer tokens: the tensors mattered
    stripped = [Datum(input_tokens=d.input_tokens,
                      loss_inputs={k: v for k, v in d.loss_inputs.items() if not k.startswith("clip_")})
                for d in data]
    _reference_run(engine, stripped, config_only)
    assert clips.active > overridden.active


# --------------------------------------------------------------------------- micro-batching
def _micro_batch_pair(make_engine, loss):
    whole = _engine(make_engine)
    split = _engine(make_engine, micro_batch_tokens=26)  # LENGTHS split as [9, 5] and [13, 7]
    rng = np.random.default_rng(16)
    if loss == "cross_entropy":
        data = _base_data(whole, rng)
        data = _with(data, [{"weights": rng.normal(0.0, 1.0, size=n)} for n in LENGTHS])
    else:
        data = _rl_data(whole, rng)
    forwards = whole.forwards, split.forwards
    pair = _engine_run(whole, data, loss), _engine_run(split, data, loss)
    assert (whole.forwards - forwards[0], split.forwards - forwards[1]) == (1, 2)
    return pair


@pytest.mark.parametrize("loss", ["cross_entropy", "ppo"])
def test_micro_batches_match_one_pass(make_engine, loss):
    (r_whole, g_whole), (r_split, g_split) = _micro_batch_pair(make_engine, loss)
    assert r_split.metrics["loss:sum"] == pytest.approx(r_whole.metrics["loss:sum"], rel=RTOL, abs=1e-4)
    for a, b in zip(r_split.loss_outputs, r_whole.loss_outputs):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=RTOL, atol=1e-5)
    _assert_grads_close(g_split, g_whole)


def test_micro_batches_give_the_same_mean_metrics(make_engine):
    """A mean metric (ppo's importance_ratio:mean, clip_fraction:mean: means over the tokens with a
    non-zero advantage) is a property of the batch, not of how the engine split it for memory."""
    (r_whole, _), (r_split, _) = _micro_batch_pair(make_engine, "ppo")
    assert set(r_split.metrics) == set(r_whole.metrics)
    for key, value in r_whole.metrics.items():
        assert r_split.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
