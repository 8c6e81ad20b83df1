"""Sampling from a prompt that holds images, on a vision-language model.

Qwen-VL models place image tokens with multimodal rotary positions (M-RoPE) computed from the whole
sequence, and keep the offset of later positions as state on the model object between cached
decoding steps. That state is not safe beside a training pass on another thread, so an image
prompt is decoded without a KV cache: each step runs the full sequence (prompt + what each sample
has drawn so far). The logprobs are therefore exactly those a `forward` of the same sequence
reports. It costs O(length^2) per sample, which is fine for short answers about an image; cached
M-RoPE decoding is the refinement for long ones. Token choice, seeds, stops and scores reuse
`twinkle.sampling`, so a request means the same thing on either path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twinkle.backends.base import SampleRequest
from twinkle.sampling import RowsHook, _draw, _result, _score_prompt, _seeded, _start
from twinkle.types import SampleResult

ForwardKwargs = Callable[[torch.Tensor], dict]  # input ids (rows, length) -> pixel arguments for those rows


@torch.no_grad()
def sample_with_images(model, job: SampleRequest, pixel_kwargs: ForwardKwargs, *, eos_token_ids: list[int],
                       decode, max_context: int, default_max_tokens: int = 1024,
                       on_rows: RowsHook | None = None) -> SampleResult:
    """Sample `job.num_samples` continuations of one image prompt; `on_rows` as in `sample_batch`."""
    device = model.get_input_embeddings().weight.device
    state = _start(job, eos_token_ids, max_context, default_max_tokens)
    prompt = torch.as_tensor(state.prompt, dtype=torch.long, device=device)[None]
    if on_rows is not None:
        on_rows([0])
    logits = model(input_ids=prompt, use_cache=False, **pixel_kwargs(prompt)).logits[0].float()
    state.scores = _score_prompt(logits, prompt[0], job, _seeded(state.seed + 1))
    rows = prompt.repeat(len(state.active), 1)
    next_logits = logits[-1:].expand(len(state.active), -1)
    step = 0
    while state.active:
        step += 1
        samples = list(state.active)
        chosen = _draw(state, next_logits, samples, decode, step)
        keep = [k for k, sample in enumerate(samples) if sample in state.active]
        if not keep:
            break
        select = torch.tensor(keep, device=device)
        rows = torch.cat([rows.index_select(0, select), chosen.index_select(0, select)[:, None]], dim=1)
        if on_rows is not None:
            on_rows([0] * len(keep))
        next_logits = model(input_ids=rows, use_cache=False, **pixel_kwargs(rows)).logits[:, -1].float()
    return _result(state)
