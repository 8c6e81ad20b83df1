"""A Ray-client port (`ray://127.0.0.1:PORT`) on the Ray a server embeds, for Twinkle's Ray mode.

`ray start --head --ray-client-server-port` opens one on a cluster; a Ray started by `ray.init()`
has none. Here the same server Ray runs for `ray start` (its proxy mode: one specific server per
client connection) is started as a child process against this Ray, on loopback only: the Ray
client protocol has no authentication, so whoever reaches the port controls the cluster.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def open_client_port(port: int, timeout_s: float = 30.0) -> subprocess.Popen:
    """Start the Ray client server for the connected (embedded) Ray; return once it accepts connections."""
    import ray

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    agent = f"http://{node['NodeManagerAddress']}:{node['RuntimeEnvAgentPort']}"
    command = [sys.executable, "-m", "ray.util.client.server", "--address", context.gcs_address,
               "--host", LOOPBACK, "--port", str(port), "--mode", "proxy",
               "--runtime-env-agent-address", agent, "--node-id", node_id]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray client server on port {port} exited at start (code {process.returncode}): "
                               "is the port taken? choose another ray.client_server_port")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                log.info("Ray client port open: ray://%s:%d (Twinkle's Ray mode; loopback only)", LOOPBACK, port)
                return process
        except OSError:
            time.sleep(0.2)
    close_client_port(process)
    raise RuntimeError(f"the Ray client server did not open port {port} within {timeout_s:.0f}s")


def close_client_port(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
