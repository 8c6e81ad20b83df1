"""Is the state dir shared by every node? Checked once at start on a multi-node cluster.

Workers on other nodes write checkpoints and offloaded adapters under `state_dir`, and the
scheduler (next to the SQLite store, on the ingress node) reads them back; the store itself never
leaves that node. Without a shared filesystem (NFS, EFS, Filestore, a ReadWriteMany volume) a
checkpoint saved on one node would be missing on another, so the server refuses to start instead.
The probe: a task pinned to each other node writes a file with a fresh token, and this process
reads it back.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

PROBE_DIR = ".node-probes"


def _write_probe(path: str, token: str) -> str:
    """Runs on the probed node: write the token atomically; returns "" or what went wrong."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as handle:
            handle.write(token)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return ""
    except OSError as exc:
        return f"{socket.gethostname()} could not write {path}: {exc}"


def check_shared_state_dir(state_dir: str, timeout_s: float = 60.0) -> list[str]:
    """Probe every other alive node; returns one line per node that does not share `state_dir`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [node for node in ray.nodes() if node.get("Alive") and node["NodeID"] != here]
    if not nodes:
        return []
    probe = ray.remote(num_cpus=0, max_retries=0)(_write_probe)
    base = Path(state_dir) / PROBE_DIR
    checks = []
    for node in nodes:
        token = secrets.token_hex(8)
        path = base / f"{node['NodeID']}-{token}"
        ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            str(path), token)
        checks.append((node, path, token, ref))
    problems = []
    for node, path, token, ref in checks:
        where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]})"
        try:
            error = ray.get(ref, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a node that cannot run the probe is a finding too
            problems.append(f"{where}: the probe did not run ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            continue
        if error:
            problems.append(f"{where}: {error}")
            continue
        try:
            seen = path.read_text()
        except OSError:
            seen = None
        finally:
            path.unlink(missing_ok=True)
        if seen != token:
            problems.append(f"{where} wrote {path}, but this node does not see that file")
    return problems


def shared_dir_message(state_dir: str, problems: list[str]) -> str:
    return (f"state_dir {state_dir} is not shared by every node of the cluster:\n  " + "\n  ".join(problems) +
            "\nWorkers on those nodes would save checkpoints this node cannot read. Mount one shared filesystem "
            "(NFS, EFS, Filestore, a ReadWriteMany volume) at the same path on every node and point state_dir "
            "at it (see clusters/README.md), or set ray.check_shared_state_dir: false if you know better.")
