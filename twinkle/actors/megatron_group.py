"""A megatron-core model's actor group: one Ray actor per rank, run as one backend.

The group is an `ActorGroup` of `MegatronWorker`s in one placement group (a bundle per GPU; per CPU
slot on CPU machines), started with the interpreter of megatron-core's own virtualenv (Ray
`runtime_env={"py_executable": ...}`), with torch.distributed across the ranks (NCCL on GPU, gloo
on CPU) and megatron's tensor-, pipeline- and data-parallel groups on top: ranks = DP x TP x PP.
`ModelParallelBackend` sends every call to every rank in the same order (the ranks run collectives
together). A forward_backward goes to each data-parallel replica with its shard of the data (the
sharding and merging of `RayBackend`); each replica answers from its last pipeline stage's TP rank 0,
the rank that computed the losses. Everything else answers from rank 0 (every rank holds every
adapter in full).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from twinkle.actors.group import ActorGroup
from twinkle.actors.remote_backend import RayBackend, _merge, _wait, split_data_parallel
from twinkle.actors.workers import ACTOR_CONCURRENCY, BackendWorker, _worker_threads
from twinkle.backends.base import BackendConfig, ForwardRequest, Outcomes, SampleRequest, StepRequest

PYTHON_ENV = "TWINKLE_MEGATRON_PYTHON"
MAKE_TARGET = "make megatron-venv"


def megatron_python() -> str:
    """The interpreter Ray starts megatron workers with: $TWINKLE_MEGATRON_PYTHON, else the repo's
    .venv-megatron (megatron-core pins its own stack, so it lives outside the main venv)."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        return configured
    return str(Path(__file__).resolve().parents[2] / ".venv-megatron" / "bin" / "python")


def megatron_runtime_env() -> dict:
    """Ray runtime_env for megatron workers; refuses, saying how to fix it, when the venv is missing."""
    python = megatron_python()
    if not Path(python).exists():
        raise RuntimeError(f"backend: megatron runs its workers with {python}, which does not exist: run "
                           f"`{MAKE_TARGET}` (or set ${PYTHON_ENV} to a Python with megatron-core, ray and twinkle)")
    return {"py_executable": python}


class MegatronWorker(BackendWorker):
    """One rank. The backend is built once torch.distributed and megatron's parallel state are up."""

    def __init__(self, rank: int, world_size: int, config: BackendConfig, tensor_parallel: int = 1,
                 pipeline_parallel: int = 1) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.rank = rank
        self.world_size = world_size
        self.config = _worker_threads(config)
        self.tensor_parallel = tensor_parallel
        self.pipeline_parallel = pipeline_parallel
        self.backend = None
        # before torch.distributed is up: transformers' save_pretrained writes nothing on a rank other
        # than 0 of an initialised group, so a built-in model generated after it would lack its weights
        from twinkle.modeling import resolve_model_path

        resolve_model_path(config.base_model, config.state_dir)
        if world_size == 1:  # the group only wires ranks together when there are several
            self.init_distributed(None)

    def init_distributed(self, address: str | None) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        from twinkle.backends.megatron.backend import MegatronBackend, ensure_model_parallel
        from twinkle.backends.transformers import resolve_device

        device = resolve_device(self.config.device)
        if address is None:
            ensure_model_parallel(self.tensor_parallel, device, self.pipeline_parallel)
        else:
            dist.init_process_group("nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo",
                                    init_method=address, rank=self.rank, world_size=self.world_size)
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tensor_parallel,
                                                     pipeline_model_parallel_size=self.pipeline_parallel)
        self.backend = MegatronBackend(self.config)

    def coordinates(self) -> dict[str, int]:
        return self.backend.coordinates()

    def optim_step(self, requests):
        """Gradients are summed over TP x PP inside each pass and over DP by the backend's step."""
        return self.call("optim_step", requests)


class ModelParallelBackend(RayBackend):
    """The group as one backend: every call runs on every rank; see the module docstring for who answers."""

    def __init__(self, group: ActorGroup) -> None:
        super().__init__(group)
        coords = _wait(group.call_all("coordinates"))
        self.replicas = max(c["dp_rank"] for c in coords) + 1
        self.replica_of = [c["dp_rank"] for c in coords]  # actor index -> its data-parallel replica
        last = max(c["pp_rank"] for c in coords)
        self.answering = [next(i for i, c in enumerate(coords) if c["dp_rank"] == d and c["pp_rank"] == last
                               and c["tp_rank"] == 0) for d in range(self.replicas)]

    def forward_backward(self, requests: Sequence[ForwardRequest]) -> Outcomes:
        if self.replicas == 1:
            return _wait(self.group.call_all("call", "forward_backward", list(requests)))[self.answering[0]]
        per_replica, rejected = split_data_parallel(requests, self.replicas, self._info["vocab_size"])
        answers = _wait(self.group.call_sharded("call", [(("forward_backward", per_replica[d]), {})
                                                         for d in self.replica_of]))
        by_replica = [answers[i] for i in self.answering]
        return {r.request_id: rejected.get(r.request_id) or _merge(r.request_id, per_replica, by_replica)
                for r in requests}

    def optim_step(self, requests: Sequence[StepRequest]) -> Outcomes:
        return _wait(self.group.call_all("optim_step", list(requests)))[0]

    def load_adapter(self, adapter_id: str, path) -> None:
        self._all("load_adapter", adapter_id, path)

    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        return self._first("sample", list(requests))


def start_megatron_group(config: BackendConfig, *, tensor_parallel: int, pipeline_parallel: int = 1,
                         data_parallel: int = 1, cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0,
                         strategy: str = "PACK", resources: dict | None = None,
                         ready_timeout_s: float = 300.0) -> ModelParallelBackend:
    """Place DP x TP x PP ranks, start them with megatron's interpreter, and return the group as a backend."""
    for name, size in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel),
                       ("data-parallel replicas (num_workers)", data_parallel)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    world = data_parallel * tensor_parallel * pipeline_parallel
    group = ActorGroup(MegatronWorker, world, cpus_per_worker=cpus_per_rank, gpus_per_worker=gpus_per_rank,
                       strategy=strategy, resources=resources, runtime_env=megatron_runtime_env(),
                       init_kwargs={"config": config, "tensor_parallel": tensor_parallel,
                                    "pipeline_parallel": pipeline_parallel},
                       max_concurrency=ACTOR_CONCURRENCY, name=None, ready_timeout_s=ready_timeout_s)
    try:
        return ModelParallelBackend(group)
    except BaseException:
        group.shutdown()
        raise
