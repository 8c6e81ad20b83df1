"""How HTTP requests reach the ingress replica: Ray Serve's proxy, direct ingress, or HAProxy.

Serve's default front is a proxy actor that forwards every request to the replica: one more process,
two more serialisations and ~5 ms of CPU per request, which on a small machine competes with the
model's workers. Ray Serve 2.60 can skip that hop:
- `direct`: the one ingress replica listens on the server's port itself (Serve's direct ingress,
  bound to the configured host, so the loopback default stays loopback). Serve still runs its proxy
  on the head; it gets a free port of its own that nothing needs.
- `haproxy`: HAProxy listens on the server's port and balances over the ingress replicas, each
  listening on a port of its own on every interface (for several ingress replicas).
- `proxy`: Serve's proxy on the server's port, as before (the most widely deployed path).

Serve reads these switches from environment variables in its controller and replica processes;
they travel there through Serve's interfaces (`controller_options` and the replica's
`runtime_env`), never through this process's environment.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from twinkle.config import ServerConfig

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_PORT_MIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
DIRECT_PORT_MAX_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"  # exclusive
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# Serve keeps a stopping direct-ingress replica listening this long (30 s by default) so an external
# load balancer notices; Twinkle's own front is the replica itself, so a short drain is enough.
DRAIN_S = "2"
QUARANTINE_ENV = "RAY_SERVE_PORT_QUARANTINE_S"
# Serve holds a released replica port back for minutes (so a load balancer stops sending to it). The
# direct front has exactly one port: a replacement replica (after a crash) must get it back at once.
QUARANTINE_S = "0"
CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"  # `serve_control_loop_s` in the server config


@dataclass
class FrontPlan:
    """What `serve.start` and the ingress deployment need for one front."""

    name: str
    proxy_port: int  # where Serve's proxy (or HAProxy, for `haproxy`) listens
    env: dict[str, str] = field(default_factory=dict)  # for the Serve controller and the ingress replicas

    def controller_options(self, control_loop_s: float | None = None) -> dict | None:
        """Serve's controller options: this front's switches, and how often its control loop runs."""
        env = dict(self.env)
        if control_loop_s is not None:
            env[CONTROL_LOOP_ENV] = str(control_loop_s)
        return {"runtime_env": {"env_vars": env}} if env else None

    def replica_runtime_env(self) -> dict:
        return {"env_vars": dict(self.env)} if self.env else {}


def plan_front(config: ServerConfig) -> FrontPlan:
    """The Serve options that put `config.resolved_http_front` on `config.host:config.port`."""
    front = config.resolved_http_front
    if front == "proxy":
        return FrontPlan(front, config.port)
    if front == "haproxy":
        return FrontPlan(front, config.port, {HAPROXY_ENV: "1", DIRECT_INGRESS_ENV: "1", DRAIN_ENV: DRAIN_S})
    # direct: the replica takes exactly the configured port (Serve's port range is [min, max)).
    return FrontPlan(front, free_port(config.host), {
        DIRECT_INGRESS_ENV: "1", DIRECT_PORT_MIN_ENV: str(config.port), DIRECT_PORT_MAX_ENV: str(config.port + 1),
        DRAIN_ENV: DRAIN_S, QUARANTINE_ENV: QUARANTINE_S})


def free_port(host: str) -> int:
    """A port free on `host` now, for Serve's proxy when the replica serves the real port."""
    bind_host = "127.0.0.1" if host in ("localhost", "") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((bind_host, 0))
        return sock.getsockname()[1]


def front_problem(front: str, host: str, port: int, timeout_s: float = 60.0) -> str | None:
    """None once `host:port` answers Twinkle's health check; otherwise why not, in words for the operator.

    A Serve controller that was already running on a joined cluster keeps the front it started with
    (Serve applies controller options only when it creates the controller), so the port is checked
    rather than assumed."""
    import time
    import urllib.error
    import urllib.request

    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # a wildcard: ask locally
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/api/v1/healthz", timeout=5) as reply:
                if reply.status == 200:
                    return None
                last = f"HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.25)
    return (f"the ingress did not answer on {url} within {timeout_s:.0f}s with http_front '{front}' ({last}). "
            "If this Ray cluster already ran Ray Serve with another front, run `serve shutdown` first or set "
            "http_front: proxy")
