"""A group of N stateful Ray actors of one worker class, held in one placement group.

One bundle per worker (a GPU each on GPU hosts, a CPU slot on CPU-only hosts). Calls go to every
rank, to the first, or one shard per rank; the caller collects the ObjectRefs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ActorGroup:
    def __init__(self, worker_cls: type, num_workers: int = 1, *, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, strategy: str = "PACK", init_kwargs: dict | None = None,
                 name: str | None = None, namespace: str | None = None, detached: bool = False,
                 ready_timeout_s: float = 120.0, runtime_env: dict | None = None,
                 max_concurrency: int = 1) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_workers < 1:
            raise ValueError("an actor group needs at least one worker")
        self.num_workers = num_workers
        self.name = name
        bundle: dict[str, float] = {"CPU": cpus_per_worker}
        if gpus_per_worker:
            bundle["GPU"] = gpus_per_worker
        self.placement_group = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy,
                                               name=f"{name}-pg" if name else "")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"could not place {num_workers} x {bundle} ({strategy}) within {ready_timeout_s:.0f}s; "
                f"the cluster has {ray.available_resources()} available")
        self.actors = []
        try:
            self._start_actors(ray, worker_cls, num_workers, cpus_per_worker, gpus_per_worker, name, namespace,
                               detached, runtime_env, init_kwargs, PlacementGroupSchedulingStrategy, max_concurrency)
            if num_workers > 1 and hasattr(worker_cls, "init_distributed"):
                self._setup_distributed()
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, ray, worker_cls, num_workers, cpus_per_worker, gpus_per_worker, name, namespace,
                      detached, runtime_env, init_kwargs, strategy_cls, max_concurrency) -> None:
        remote_cls = ray.remote(worker_cls)
        for rank in range(num_workers):
            options: dict[str, Any] = dict(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                scheduling_strategy=strategy_cls(self.placement_group, placement_group_bundle_index=rank),
                max_concurrency=max_concurrency,
            )
            if name:
                options["name"] = f"{name}-rank{rank}"
            if namespace:
                options["namespace"] = namespace
            if detached:
                options["lifetime"] = "detached"
            if runtime_env:
                options["runtime_env"] = runtime_env
            self.actors.append(remote_cls.options(**options).remote(rank=rank, world_size=num_workers,
                                                                    **(init_kwargs or {})))

    def _setup_distributed(self) -> None:
        """Give the ranks a torch.distributed (gloo/nccl) group for data-parallel gradients."""
        import ray

        address = ray.get(self.actors[0].distributed_address.remote())
        ray.get([actor.init_distributed.remote(address) for actor in self.actors])

    def call_all(self, method: str, *args, **kwargs) -> list:
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_first(self, method: str, *args, **kwargs):
        return getattr(self.actors[0], method).remote(*args, **kwargs)

    def call_sharded(self, method: str, shards: list[tuple[tuple, dict]]) -> list:
        """Call rank i with shards[i] = (args, kwargs); len(shards) must equal the group size."""
        if len(shards) != self.num_workers:
            raise ValueError(f"{len(shards)} shards for {self.num_workers} ranks")
        return [getattr(actor, method).remote(*a, **kw) for actor, (a, kw) in zip(self.actors, shards)]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            self.actors = []
            return
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        try:
            remove_placement_group(self.placement_group)
        except Exception:
            pass
        self.actors = []
