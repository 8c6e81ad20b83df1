"""Starting and stopping a Twinkle server: Ray, the model schedulers, and the Serve application."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from twinkle.config import ServerConfig

log = logging.getLogger("twinkle.serve")

APP_NAME = "twinkle"


class RunningServer:
    """A started server; `stop()` tears down what `start_server` created."""

    def __init__(self, config: ServerConfig, schedulers: dict, embedded_ray: bool) -> None:
        self.config = config
        self.schedulers = schedulers
        self.embedded_ray = embedded_ray
        self.ray_client_server = None  # the child process serving ray.client_server_port, if opened
        self.front = None  # the FrontPlan in use (twinkle.http.front)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        from twinkle.actors.ray_client_port import close_client_port

        log.info("stopping Twinkle")
        close_client_port(self.ray_client_server)
        if self.embedded_ray:  # everything runs in the Ray this process started: stopping it stops all
            self._save_models()
            ray.shutdown()
            return
        # On a cluster Serve's controller and the schedulers are detached and would outlive this driver
        # (a `ray job stop` would leave the port taken): stop taking requests first, then save, then go.
        try:
            apps = serve.status().applications
            if set(apps) - {APP_NAME}:  # someone else's Serve apps share this cluster: remove only ours
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - keep tearing down
            log.warning("serve shutdown: %s", exc)
        self._save_models()
        for name, handle in self.schedulers.items():
            try:
                ray.kill(handle)
            except Exception as exc:  # noqa: BLE001
                log.warning("scheduler %s shutdown: %s", name, exc)

    def _save_models(self, timeout_s: float = 60.0) -> None:
        """Each scheduler saves its resident models and stops its workers; a restart restores them."""
        import ray

        try:
            ray.get([handle.shutdown.remote() for handle in self.schedulers.values()], timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a stop must finish; what was saved stays saved
            log.warning("saving models at shutdown: %s", exc)


def start_server(config: ServerConfig, *, on_ray_started=None) -> RunningServer:
    """Start (or join) Ray, the schedulers of every model, and the HTTP ingress; return when ready.

    `on_ray_started` runs right after Ray is up (Ray installs its own signal handlers there, so
    the CLI re-installs its own in that callback)."""
    import ray
    from ray import serve

    from twinkle.actors.runtime import init_ray
    from twinkle.actors.scheduler import spawn_scheduler
    from twinkle.http.app import TwinkleIngress
    from twinkle.http.front import front_problem, plan_front
    from twinkle.store import Store

    config.check_secure()
    config.check_runnable()
    state_dir = Path(config.state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"state_dir": str(state_dir)})
    Store(state_dir / "twinkle.db")  # create the schema before any actor opens it
    if not config.resolved_keys():
        log.warning("no API keys configured: the server is open to anyone who can reach %s (loopback only)",
                    config.host)

    started = time.time()
    init_ray(config.ray.address, num_cpus=config.ray.num_cpus, namespace=config.ray.namespace, log_to_driver=True)
    if on_ray_started is not None:
        on_ray_started()
    try:
        _check_cluster(config)
    except BaseException:
        if config.ray.address is None:
            ray.shutdown()
        raise
    schedulers = {
        model.name: spawn_scheduler(model, str(state_dir), config.timeouts,
                                    trust_remote_code=config.trust_remote_code, namespace=config.ray.namespace,
                                    quotas=config.quotas, limits=config.limits)
        for model in config.models
    }
    server = RunningServer(config, schedulers, embedded_ray=config.ray.address is None)
    try:
        infos = ray.get([handle.start.remote() for handle in schedulers.values()])
        for info in infos:
            log.info("model %s ready (%s, vocab %s)", info["name"], info.get("arch"), info.get("vocab_size"))
        # The access log (one line per request, written and flushed by the proxy) costs CPU that the
        # model workers need on small machines; it is off unless the config asks for it.
        # Serve's controller and proxy log at WARNING: at INFO the proxy writes every route of the app
        # on one ~6 KB line each time endpoints change; Twinkle logs its own start and stop.
        front = server.front = plan_front(config)
        serve.start(http_options={"host": config.host, "port": front.proxy_port}, proxy_location="HeadOnly",
                    logging_config={"enable_access_log": config.access_log, "log_level": "WARNING"},
                    controller_options=front.controller_options(config.serve_control_loop_s))
        node_resource = f"node:{ray.util.get_node_ip_address()}"
        deployment = TwinkleIngress.options(
            num_replicas=config.ingress_replicas,
            ray_actor_options={"num_cpus": 0, "resources": {node_resource: 0.001},
                               "runtime_env": front.replica_runtime_env()},
            logging_config={"enable_access_log": config.access_log},
        )
        serve.run(deployment.bind(config.model_dump()), name=APP_NAME, route_prefix="/")
        problem = front_problem(front.name, config.host, config.port)
        if problem:
            raise RuntimeError(problem)
        if config.ray.client_server_port is not None:
            from twinkle.actors.ray_client_port import open_client_port

            server.ray_client_server = open_client_port(config.ray.client_server_port)
    except BaseException:
        server.stop()
        raise
    _write_server_info(state_dir, server)
    log.info("Twinkle is serving on %s through %s (ready in %.1fs)", server.url, _front_words(config),
             time.time() - started)
    return server


def _front_words(config: ServerConfig) -> str:
    return {"direct": "Serve's direct ingress", "haproxy": "HAProxy",
            "proxy": "Serve's proxy"}[config.resolved_http_front]


def _check_cluster(config: ServerConfig) -> None:
    """Refuse at once what would otherwise hang or lose data on a cluster: a model no node (or set of
    nodes) can ever hold, and a state dir that other nodes do not share."""
    import ray

    from twinkle.actors.group import cluster_nodes, placement_problem
    from twinkle.actors.shared_dir import check_shared_state_dir, shared_dir_message

    nodes = cluster_nodes()
    if not config.ray.autoscaling:
        for model in config.models:
            count, bundle = model.placement()
            why = placement_problem(bundle, count, model.placement_strategy, nodes)
            if why:
                offered = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(node.items()) if not k.startswith(
                    ("node:", "memory", "object_store_memory", "accelerator_type:"))) for node in nodes)
                raise ValueError(
                    f"models[{model.name}] cannot be placed on this cluster: {why}. It needs {count} "
                    f"worker(s) x {bundle} ({model.placement_strategy}); the nodes offer [{offered}]. "
                    "Add nodes with those resources, lower num_workers / gpus_per_worker / resources, or set "
                    "ray.autoscaling: true if the cluster adds nodes on demand.")
    if config.ray.address is not None and config.ray.check_shared_state_dir and len(nodes) > 1:
        probe_started = time.time()
        problems = check_shared_state_dir(config.state_dir)
        if problems:
            raise ValueError(shared_dir_message(config.state_dir, problems))
        log.info("state_dir %s is shared by all %d nodes (probed in %.1fs)", config.state_dir, len(ray.nodes()),
                 time.time() - probe_started)


def _write_server_info(state_dir: Path, server: RunningServer) -> None:
    """state_dir/server.json: how to reach this server over HTTP and through Ray (power users)."""
    import json
    import os

    import ray

    client_port = server.config.ray.client_server_port
    info = {"url": server.url, "ray_address": ray.get_runtime_context().gcs_address,
            "ray_client_address": f"ray://127.0.0.1:{client_port}" if client_port else None,
            "namespace": server.config.ray.namespace, "pid": os.getpid(),
            "http_front": server.front.name if server.front else None,
            "serve_proxy_port": server.front.proxy_port if server.front else None,
            "models": [m.name for m in server.config.models]}
    (state_dir / "server.json").write_text(json.dumps(info, indent=2))


def serve_forever(config: ServerConfig) -> None:
    """Run in the foreground until Ctrl-C or SIGTERM, then stop cleanly."""
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    def install() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    install()
    server = start_server(config, on_ray_started=install)
    if stop.is_set():  # asked to stop while starting
        server.stop()
        return
    print(f"Twinkle is serving on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        print("Twinkle stopped.", flush=True)
