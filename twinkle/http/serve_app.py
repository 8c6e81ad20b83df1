"""Twinkle as a Ray Serve application built from a Serve config (`serve deploy`, KubeRay RayService).

`twinkle serve` (and `ray job submit -- twinkle serve`) remains the tested way to run the server;
this builder is for operators whose platform only takes Serve configs. Serve configs cannot ship a
local working dir, so Twinkle must be installed in the image. The model schedulers are detached
actors pinned to the head node next to the SQLite store, as with `twinkle serve`; deleting the
Serve app does not stop them (`serve shutdown` followed by a Ray restart does).
"""

from __future__ import annotations

from pathlib import Path

HEAD = "node:__internal_head__"  # a resource only the head node has


def _start_schedulers(config_data: dict) -> list[dict]:
    """Runs on the head node: create the store's schema and start every model's scheduler."""
    import ray

    from twinkle.actors.scheduler import spawn_scheduler
    from twinkle.config import ServerConfig
    from twinkle.store import Store

    config = ServerConfig.model_validate(config_data)
    Store(Path(config.state_dir) / "twinkle.db")
    handles = [spawn_scheduler(model, config.state_dir, config.timeouts, trust_remote_code=config.trust_remote_code,
                               namespace=config.ray.namespace, quotas=config.quotas, limits=config.limits)
               for model in config.models]
    return ray.get([handle.start.remote() for handle in handles])


def app(args: dict):
    """Serve application builder: `import_path: twinkle.http.serve_app:app`, `args: {config: PATH}`.

    PATH is a Twinkle server config inside the image (its host/port are ignored: Serve's
    http_options decide them; `ray.address` must be unset or 'auto')."""
    import ray

    from twinkle.config import load_config
    from twinkle.http.app import TwinkleIngress

    config = load_config(args["config"])
    config.check_secure()
    config.check_runnable()
    state_dir = Path(config.state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"state_dir": str(state_dir)})
    starter = ray.remote(num_cpus=0, resources={HEAD: 0.001})(_start_schedulers)
    ray.get(starter.remote(config.model_dump()))
    return TwinkleIngress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD: 0.001}},
    ).bind(config.model_dump())
