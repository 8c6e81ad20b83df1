"""Checks of training and sampling requests, run before any state is touched.

numpy only (no torch), so the HTTP layer can reject bad input with a 4xx before a request is
queued, and the engine can run the same checks in local mode. Every error names the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from twinkle.errors import InvalidInputError, PayloadTooLargeError
from twinkle.losses.specs import (CUSTOM_LOSS, FLOAT_INPUTS, INT_INPUTS, KNOWN_INPUTS, LOSS_SPECS,
                                  NORMALIZE_CHOICES, LossSpec, loss_names)
from twinkle.types import INT64_MAX, Datum, SamplingParams


def check_seq_id(value, field: str = "seq_id") -> int | None:
    """None, or an integer in [0, 2**63): what a request's seq_id may be (it is stored as int64)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"must be an integer, got {value!r}"[:200], field=field)
    if not 0 <= value <= INT64_MAX:
        raise InvalidInputError(f"must be between 0 and 2**63 - 1, got {value}"[:200], field=field)
    return value


def check_tokens(tokens: np.ndarray, vocab_size: int, field: str) -> None:
    if tokens.ndim != 1:
        raise InvalidInputError(f"must be a 1-D list of token ids, got shape {tokens.shape}", field=field)
    if tokens.size == 0:
        raise InvalidInputError("is empty; give at least one token", field=field)
    if not np.issubdtype(tokens.dtype, np.integer):
        if not np.issubdtype(tokens.dtype, np.floating) or not np.all(np.mod(tokens, 1) == 0):
            raise InvalidInputError(f"must hold integer token ids, got dtype {tokens.dtype}", field=field)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidInputError(
            f"token id {bad} is outside the vocabulary [0, {vocab_size}) of this model", field=field)


def _check_finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind not in "iuf":  # not bool, complex, strings or objects
        raise InvalidInputError(f"must hold real numbers, got dtype {array.dtype}", field=field)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InvalidInputError("contains NaN or infinite values", field=field)


def resolve_loss_config(spec: LossSpec, config: dict | None) -> dict[str, float | str]:
    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.config_defaults))
    if unknown:
        allowed = sorted(spec.config_defaults) or "none"
        raise InvalidInputError(f"unknown key(s) {unknown} for loss {spec.name!r}; allowed: {allowed}",
                                field="loss_fn_config")
    for key, value in config.items():
        default = spec.config_defaults[key]
        if isinstance(default, str):
            if key == "normalize" and value not in NORMALIZE_CHOICES:
                raise InvalidInputError(f"normalize must be one of {list(NORMALIZE_CHOICES)}, got {value!r}",
                                        field=f"loss_fn_config.{key}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"must be a finite number, got {value!r}", field=f"loss_fn_config.{key}")
    return spec.resolve_config(config)


# Losses the Tinker API names that Twinkle does not compute, with what to use instead: a clear
# refusal, never a silent substitute.
UNSUPPORTED_LOSS_HINTS = {
    "stable_reinforce": ("Tinker's StableReinforce is an alpha loss whose math is unpublished, so Twinkle does "
                         "not imitate it; use importance_sampling, ppo or cispo instead (in tinker-cookbook set "
                         "loss_fn=importance_sampling); "),
}


def lookup_loss(name: str, *, allow_custom: bool = False) -> LossSpec | None:
    """The spec of a named loss; None for a custom (client-supplied) loss."""
    if allow_custom and name == CUSTOM_LOSS:
        return None
    spec = LOSS_SPECS.get(name)
    if spec is None:
        hint = UNSUPPORTED_LOSS_HINTS.get(name, "")
        raise InvalidInputError(f"unknown loss {name!r}; {hint}choose one of {loss_names()}", field="loss_fn")
    return spec


def validate_batch(data: Sequence[Datum], loss: str, loss_config: dict | None, vocab_size: int,
                   *, allow_custom: bool = False, max_datums: int | None = None,
                   max_tokens: int | None = None, max_context: int | None = None) -> dict[str, float | str]:
    """Validate a training batch for `loss`; return the loss config with defaults filled in.

    `max_context`: the model's context; a longer datum would only stall everyone's pass (413)."""
    if not data:
        raise InvalidInputError("the batch is empty; send at least one datum", field="data")
    if max_datums is not None and len(data) > max_datums:
        raise InvalidInputError(f"{len(data)} datums exceed this server's limit of {max_datums} per request",
                                field="data")
    spec = lookup_loss(loss, allow_custom=allow_custom)
    config = resolve_loss_config(spec, loss_config) if spec else dict(loss_config or {})
    total_tokens = 0
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        tokens = datum.input_tokens
        check_tokens(tokens, vocab_size, f"{where}.model_input")
        n = int(tokens.shape[0])
        if max_context is not None and n > max_context:
            raise PayloadTooLargeError(f"has {n} tokens; this model's context is {max_context} tokens "
                                       "(split or truncate the sequence)", field=f"{where}.model_input")
        total_tokens += n
        inputs = datum.loss_inputs
        unknown = sorted(set(inputs) - KNOWN_INPUTS)
        if unknown and spec is not None:
            raise InvalidInputError(f"unknown loss input(s) {unknown}; known inputs: {sorted(KNOWN_INPUTS)}",
                                    field=f"{where}.loss_fn_inputs")
        if spec is not None:
            missing = [k for k in spec.required_inputs if k not in inputs]
            if missing:
                raise InvalidInputError(f"loss {spec.name!r} needs input(s) {missing}",
                                        field=f"{where}.loss_fn_inputs")
        if "target_tokens" not in inputs:
            raise InvalidInputError("needs target_tokens", field=f"{where}.loss_fn_inputs")
        targets = inputs["target_tokens"]
        topk = spec is not None and spec.allows_topk_targets and targets.ndim == 2
        for key, array in inputs.items():
            field = f"{where}.loss_fn_inputs.{key}"
            two_d_ok = topk and key in ("target_tokens", "weights")
            if array.ndim == 0 or array.shape[0] != n or (array.ndim != 1 and not two_d_ok) or array.ndim > 2:
                raise InvalidInputError(
                    f"has shape {tuple(array.shape)} but the model input has {n} tokens; "
                    f"expected ({n},)" + (f" or ({n}, K)" if two_d_ok or key == "target_tokens" and topk else ""),
                    field=field)
            if key in INT_INPUTS:
                if array.ndim == 2:
                    check_tokens(array.reshape(-1), vocab_size, field)
                else:
                    check_tokens(array, vocab_size, field)
            elif key in FLOAT_INPUTS or spec is None:
                _check_finite(array, field)
        if topk and "weights" in inputs and inputs["weights"].shape != targets.shape:
            raise InvalidInputError(f"weights shape {tuple(inputs['weights'].shape)} must equal target_tokens "
                                    f"shape {tuple(targets.shape)}", field=f"{where}.loss_fn_inputs.weights")
    if spec is not None and spec.group_size > 1 and len(data) % spec.group_size:
        raise InvalidInputError(f"loss {spec.name!r} takes datums in groups of {spec.group_size} "
                                f"(chosen, rejected); got {len(data)} datums", field="data")
    if spec is not None and spec.name == "grpo" and float(config["kl_beta"]) > 0:
        for i, datum in enumerate(data):
            if "ref_logprobs" not in datum.loss_inputs:
                raise InvalidInputError("kl_beta > 0 needs ref_logprobs in every datum",
                                        field=f"data[{i}].loss_fn_inputs")
    if max_tokens is not None and total_tokens > max_tokens:
        raise InvalidInputError(f"{total_tokens} tokens exceed this server's limit of {max_tokens} per request",
                                field="data")
    return config


def _check_prompt_targets(targets: np.ndarray, prompt_len: int, vocab_size: int) -> None:
    field = "target_prompt_logprobs"
    if targets.ndim != 2 or targets.shape[0] != prompt_len - 1:
        raise InvalidInputError(f"must have shape [len(prompt) - 1, K] = [{prompt_len - 1}, K], got "
                                f"{list(targets.shape)}", field=field)
    if targets.dtype.kind == "f" and not np.all(np.isfinite(targets) & (targets == np.round(targets))):
        raise InvalidInputError("must hold integer token ids (-1 for none)", field=field)
    if targets.size and (targets.min() < -1 or targets.max() >= vocab_size):
        raise InvalidInputError(f"token ids must be in [0, {vocab_size}) or -1 for none", field=field)
    if targets.shape[1] > 1000:
        raise InvalidInputError(f"at most 1000 targets per position, got {targets.shape[1]}", field=field)


def validate_sampling(prompt_tokens: np.ndarray, params: SamplingParams, num_samples: int, vocab_size: int,
                      max_context: int, *, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
                      target_prompt_logprobs: np.ndarray | None = None, prompt_alt_tokens_k: int = 0,
                      max_samples: int = 128) -> None:
    check_tokens(prompt_tokens, vocab_size, "prompt")
    if target_prompt_logprobs is not None:
        _check_prompt_targets(np.asarray(target_prompt_logprobs), len(prompt_tokens), vocab_size)
    if prompt_alt_tokens_k < 0 or prompt_alt_tokens_k > 100:
        raise InvalidInputError(f"must be between 0 and 100, got {prompt_alt_tokens_k}", field="prompt_alt_tokens_k")
    if num_samples < 1 or num_samples > max_samples:
        raise InvalidInputError(f"must be between 1 and {max_samples}, got {num_samples}", field="num_samples")
    for field, k in (("topk_prompt_logprobs", topk_prompt_logprobs), ("topk_sample_logprobs", topk_sample_logprobs)):
        if k < 0 or k > 100:
            raise InvalidInputError(f"must be between 0 and 100, got {k}", field=field)
    if len(prompt_tokens) >= max_context:
        raise InvalidInputError(f"prompt has {len(prompt_tokens)} tokens; this model's context is {max_context}",
                                field="prompt")
    if params.max_tokens is not None and len(prompt_tokens) + params.max_tokens > max_context:
        raise InvalidInputError(
            f"prompt ({len(prompt_tokens)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
            f"length {max_context}", field="sampling_params.max_tokens")
    if isinstance(params.stop, list) and params.stop and isinstance(params.stop[0], int):
        check_tokens(np.asarray(params.stop), vocab_size, "sampling_params.stop")
