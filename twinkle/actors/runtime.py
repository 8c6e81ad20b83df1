"""Starting or joining Ray with settings that work on small machines and real clusters alike."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

# Options for the actors on the request path (schedulers, model workers). Ray records a task event
# for every actor call and ships them to the GCS for its state API and dashboard; a training step
# makes several calls, and on a small machine that bookkeeping competes with the model's cores.
# Ray Serve turns them off for its own actors the same way.
REQUEST_PATH_ACTOR_OPTIONS = {"enable_task_events": False}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, namespace: str = "twinkle",
             temp_dir: str | None = None, object_store_memory: int | None = None, log_to_driver: bool = False) -> None:
    """Start an embedded local Ray (address None) or join an existing cluster ("auto", "ray://...").

    An embedded Ray declares more logical CPUs than the machine has (at least 8): a placement group
    bundle is a slot for a worker, not a core, and a 2-core machine must still fit the Serve replicas
    plus a worker group. Token auth is off for the embedded cluster, which only listens locally.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts workers at nice 15; model workers are the server's main job, so they run at
    # normal priority (only applies to a Ray this process starts).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"namespace": namespace, "log_to_driver": log_to_driver, "include_dashboard": False}
    if address:
        kwargs.pop("include_dashboard")
        connect_ray(address, **kwargs)
        log.info("joined Ray cluster at %s", address)
        return
    cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
    kwargs.update(num_cpus=cpus, object_store_memory=object_store_memory or 512 * 1024 * 1024)
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    cores = os.cpu_count() or 1
    if cpus > cores:
        log.info("started an embedded Ray with %d logical CPUs on %d cores: a CPU here is a slot for a worker or "
                 "replica, not a core (ray.num_cpus in the config sets it)", cpus, cores)
    else:
        log.info("started an embedded Ray with %d CPUs", cpus)


def connect_ray(address: str, attempts: int = 3, **init_kwargs) -> None:
    """ray.init(address=...), retried: a Ray client server sometimes fails to start the per-client
    server it forks for a new connection ("Initialization failure from server"); a new connection
    attempt gets a new one."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except ConnectionError as exc:
            if attempt == attempts:
                raise
            log.warning("connecting to Ray at %s failed (%s); retrying", address, str(exc).splitlines()[0])
            try:
                ray.shutdown()
            except Exception:
                pass
            time.sleep(attempt)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
