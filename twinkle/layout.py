"""Where a server keeps its files under the state dir: one module, so every layer agrees.

    <state_dir>/twinkle.db                                          the store (SQLite)
    <state_dir>/models/<builtin>/                                   generated built-in models
    <state_dir>/checkpoints/<tenant dir>/<run dir>/<kind>/<name>/   PEFT folders (kind: weights | sampler_weights)
    <state_dir>/offload/<tenant dir>/<run dir>/                     idle adapters moved out of memory

Tenant and run folders are hashes of their ids, so user-chosen names never become paths except
as the last, checked component.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from twinkle.paths import safe_join

STORE_FILE = "twinkle.db"
SNAPSHOT_PREFIX = "snapshot-step"  # unnamed sampler snapshots: temporary, deleted with their session
SNAPSHOTS_KEPT = 32  # unnamed snapshots kept per model (one per RL step); older ones are deleted


def tenant_dir(tenant: str) -> str:
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:16]


def run_dir_name(model_id: str) -> str:
    return "run-" + hashlib.sha256(model_id.encode()).hexdigest()[:20]


def checkpoint_folder(state_dir: str | Path, tenant: str, run_dir: str, kind: str, name: str) -> Path:
    return safe_join(Path(state_dir) / "checkpoints", tenant_dir(tenant), run_dir, kind, name)


def sampler_weights_folder(state_dir: str | Path, tenant: str, run_dir: str) -> Path:
    return safe_join(Path(state_dir) / "checkpoints", tenant_dir(tenant), run_dir, "sampler_weights")


def offload_folder(state_dir: str | Path, tenant: str, run_dir: str) -> Path:
    return safe_join(Path(state_dir) / "offload", tenant_dir(tenant), run_dir)
