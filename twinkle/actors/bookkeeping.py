"""What the store learns when a request succeeds, declared per API method.

The scheduler looks up the method's recorder here and calls it after the result is in; methods
without one change nothing in the store besides their future. Training requests also leave a point
in their run's metrics history (`history_point`), which the scheduler writes with their result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twinkle.actors.work import WorkItem
from twinkle.checkpoint import folder_size
from twinkle.ids import is_adhoc_sampler
from twinkle.store import Store

Recorder = Callable[[Store, WorkItem, Any, str], None]  # (store, request, result, base model name)


def _model_created(store: Store, item: WorkItem, result, base_model: str) -> None:
    rec = item.record
    store.create_model(item.target_id, item.tenant, session_id=rec.get("session_id"), base_model=base_model,
                       lora=result.lora.model_dump(), run_dir=rec["run_dir"], user_metadata=rec.get("user_metadata"))


def _checkpoint_saved(store: Store, item: WorkItem, result, base_model: str) -> None:
    kind = "training" if item.args.kind == "weights" else "sampler"
    store.add_checkpoint(item.target_id, f"{item.args.kind}/{item.args.name}", item.tenant, kind=kind,
                         folder=result.path, size_bytes=folder_size(result.path),
                         ttl_seconds=item.record.get("ttl_seconds"), user_metadata=item.record.get("user_metadata"))


def _sampler_created(store: Store, item: WorkItem, result, base_model: str) -> None:
    if is_adhoc_sampler(result.sampler_id):  # lives for one request; nobody looks it up
        return
    store.create_sampler(result.sampler_id, item.tenant, session_id=item.record.get("session_id"),
                         base_model=base_model, model_path=item.record.get("tinker_path"), folder=result.model_path)


def _snapshot_sampler_created(store: Store, item: WorkItem, result, base_model: str) -> None:
    _sampler_created(store, item, result, base_model)
    if item.args.name is not None:  # a named snapshot is a sampler checkpoint like any other
        store.add_checkpoint(item.target_id, f"sampler_weights/{item.args.name}", item.tenant, kind="sampler",
                             folder=result.model_path, size_bytes=folder_size(result.model_path))


def _model_closed(store: Store, item: WorkItem, result, base_model: str) -> None:
    store.set_model_status(item.target_id, "unloaded")


RECORDERS: dict[str, Recorder] = {
    "create_model": _model_created,
    "create_model_from_checkpoint": _model_created,
    "save": _checkpoint_saved,
    "create_sampler": _sampler_created,
    "create_sampler_from_model": _snapshot_sampler_created,
    "close_model": _model_closed,
}


def record(store: Store, item: WorkItem, result, base_model: str) -> None:
    recorder = RECORDERS.get(item.method)
    if recorder is not None:
        recorder(store, item, result, base_model)


HISTORY_METHODS = frozenset({"forward_backward", "step"})


def history_point(item: WorkItem, result, *, step: int, seconds: float, base_model: str) -> dict | None:
    """The metrics-history point of a training request (the loss of a forward_backward, the
    optimizer step of a step), or None for other methods and accumulation-only steps.

    `step` is the model's optimizer steps so far; `seconds` the wall time of the batch it ran in."""
    if item.method not in HISTORY_METHODS:
        return None
    metrics = {k: float(v) for k, v in (getattr(result, "metrics", None) or {}).items()
               if isinstance(v, (int, float))}
    if item.method == "step":
        if not metrics.get("applied", 1.0):
            return None  # a micro step of gradient accumulation: no optimizer step happened
        step = int(metrics.get("step", step))
    return {"model_id": item.target_id, "tenant": item.tenant, "base_model": base_model, "kind": item.method,
            "step": step, "tokens": item.cost if item.method == "forward_backward" else 0,
            "seconds": seconds, "metrics": metrics}
