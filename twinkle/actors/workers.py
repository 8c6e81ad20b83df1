"""The worker that lives in a Ray actor and holds a backend: one rank of a model's actor group.

`BackendWorker` builds its backend with the same factory as local mode and runs the backend's
entry points by name. It is a threaded actor with two threads, so the scheduler's sampling lane
runs beside a long training pass. With several ranks it is data-parallel: each rank computes a
shard, and gradients are summed across ranks (gloo on CPU, NCCL on GPU) before every step.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

from twinkle.backends.base import BackendConfig, SamplingBackend, TrainingBackend
from twinkle.backends.factory import make_training_backend
from twinkle.errors import TwinkleError

# What the scheduler may call on a worker: the backends' interfaces (plus read-only inspection).
CALLABLE = frozenset(
    name for cls in (TrainingBackend, SamplingBackend) for name in dir(cls) if not name.startswith("_")
) | {"adapter_weights", "stats"}
WORKER_THREADS = 2  # one for the train lane, one for the sample lane
ACTOR_CONCURRENCY = WORKER_THREADS + 1  # and one held by the scheduler's `watch` call


def _worker_threads(config: BackendConfig) -> BackendConfig:
    """The worker owns its cores: use the configured thread count, else every core of the node.

    Ray sets OMP_NUM_THREADS=1 for one-CPU actors; bundles here are slots, not cores, so the
    default follows the in-process backend and results match local mode exactly.
    """
    if config.num_threads:
        return config
    return replace(config, num_threads=os.cpu_count() or 1)


class BackendWorker:
    """One rank: a backend built from `config` (CUDA when `device` is auto and the bundle has a GPU)."""

    def __init__(self, rank: int, world_size: int, config: BackendConfig) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # tqdm bars ("Loading weights 0%..100%") are noise in a server log
        self.rank = rank
        self.world_size = world_size
        self.backend = make_training_backend(_worker_threads(config))

    def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), **self.backend.info()}

    def watch(self) -> None:
        """Never returns: the scheduler learns of this worker's death the moment this call fails."""
        threading.Event().wait()

    def call(self, method: str, *args, **kwargs):
        """Run a backend method by name; Twinkle errors travel back as themselves."""
        if method not in CALLABLE:
            raise TwinkleError(f"workers do not run {method!r}")
        try:
            return getattr(self.backend, method)(*args, **kwargs)
        except TwinkleError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{method} failed on rank {self.rank}: {type(exc).__name__}: {exc}") from None

    def timed(self, entry: str, *args, **kwargs) -> tuple[object, float]:
        """(result, seconds this rank spent) of `call(entry, ...)`, or of `optim_step` for that entry: the
        scheduler tells the workers' own time apart from the Ray hops around it (Server-Timing `compute`)."""
        started = time.perf_counter()
        result = self.optim_step(*args) if entry == "optim_step" else self.call(entry, *args, **kwargs)
        return result, time.perf_counter() - started

    def distributed_address(self) -> str:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{socket.gethostbyname(socket.gethostname())}:{port}"

    def init_distributed(self, address: str) -> None:
        import torch
        import torch.distributed as dist

        on_gpu = torch.cuda.is_available() and self.backend.info().get("device", "cpu").startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=address, rank=self.rank,
                                world_size=self.world_size)

    def optim_step(self, requests):
        """Sum the adapters' gradients across ranks, then step on every rank."""
        if self.world_size > 1:
            import torch.distributed as dist

            self.backend.sync_gradients([r.adapter_id for r in requests], dist.all_reduce)
        return self.call("optim_step", requests)
