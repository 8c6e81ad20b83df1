"""Worker classes that live in Ray actors and wrap the core engine.

`TrainWorker` holds the base model with its tenants' adapters and runs training (data-parallel
across the ranks of its group when there are several). `SampleWorker` holds a base model for
sampling only and loads adapters from checkpoint folders on demand.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

from twinkle.engine import Engine, EngineConfig
from twinkle.errors import TwinkleError


def _worker_threads(config: EngineConfig) -> EngineConfig:
    """The worker owns its cores: use the configured thread count, else every core of the node.

    Ray sets OMP_NUM_THREADS=1 for one-CPU actors; bundles here are slots, not cores, so the
    default follows the in-process engine and results match local mode exactly.
    """
    if config.num_threads:
        return config
    return replace(config, num_threads=os.cpu_count() or 1)


class _EngineWorker:
    def __init__(self, rank: int, world_size: int, engine_config: EngineConfig) -> None:
        import torch

        self.rank = rank
        self.world_size = world_size
        config = _worker_threads(engine_config)
        if config.device == "auto":
            config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine(config)

    def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), **self.engine.info()}

    def call(self, method: str, *args, **kwargs):
        """Run an engine method by name; Twinkle errors travel back as themselves."""
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        except TwinkleError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{method} failed on rank {self.rank}: {type(exc).__name__}: {exc}") from None


class TrainWorker(_EngineWorker):
    """One rank of a training group: an `Engine`, plus gradient all-reduce across ranks."""

    def distributed_address(self) -> str:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{socket.gethostbyname(socket.gethostname())}:{port}"

    def init_distributed(self, address: str) -> None:
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and self.engine.config.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=address, rank=self.rank, world_size=self.world_size)

    def optim_step(self, adapter_id: str, adam=None):
        """All-reduce (sum) the adapter's gradients across ranks, then step on every rank."""
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            state = self.engine.adapters[adapter_id]
            for _, param in state.params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
        return self.call("optim_step", adapter_id, adam)


class SampleWorker(_EngineWorker):
    """A sampling replica of a base model; adapters come from checkpoint folders (see ModelService)."""
