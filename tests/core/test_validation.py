"""Bad input is refused with InvalidInputError naming the field, and touches no state.

Each bad request goes to an engine whose adapter has taken an optimizer step and holds pending
gradients; afterwards its weights, optimizer state, gradients and training counters must be exactly
as before. A final test checks that an adapter that saw every bad request still trains exactly like
one that never did.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from twinkle.errors import InvalidInputError
from twinkle.paths import check_name, safe_join
from twinkle.types import AdamParams, Datum, LoraConfig, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ADAPTER = "a"
LENGTHS = (6, 4)


# ---------------------------------------------------------------------------------- helpers
def _datum(tokens, **inputs) -> Datum:
    return Datum(input_tokens=np.asarray(tokens), loss_inputs={k: np.asarray(v) for k, v in inputs.items()})


def _tokens(n, offset=0):
    return np.arange(10 + offset, 10 + offset + n, dtype=np.int64)


def _ce(n=6, offset=0, **extra) -> Datum:
    inputs = {"target_tokens": _tokens(n, offset + 1), "weights": np.ones(n, dtype=np.float32)}
    inputs.update(extra)
    return _datum(_tokens(n, offset), **inputs)


def _rl(n=6, offset=0, **extra) -> Datum:
    inputs = {"target_tokens": _tokens(n, offset + 1), "logprobs": np.full(n, -7.0, dtype=np.float32),
              "advantages": np.linspace(-1.0, 1.0, n).astype(np.float32)}
    inputs.update(extra)
    return _datum(_tokens(n, offset), **inputs)


def _drop(datum: Datum, key: str) -> Datum:
    return Datum(input_tokens=datum.input_tokens,
                 loss_inputs={k: v for k, v in datum.loss_inputs.items() if k != key})


def _replace(datum: Datum, key: str, value) -> Datum:
    inputs = dict(datum.loss_inputs)
    inputs[key] = np.asarray(value)
    return Datum(input_tokens=datum.input_tokens, loss_inputs=inputs)


def _with_nan(n, index=2, value=np.nan):
    arr = np.linspace(-1.0, 1.0, n).astype(np.float32)
    arr[index] = value
    return arr


def _ce_batch():
    return [_ce(n, offset=3 * i) for i, n in enumerate(LENGTHS)]


def _prepared_engine(make_engine, **overrides):
    """An adapter that has taken one optimizer step (so Adam has state) and holds pending gradients."""
    engine = make_engine(**overrides)
    engine.create_adapter(ADAPTER, LoraConfig(rank=4, seed=11), adam=AdamParams(learning_rate=1e-2))
    engine.forward_backward(ADAPTER, _ce_batch())
    engine.optim_step(ADAPTER)
    engine.forward_backward(ADAPTER, [_ce(5, offset=40)])
    return engine


def _snapshot(engine) -> dict:
    return {
        "adapters": sorted(engine.table.adapters),
        "weights": engine.adapter_weights(ADAPTER),
        "grads": engine.grads(ADAPTER),
        "optimizer": copy.deepcopy(engine.optimizer(ADAPTER).state_dict()),
        "train_state": engine.train_state(ADAPTER).model_dump(),
    }


def _assert_same_tree(a, b, where="optimizer"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_unchanged(before: dict, after: dict) -> None:
    assert after["adapters"] == before["adapters"]
    assert after["train_state"] == before["train_state"]
    assert set(after["weights"]) == set(before["weights"])
    for name, w in before["weights"].items():
        np.testing.assert_array_equal(after["weights"][name], w, err_msg=name)
    for name, g in before["grads"].items():
        got = after["grads"][name]
        assert (got is None) == (g is None), name
        if g is not None:
            assert torch.equal(got, g), name
    assert before["optimizer"]["state"], "the optimizer should hold state for this check to mean anything"
    _assert_same_tree(before["optimizer"], after["optimizer"])


# ----------------------------------------------------------------------------- bad requests
@dataclass
class Bad:
    id: str
    call: Callable  # (engine) -> anything; must raise
    field: str


def _fb(data, loss="cross_entropy", config=None):
    return lambda e: e.forward_backward(ADAPTER, data() if callable(data) else data, loss, config)


def _fwd(data, loss="cross_entropy", config=None):
    return lambda e: e.forward(ADAPTER, data() if callable(data) else data, loss, config)


def _vocab_token_batch(e):
    second = _ce(4, offset=3)
    tokens = second.input_tokens.copy()
    tokens[2] = e.vocab_size
    return [_ce(6), _datum(tokens, **second.loss_inputs)]


def _vocab_target_batch(e):
    second = _ce(4, offset=3)
    targets = second.loss_inputs["target_tokens"].copy()
    targets[-1] = e.vocab_size + 5
    return [_ce(6), _replace(second, "target_tokens", targets)]


def _raise(exc):
    raise exc


BAD_TRAINING = [
    # token ids in the model input
    Bad("input-token-eq-vocab", lambda e: e.forward_backward(ADAPTER, _vocab_token_batch(e)), "data[1].model_input"),
    Bad("input-token-negative", _fb([_datum([5, -1, 7], target_tokens=[1, 2, 3])]), "data[0].model_input"),
    Bad("input-token-negative-forward", _fwd([_datum([5, -1, 7], target_tokens=[1, 2, 3])]), "data[0].model_input"),
    Bad("input-token-fractional", _fb([_datum([5.0, 6.5, 7.0], target_tokens=[1, 2, 3])]), "data[0].model_input"),
    Bad("input-tokens-2d", _fb([_datum([[5, 6, 7]], target_tokens=[1, 2, 3])]), "data[0].model_input"),
    Bad("input-tokens-empty", _fb([_datum(np.zeros(0, dtype=np.int64), target_tokens=np.zeros(0, dtype=np.int64))]),
        "data[0].model_input"),
    # token ids in the targets
    Bad("target-token-above-vocab", lambda e: e.forward_backward(ADAPTER, _vocab_target_batch(e)),
        "data[1].loss_fn_inputs.target_tokens"),
    Bad("target-token-negative", _fb([_replace(_ce(6), "target_tokens", [11, 12, -3, 14, 15, 16])]),
        "data[0].loss_fn_inputs.target_tokens"),
    Bad("target-token-negative-ppo", _fb([_replace(_rl(6), "target_tokens", [11, 12, -3, 14, 15, 16])], "ppo"),
        "data[0].loss_fn_inputs.target_tokens"),
    Bad("topk-target-above-vocab", lambda e: e.forward_backward(ADAPTER, [_datum(
        _tokens(3), target_tokens=[[1, 2], [3, e.vocab_size], [5, 6]], weights=np.ones((3, 2), np.float32))]),
        "data[0].loss_fn_inputs.target_tokens"),
    # shapes
    Bad("targets-too-short", _fb([_ce(4), _replace(_ce(6), "target_tokens", _tokens(5))]),
        "data[1].loss_fn_inputs.target_tokens"),
    Bad("targets-too-long", _fb([_replace(_ce(6), "target_tokens", _tokens(7))]),
        "data[0].loss_fn_inputs.target_tokens"),
    Bad("weights-wrong-length", _fb([_replace(_ce(6), "weights", np.ones(5, np.float32))]),
        "data[0].loss_fn_inputs.weights"),
    Bad("weights-2d-with-1d-targets", _fb([_replace(_ce(6), "weights", np.ones((6, 2), np.float32))]),
        "data[0].loss_fn_inputs.weights"),
    Bad("topk-weights-other-k", _fb([_datum(_tokens(3), target_tokens=[[1, 2, 3]] * 3,
                                            weights=np.ones((3, 2), np.float32))]),
        "data[0].loss_fn_inputs.weights"),
    Bad("topk-targets-for-ppo", _fb([_replace(_rl(3), "target_tokens", [[1, 2]] * 3)], "ppo"),
        "data[0].loss_fn_inputs.target_tokens"),
    Bad("advantages-wrong-length", _fb([_replace(_rl(6), "advantages", np.ones(4, np.float32))], "ppo"),
        "data[0].loss_fn_inputs.advantages"),
    Bad("scalar-logprobs", _fb([_replace(_rl(6), "logprobs", np.float32(-1.0))], "importance_sampling"),
        "data[0].loss_fn_inputs.logprobs"),
    # loss names and config
    Bad("unknown-loss", _fb(_ce_batch, "cross_entropy_v2"), "loss_fn"),
    Bad("unknown-loss-forward", _fwd(_ce_batch, "stable_reinforce"), "loss_fn"),
    Bad("unknown-config-key", _fb([_rl(6)], "ppo", {"clip_low": 0.5}), "loss_fn_config"),
    Bad("config-key-for-configless-loss", _fb(_ce_batch, "cross_entropy", {"beta": 0.1}), "loss_fn_config"),
    Bad("config-value-string", _fb([_rl(6)], "ppo", {"clip_low_threshold": "0.8"}),
        "loss_fn_config.clip_low_threshold"),
    Bad("config-value-none", _fb([_rl(6)], "dro", {"beta": None}), "loss_fn_config.beta"),
    Bad("config-value-bool", _fb([_rl(6)], "dro", {"beta": True}), "loss_fn_config.beta"),
    Bad("config-value-nan", _fb([_rl(6)], "ppo", {"clip_high_threshold": float("nan")}),
        "loss_fn_config.clip_high_threshold"),
    Bad("config-value-inf", _fb([_rl(6)], "grpo", {"kl_beta": float("inf")}), "loss_fn_config.kl_beta"),
    Bad("config-normalize-unknown", _fb([_rl(6)], "grpo", {"normalize": "mean"}), "loss_fn_config.normalize"),
    # non-finite values
    Bad("weights-nan", _fb([_ce(4), _replace(_ce(6), "weights", _with_nan(6))]), "data[1].loss_fn_inputs.weights"),
    Bad("weights-inf", _fb([_replace(_ce(6), "weights", _with_nan(6, value=np.inf))]),
        "data[0].loss_fn_inputs.weights"),
    Bad("topk-weights-nan", _fb([_datum(_tokens(3), target_tokens=[[1, 2]] * 3,
                                        weights=[[1.0, np.nan], [1.0, 1.0], [0.5, 0.5]])]),
        "data[0].loss_fn_inputs.weights"),
    Bad("advantages-nan", _fb([_replace(_rl(6), "advantages", _with_nan(6))], "ppo"),
        "data[0].loss_fn_inputs.advantages"),
    Bad("advantages-inf", _fb([_rl(4), _replace(_rl(6), "advantages", _with_nan(6, value=-np.inf))], "cispo"),
        "data[1].loss_fn_inputs.advantages"),
    Bad("logprobs-nan", _fb([_replace(_rl(6), "logprobs", _with_nan(6))], "importance_sampling"),
        "data[0].loss_fn_inputs.logprobs"),
    Bad("logprobs-minus-inf", _fb([_replace(_rl(6), "logprobs", _with_nan(6, value=-np.inf))], "ppo"),
        "data[0].loss_fn_inputs.logprobs"),
    Bad("ref-logprobs-nan", _fb([_ce(6, ref_logprobs=_with_nan(6)), _ce(4, ref_logprobs=np.zeros(4, np.float32))],
                                "dpo"), "data[0].loss_fn_inputs.ref_logprobs"),
    Bad("clip-threshold-nan", _fb([_rl(6, clip_low_threshold=_with_nan(6))], "ppo"),
        "data[0].loss_fn_inputs.clip_low_threshold"),
    Bad("weights-not-numbers", _fb([_replace(_ce(6), "weights", np.array(["a"] * 6))]),
        "data[0].loss_fn_inputs.weights"),
    # missing and unknown inputs
    Bad("ppo-without-advantages", _fb([_drop(_rl(6), "advantages")], "ppo"), "data[0].loss_fn_inputs"),
    Bad("is-without-logprobs", _fb([_rl(4), _drop(_rl(6), "logprobs")], "importance_sampling"),
        "data[1].loss_fn_inputs"),
    Bad("dpo-without-ref-logprobs", _fb([_ce(6), _ce(4)], "dpo"), "data[0].loss_fn_inputs"),
    Bad("ce-without-targets", _fb([_drop(_ce(6), "target_tokens")]), "data[0].loss_fn_inputs"),
    Bad("unknown-input-key", _fb([_ce(6, mask=np.ones(6, np.float32))]), "data[0].loss_fn_inputs"),
    # batch structure
    Bad("empty-batch", _fb([]), "data"),
    Bad("empty-batch-forward", _fwd([]), "data"),
    Bad("dpo-odd-datums", _fb([_ce(n, ref_logprobs=np.zeros(n, np.float32)) for n in (6, 4, 5)], "dpo"), "data"),
    Bad("grpo-kl-without-ref-logprobs",
        _fb([_rl(6, ref_logprobs=np.zeros(6, np.float32)), _rl(4)], "grpo", {"kl_beta": 0.1}),
        "loss_fn_inputs"),
    # custom (callable) losses
    Bad("custom-input-nan", _fb([_ce(6, my_input=_with_nan(6))], lambda lps, inputs: lps[0].sum()),
        "data[0].loss_fn_inputs.my_input"),
    Bad("custom-input-token-oob", lambda e: e.forward_backward(
        ADAPTER, [_datum([1, e.vocab_size], target_tokens=[1, 2])], lambda lps, inputs: lps[0].sum()),
        "data[0].model_input"),
    Bad("custom-loss-raises", _fb(_ce_batch, lambda lps, inputs: _raise(RuntimeError("boom"))), "loss_fn"),
    Bad("custom-loss-not-scalar", _fb(_ce_batch, lambda lps, inputs: torch.cat(lps)), "loss_fn"),
]

# Fields that must be a prefix/equal: "grpo-kl..." only needs to point at the loss inputs.
_SUFFIX_FIELDS = {"grpo-kl-without-ref-logprobs"}


def _assert_field(err: InvalidInputError, case: Bad) -> None:
    if case.id in _SUFFIX_FIELDS:
        assert err.field and err.field.endswith(case.field), err.field
    else:
        assert err.field == case.field, (err.field, str(err))


@pytest.mark.parametrize("case", BAD_TRAINING, ids=[c.id for c in BAD_TRAINING])
def test_bad_training_request_is_rejected_without_side_effects(make_engine, case):
    engine = _prepared_engine(make_engine)
    before = _snapshot(engine)
    with pytest.raises(InvalidInputError) as info:
        case.call(engine)
    _assert_field(info.value, case)
    _assert_unchanged(before, _snapshot(engine))


# ---------------------------------------------------------------------------------- adapters
def test_lora_rank_above_the_maximum_is_rejected(make_engine):
    engine = _prepared_engine(make_engine, max_lora_rank=8)
    before = _snapshot(engine)
    with pytest.raises(InvalidInputError) as info:
        engine.create_adapter("big", LoraConfig(rank=16, seed=0))
    assert info.value.field == "lora_config.rank"
    assert not engine.has_adapter("big")
    _assert_unchanged(before, _snapshot(engine))
    # the limit itself is allowed, and the new adapter trains
    engine.create_adapter("big", LoraConfig(rank=8, seed=0))
    engine.forward_backward("big", _ce_batch())
    engine.optim_step("big")
    assert engine.train_state("big").step == 1


# ------------------------------------------------------------------------------------- names
ESCAPING_NAMES = ["../x", "/abs", "a/b", "..", ".", "", ".hidden", "x/../../y", "a\\b", "ok\x00"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_check_name_refuses_names_that_escape(name):
    with pytest.raises(InvalidInputError) as info:
        check_name(name, field="checkpoint_name")
    assert info.value.field == "checkpoint_name"


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_safe_join_refuses_names_that_escape(tmp_path, name):
    root = tmp_path / "checkpoints"
    root.mkdir()
    with pytest.raises(InvalidInputError) as info:
        safe_join(root, "model-1", name, field="path")
    assert info.value.field == "path"
    assert list(tmp_path.iterdir()) == [root] and not any(root.iterdir())


@pytest.mark.parametrize("name", ["ckpt-1", "step_0001.final", "A1"])
def test_safe_join_keeps_good_names_inside(tmp_path, name):
    assert check_name(name) == name
    path = safe_join(tmp_path, "model-1", name)
    assert path == (tmp_path / "model-1" / name).resolve()
    assert tmp_path.resolve() in path.parents


# ---------------------------------------------------------------------------------- sampling
BAD_SAMPLING = [
    Bad("prompt-token-eq-vocab", lambda e: e.sample(ADAPTER, [1, 2, e.vocab_size], SamplingParams(max_tokens=2)),
        "prompt"),
    Bad("prompt-token-negative", lambda e: e.sample(ADAPTER, [1, -2, 3], SamplingParams(max_tokens=2)), "prompt"),
    Bad("prompt-empty", lambda e: e.sample(ADAPTER, [], SamplingParams(max_tokens=2)), "prompt"),
    Bad("prompt-token-oob-base-model", lambda e: e.sample(None, [e.vocab_size + 1], SamplingParams(max_tokens=2)),
        "prompt"),
    Bad("num-samples-zero", lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=2), num_samples=0),
        "num_samples"),
    Bad("num-samples-negative", lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=2), num_samples=-1),
        "num_samples"),
    Bad("prompt-plus-max-tokens-beyond-context",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=e.max_context - 2)),
        "sampling_params.max_tokens"),
    Bad("prompt-fills-context",
        lambda e: e.sample(ADAPTER, [5] * e.max_context, SamplingParams(max_tokens=1)), "prompt"),
    Bad("stop-token-out-of-vocab",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=2, stop=[e.vocab_size])),
        "sampling_params.stop"),
    Bad("topk-sample-too-large",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=2), topk_sample_logprobs=101),
        "topk_sample_logprobs"),
    Bad("prompt-targets-wrong-rows",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=1), target_prompt_logprobs=np.ones((3, 2))),
        "target_prompt_logprobs"),
    Bad("prompt-targets-out-of-vocab",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=1),
                           target_prompt_logprobs=np.full((2, 1), e.vocab_size)), "target_prompt_logprobs"),
    Bad("prompt-targets-below-minus-one",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=1),
                           target_prompt_logprobs=np.full((2, 1), -2)), "target_prompt_logprobs"),
    Bad("prompt-alt-tokens-too-many",
        lambda e: e.sample(ADAPTER, [1, 2, 3], SamplingParams(max_tokens=1), prompt_alt_tokens_k=101),
        "prompt_alt_tokens_k"),
]


@pytest.mark.parametrize("case", BAD_SAMPLING, ids=[c.id for c in BAD_SAMPLING])
def test_bad_sampling_request_is_rejected_without_side_effects(make_engine, case):
    engine = _prepared_engine(make_engine)
    before = _snapshot(engine)
    with pytest.raises(InvalidInputError) as info:
        case.call(engine)
    assert info.value.field == case.field, str(info.value)
    _assert_unchanged(before, _snapshot(engine))


def test_sampling_exactly_at_the_context_limit_is_allowed(make_engine):
    engine = _prepared_engine(make_engine)
    prompt = [5] * (engine.max_context - 2)
    result = engine.sample(ADAPTER, prompt, SamplingParams(max_tokens=2, stop=[], seed=0), num_samples=1)
    assert len(result.sequences[0].tokens) == 2


# ---------------------------------------------------------------------------------- recovery
def _train_step(engine):
    """A valid forward_backward + optim_step, then the loss of a forward on the same data."""
    data = [_rl(7, offset=60), _rl(5, offset=80)]
    fb = engine.forward_backward(ADAPTER, data, "ppo")
    step = engine.optim_step(ADAPTER)
    after = engine.forward(ADAPTER, data, "ppo")
    return fb.metrics["loss:sum"], step.metrics["grad_norm"], after.metrics["loss:sum"]


def test_adapter_trains_normally_after_rejected_requests(make_engine):
    seen_bad = _prepared_engine(make_engine)
    for case in BAD_TRAINING + BAD_SAMPLING:
        with pytest.raises(InvalidInputError):
            case.call(seen_bad)
    with pytest.raises(InvalidInputError):
        seen_bad.create_adapter("big", LoraConfig(rank=seen_bad.config.max_lora_rank + 1))
    fresh = _prepared_engine(make_engine)
    assert _snapshot(seen_bad)["train_state"] == _snapshot(fresh)["train_state"]

    got, want = _train_step(seen_bad), _train_step(fresh)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert got[2] != pytest.approx(got[0])  # the step did change the adapter
    for name, w in fresh.adapter_weights(ADAPTER).items():
        np.testing.assert_allclose(seen_bad.adapter_weights(ADAPTER)[name], w, rtol=1e-6, atol=1e-8, err_msg=name)
    assert seen_bad.train_state(ADAPTER) == fresh.train_state(ADAPTER)


def test_a_tinker_loss_twinkle_does_not_compute_is_refused_with_an_alternative():
    from twinkle.validation import lookup_loss

    with pytest.raises(InvalidInputError) as err:
        lookup_loss("stable_reinforce")
    assert err.value.field == "loss_fn" and "importance_sampling" in str(err.value)
