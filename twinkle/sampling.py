"""Token sampling with a KV cache, reporting the model's log-probabilities.

One prompt is prefilled once; its cache is copied to `num_samples` rows which are decoded together,
and rows that finish are dropped from the batch. Reported logprobs are those of the raw model
distribution (temperature 1, no top-k/top-p filtering), so they agree with `forward` on the same
sequence — what RL losses need as the sampler's q.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from twinkle.types import SampledSequence, SampleResult, SamplingParams


@dataclass
class StopCriteria:
    token_ids: frozenset[int]
    strings: tuple[str, ...]

    @classmethod
    def from_params(cls, stop, default_eos: list[int]) -> "StopCriteria":
        if stop is None:
            return cls(frozenset(default_eos), ())
        if isinstance(stop, str):
            return cls(frozenset(), (stop,))
        if stop and isinstance(stop[0], str):
            return cls(frozenset(), tuple(s for s in stop if s))
        return cls(frozenset(int(t) for t in stop), ())


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _topk_lists(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    values, indices = torch.topk(logprobs, k, dim=-1)
    return [list(zip(map(int, idx), map(float, val))) for idx, val in zip(indices.tolist(), values.tolist())]


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV cache argument `cache`; older releases `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _decode_step(model, ids: torch.Tensor, cache, kwarg: str):
    out = model(input_ids=ids, use_cache=True, **({kwarg: cache} if cache is not None else {}))
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits, new_cache


@dataclass
class PromptScores:
    """What the prefill reports about the prompt; row i of the 2-D fields is prompt position i + 1."""

    logprobs: list[float | None]
    topk: list[list[tuple[int, float]] | None]
    targets: list[list[float]] | None = None
    alt_tokens: list[list[int]] | None = None
    alt_logprobs: list[list[float]] | None = None


@torch.no_grad()
def prompt_logprobs(model, prompt: list[int], topk: int = 0, *, targets: np.ndarray | None = None,
                    alt_k: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Prefill the prompt; return (cache, last-position logits, PromptScores).

    `targets` ([len(prompt) - 1, K] token ids, -1 for none) are scored at their positions (0.0 where
    -1); `alt_k` tokens are drawn at every position after the first, at `temperature`, with their
    logprobs under the model.
    """
    ids = torch.tensor([prompt], dtype=torch.long)
    logits, cache = _decode_step(model, ids, None, _cache_kwarg(model))
    logits = logits[0].float()
    scores = PromptScores(logprobs=[None], topk=[None], targets=None if targets is None else [],
                          alt_tokens=[] if alt_k else None, alt_logprobs=[] if alt_k else None)
    if len(prompt) > 1:
        log_dist = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
        scores.logprobs += log_dist.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        if topk:
            scores.topk += _topk_lists(log_dist, topk)
        if targets is not None:
            wanted = torch.as_tensor(np.asarray(targets, dtype=np.int64))
            values = log_dist.gather(-1, wanted.clamp(min=0))
            scores.targets = values.masked_fill(wanted < 0, 0.0).tolist()
        if alt_k:
            probs = torch.softmax(log_dist / temperature, dim=-1) if temperature > 0 else \
                torch.nn.functional.one_hot(log_dist.argmax(-1), log_dist.shape[-1]).float()
            drawn = torch.multinomial(probs, alt_k, replacement=True, generator=generator)
            scores.alt_tokens = drawn.tolist()
            scores.alt_logprobs = log_dist.gather(-1, drawn).tolist()
    return cache, logits[-1], scores


@torch.no_grad()
def sample(model, prompt: list[int], params: SamplingParams, num_samples: int, *, eos_token_ids: list[int],
           decode, max_context: int, default_max_tokens: int = 1024, include_prompt_logprobs: bool = False,
           topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
           target_prompt_logprobs: np.ndarray | None = None, prompt_alt_tokens_k: int = 0) -> SampleResult:
    """Sample `num_samples` continuations of `prompt` from `model` (already set to the right adapter).

    Logprobs (sampled and top-k) are the model's own distribution, before temperature or top-k/top-p
    filtering: the numbers a trainer's `forward` gives for the same tokens.
    """
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(int(seed))
    # the prompt's alternative draws use their own stream: asking for them leaves the samples unchanged
    alt_generator = torch.Generator().manual_seed((int(seed) + 1) % 2**63)
    cache, last_logits, scores = prompt_logprobs(model, prompt, topk_prompt_logprobs, targets=target_prompt_logprobs,
                                                 alt_k=prompt_alt_tokens_k, temperature=params.temperature,
                                                 generator=alt_generator)
    kwarg = _cache_kwarg(model)
    max_tokens = params.max_tokens or default_max_tokens
    max_tokens = max(0, min(max_tokens, max_context - len(prompt)))
    stop = StopCriteria.from_params(params.stop, eos_token_ids)
    longest_stop = max((len(s) for s in stop.strings), default=0)

    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    logprobs: list[list[float]] = [[] for _ in range(num_samples)]
    topk: list[list[list[tuple[int, float]]]] = [[] for _ in range(num_samples)]
    reasons: list[str] = ["length"] * num_samples
    active = list(range(num_samples))
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
    next_logits = last_logits.unsqueeze(0).expand(num_samples, -1)

    for _ in range(max_tokens):
        lse = torch.logsumexp(next_logits, dim=-1, keepdim=True)
        if params.temperature == 0:
            chosen = torch.argmax(next_logits, dim=-1)
        else:
            probs = torch.softmax(_filter_logits(next_logits, params), dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        chosen_lp = (next_logits.gather(-1, chosen[:, None]) - lse)[:, 0]
        step_topk = _topk_lists(next_logits - lse, topk_sample_logprobs) if topk_sample_logprobs else None
        keep = []
        for row, (token, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
            seq = active[row]
            tokens[seq].append(token)
            logprobs[seq].append(lp)
            if step_topk is not None:
                topk[seq].append(step_topk[row])
            finished = token in stop.token_ids
            if not finished and stop.strings:
                tail = decode(tokens[seq][-(longest_stop + 8):])
                finished = any(s in tail for s in stop.strings)
            if finished:
                reasons[seq] = "stop"
            else:
                keep.append(row)
        if not keep or len(tokens[active[keep[0]]]) >= max_tokens:
            break
        if len(keep) < len(active):
            cache.batch_select_indices(torch.tensor(keep))
            chosen = chosen[keep]
            active = [active[r] for r in keep]
        logits, cache = _decode_step(model, chosen[:, None], cache, kwarg)
        next_logits = logits[:, -1].float()

    sequences = [SampledSequence(tokens=t, logprobs=lp, stop_reason=r,
                                 topk_logprobs=k if topk_sample_logprobs else None)
                 for t, lp, r, k in zip(tokens, logprobs, reasons, topk)]
    return SampleResult(
        sequences=sequences,
        prompt_logprobs=scores.logprobs if include_prompt_logprobs else None,
        topk_prompt_logprobs=scores.topk if topk_prompt_logprobs else None,
        target_prompt_logprobs=scores.targets,
        prompt_alt_tokens=scores.alt_tokens,
        prompt_alt_logprobs=scores.alt_logprobs,
    )
