"""A group of N stateful Ray actors of one worker class, held in one placement group.

One bundle per worker (a GPU each on GPU hosts, a CPU slot on CPU-only hosts, plus any custom
resources such as a node label). Calls go to every rank, to the first, or one shard per rank; the
caller collects the ObjectRefs. `placement_problem` says, from the nodes' total resources, why a
group could never be placed, so a server refuses at start instead of waiting on Ray forever.
"""

from __future__ import annotations

import logging
from typing import Any

from twinkle.actors.runtime import REQUEST_PATH_ACTOR_OPTIONS

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """A group's bundles were not placed in time; the message says why and what is available."""


def _fits(node: dict[str, float], bundle: dict[str, float], copies: int = 1) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= amount * copies for key, amount in bundle.items())


def _copies(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles one node holds by its total resources."""
    return int(min(node.get(key, 0.0) / amount + 1e-9 for key, amount in bundle.items() if amount > 0))


def placement_problem(bundle: dict[str, float], count: int, strategy: str,
                      nodes: list[dict[str, float]]) -> str | None:
    """Why `count` x `bundle` under `strategy` can never be placed on nodes of these *total* resources
    (None when it can: busy resources free up, missing ones never do). The answer names the missing
    resources so an operator knows which nodes to add or which setting to lower."""
    wanted = {key: amount for key, amount in bundle.items() if amount > 0}
    if not wanted:
        return None
    absent = sorted(key for key in wanted if not any(node.get(key, 0.0) > 0 for node in nodes))
    if absent:
        return f"no node offers {', '.join(absent)}"
    if not any(_fits(node, wanted) for node in nodes):
        short = sorted({key for key in wanted if not any(node.get(key, 0.0) + 1e-9 >= wanted[key] for node in nodes)})
        need = ", ".join(f"{key} {wanted[key]:g}" for key in short or sorted(wanted))
        return f"no single node offers one worker's {need} together"
    if strategy == "STRICT_PACK":
        if not any(_fits(node, wanted, count) for node in nodes):
            need = ", ".join(f"{key} {amount * count:g}" for key, amount in sorted(wanted.items()))
            return f"STRICT_PACK needs one node with {need} (all {count} workers together)"
        return None
    if strategy == "STRICT_SPREAD":
        holders = sum(1 for node in nodes if _fits(node, wanted))
        return None if holders >= count else (
            f"STRICT_SPREAD needs {count} distinct nodes each with {_describe(wanted)}; only {holders} exist")
    room = sum(_copies(node, wanted) for node in nodes)
    if room < count:
        totals = ", ".join(f"{key} {sum(n.get(key, 0.0) for n in nodes):g}/{amount * count:g}"
                           for key, amount in sorted(wanted.items()))
        return f"{count} workers need more than the cluster has in all (have/need: {totals})"
    return None


def _describe(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {amount:g}" for key, amount in sorted(bundle.items())) + "}"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


class ActorGroup:
    def __init__(self, worker_cls: type, num_workers: int = 1, *, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, strategy: str = "PACK", init_kwargs: dict | None = None,
                 name: str | None = None, namespace: str | None = None, detached: bool = False,
                 ready_timeout_s: float = 120.0, runtime_env: dict | None = None,
                 max_concurrency: int = 1, resources: dict[str, float] | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_workers < 1:
            raise ValueError("an actor group needs at least one worker")
        self.num_workers = num_workers
        self.name = name
        bundle: dict[str, float] = {"CPU": cpus_per_worker, **(resources or {})}
        if gpus_per_worker:
            bundle["GPU"] = gpus_per_worker
        self.placement_group = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy,
                                               name=f"{name}-pg" if name else "")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            why = placement_problem(bundle, num_workers, strategy, cluster_nodes())
            raise PlacementError(
                f"could not place {num_workers} x {_describe(bundle)} ({strategy}) within {ready_timeout_s:.0f}s: "
                f"{why or 'the resources are held by other work'}; the cluster has "
                f"{_describe(ray.available_resources())} available")
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
            # the actor takes its bundle's CPU/GPU; custom resources stay reserved by the bundle itself
            options: dict[str, Any] = dict(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                scheduling_strategy=strategy_cls(self.placement_group, placement_group_bundle_index=rank),
                max_concurrency=max_concurrency, **REQUEST_PATH_ACTOR_OPTIONS,
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
