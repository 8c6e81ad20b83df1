"""Token sampling for many requests at once, with a KV cache, reporting the model's log-probabilities.

The prompts of all requests are prefilled together (left-padded, with an attention mask and explicit
positions); each prompt's cache row is copied to its `num_samples` rows, and all rows decode
together, dropping out as they finish. Each request draws from its own seeded generator over its own
rows, so a request's samples do not depend on what else shares the batch.

Reported logprobs are those of the raw model distribution (temperature 1, no top-k/top-p
filtering), so they agree with `forward` on the same sequence — what RL losses need as the
sampler's q.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from twinkle.backends.base import SampleRequest
from twinkle.types import SampledSequence, SampleResult, SamplingParams

RowsHook = Callable[[list[int]], None]  # told which job each row of the next forward belongs to


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


@dataclass
class _JobState:
    """One request inside a batched generation, and what it has sampled so far."""

    job: SampleRequest
    prompt: list[int]
    seed: int
    max_tokens: int
    stop: StopCriteria
    generator: torch.Generator
    tokens: list[list[int]]
    logprobs: list[list[float]]
    topk: list[list[list[tuple[int, float]]]]
    reasons: list[str]
    longest_stop: int = 0
    scores: "PromptScores | None" = None
    active: list[int] = field(default_factory=list)  # sample indices still decoding


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


@dataclass
class PromptScores:
    """What the prefill reports about the prompt; row i of the 2-D fields is prompt position i + 1."""

    logprobs: list[float | None]
    topk: list[list[tuple[int, float]] | None]
    targets: list[list[float]] | None = None
    alt_tokens: list[list[int]] | None = None
    alt_logprobs: list[list[float]] | None = None


def _score_prompt(logits: torch.Tensor, prompt: torch.Tensor, job: SampleRequest,
                  generator: torch.Generator) -> PromptScores:
    """Scores of one prompt from its prefill logits (len(prompt), V), on the logits' device.

    `target_prompt_logprobs` ([len(prompt) - 1, K] token ids, -1 for none) are scored at their
    positions (0.0 where -1); `prompt_alt_tokens_k` tokens are drawn at every position after the
    first, at the sampling temperature, with their logprobs under the model.
    """
    alt_k = job.prompt_alt_tokens_k
    scores = PromptScores(logprobs=[None], topk=[None],
                          targets=None if job.target_prompt_logprobs is None else [],
                          alt_tokens=[] if alt_k else None, alt_logprobs=[] if alt_k else None)
    if len(prompt) < 2:
        return scores
    log_dist = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
    if job.include_prompt_logprobs:
        scores.logprobs += log_dist.gather(-1, prompt[1:, None])[:, 0].cpu().tolist()
    if job.topk_prompt_logprobs:
        scores.topk += _topk_lists(log_dist.cpu(), job.topk_prompt_logprobs)
    if job.target_prompt_logprobs is not None:
        wanted = torch.from_numpy(np.array(job.target_prompt_logprobs, dtype=np.int64)).to(logits.device)
        values = log_dist.gather(-1, wanted.clamp(min=0))
        scores.targets = values.masked_fill(wanted < 0, 0.0).cpu().tolist()
    if alt_k:
        temperature = job.params.temperature
        dist = log_dist.cpu()
        probs = torch.softmax(dist / temperature, dim=-1) if temperature > 0 else \
            torch.nn.functional.one_hot(dist.argmax(-1), dist.shape[-1]).float()
        drawn = torch.multinomial(probs, alt_k, replacement=True, generator=generator)
        scores.alt_tokens = drawn.tolist()
        scores.alt_logprobs = dist.gather(-1, drawn).tolist()
    return scores


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % 2**63)


def _forward(model, ids, mask, positions, cache, kwarg):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **({kwarg: cache} if cache is not None else {}))
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits, new_cache


@torch.no_grad()
def sample_batch(model, jobs: Sequence[SampleRequest], *, eos_token_ids: list[int], decode, max_context: int,
                 default_max_tokens: int = 1024, on_rows: RowsHook | None = None) -> list[SampleResult]:
    """Sample every request's continuations in shared forward passes; one SampleResult per request
    (their `request_id` and `adapter_id` are the caller's business).

    `on_rows` is told, before every forward, which job each row of its batch belongs to (the
    multi-LoRA layer uses it to give each row its request's adapter).
    """
    device = model.get_input_embeddings().weight.device
    kwarg = _cache_kwarg(model)
    states = [_start(job, eos_token_ids, max_context, default_max_tokens) for job in jobs]

    # prefill every prompt at once, left-padded to the longest
    longest = max(len(state.prompt) for state in states)
    ids = torch.zeros((len(jobs), longest), dtype=torch.long)
    mask = torch.zeros((len(jobs), longest), dtype=torch.long)
    for j, state in enumerate(states):
        ids[j, longest - len(state.prompt):] = torch.as_tensor(state.prompt, dtype=torch.long)
        mask[j, longest - len(state.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if on_rows is not None:
        on_rows(list(range(len(jobs))))
    padded = any(len(state.prompt) != longest for state in states)  # without padding, no mask is needed
    logits, cache = _forward(model, ids, mask if padded else None, positions, None, kwarg)
    for j, state in enumerate(states):
        start = longest - len(state.prompt)
        # the prompt's alternative draws use their own stream: asking for them leaves the samples unchanged
        state.scores = _score_prompt(logits[j, start:].float(), ids[j, start:], state.job, _seeded(state.seed + 1))
    last = logits[:, -1].float()

    # one row per sample; rows of a job are contiguous and in sample order
    row_job = [j for j, state in enumerate(states) for _ in state.active]
    row_sample = [i for state in states for i in state.active]
    if not row_job:
        return [_result(state) for state in states]
    index = torch.tensor(row_job, device=device)
    if len(row_job) != len(jobs):
        cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    next_pos = mask.sum(-1, keepdim=True)
    next_logits = last.index_select(0, index)
    step = 0
    while row_job:
        step += 1
        chosen = torch.empty(len(row_job), dtype=torch.long, device=device)
        keep: list[int] = []
        start = 0
        while start < len(row_job):
            j = row_job[start]
            end = start
            while end < len(row_job) and row_job[end] == j:
                end += 1
            picked = _draw(states[j], next_logits[start:end], row_sample[start:end], decode, step)
            chosen[start:end] = picked
            keep += [start + k for k, sample in enumerate(row_sample[start:end]) if sample in states[j].active]
            start = end
        if not keep:
            break
        if len(keep) < len(row_job):
            select = torch.tensor(keep, device=device)
            cache.batch_select_indices(select)
            mask, next_pos, chosen = mask.index_select(0, select), next_pos.index_select(0, select), chosen[select]
            row_job = [row_job[k] for k in keep]
            row_sample = [row_sample[k] for k in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if on_rows is not None:
            on_rows(row_job)
        logits, cache = _forward(model, chosen[:, None], mask if padded else None, next_pos, cache, kwarg)
        next_pos = next_pos + 1
        next_logits = logits[:, -1].float()
    return [_result(state) for state in states]


def _start(job: SampleRequest, eos_token_ids: list[int], max_context: int, default_max_tokens: int) -> _JobState:
    params = job.params
    prompt = [int(t) for t in job.prompt_tokens]
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    max_tokens = max(0, min(params.max_tokens or default_max_tokens, max_context - len(prompt)))
    stop = StopCriteria.from_params(params.stop, eos_token_ids)
    n = job.num_samples
    return _JobState(job=job, prompt=prompt, seed=seed, max_tokens=max_tokens, stop=stop, generator=_seeded(seed),
                     tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)], topk=[[] for _ in range(n)],
                     reasons=["length"] * n, longest_stop=max((len(s) for s in stop.strings), default=0),
                     active=list(range(n)) if max_tokens > 0 else [])


def _draw(state: _JobState, logits: torch.Tensor, samples: list[int], decode, step: int) -> torch.Tensor:
    """Choose the next token of a job's active rows; record tokens, logprobs and which rows finished."""
    params = state.job.params
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if params.temperature == 0:
        chosen = torch.argmax(logits, dim=-1)
    else:
        probs = torch.softmax(_filter_logits(logits, params), dim=-1).cpu()
        chosen = torch.multinomial(probs, 1, generator=state.generator)[:, 0].to(logits.device)
    chosen_lp = (logits.gather(-1, chosen[:, None]) - lse)[:, 0].cpu().tolist()
    k = state.job.topk_sample_logprobs
    step_topk = _topk_lists((logits - lse).cpu(), k) if k else None
    finished = set()
    for row, (token, lp) in enumerate(zip(chosen.cpu().tolist(), chosen_lp)):
        sample = samples[row]
        state.tokens[sample].append(token)
        state.logprobs[sample].append(lp)
        if step_topk is not None:
            state.topk[sample].append(step_topk[row])
        done = token in state.stop.token_ids
        if not done and state.stop.strings:
            tail = decode(state.tokens[sample][-(state.longest_stop + 8):])
            done = any(s in tail for s in state.stop.strings)
        if done:
            state.reasons[sample] = "stop"
            finished.add(sample)
        elif step >= state.max_tokens:
            finished.add(sample)
    state.active = [s for s in state.active if s not in finished]
    return chosen


def _result(state: _JobState) -> SampleResult:
    job, scores = state.job, state.scores
    k = job.topk_sample_logprobs
    sequences = [SampledSequence(tokens=t, logprobs=lp, stop_reason=r, topk_logprobs=tk if k else None)
                 for t, lp, r, tk in zip(state.tokens, state.logprobs, state.reasons, state.topk)]
    return SampleResult(
        sequences=sequences,
        prompt_logprobs=scores.logprobs if job.include_prompt_logprobs else None,
        topk_prompt_logprobs=scores.topk if job.topk_prompt_logprobs else None,
        target_prompt_logprobs=scores.targets,
        prompt_alt_tokens=scores.alt_tokens,
        prompt_alt_logprobs=scores.alt_logprobs,
    )
