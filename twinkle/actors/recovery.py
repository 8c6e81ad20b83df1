"""What a scheduler does when state is lost: a worker died, or the server restarted.

- `is_worker_loss` tells a dead worker (crash, OOM kill, node loss) from a failing request.
- `watch_group` notices a worker's death at once, not at the next request: each worker holds one
  call that never returns, which fails the moment its process dies.
- `newest_state` finds the newest saved state of a model: its offload folder (written when it
  went idle, at shutdown and by autosave) or its newest training checkpoint.
- `adoption_args` rebuilds a model's API settings from such a folder, so a model the server only
  knows from its store (after a restart) comes back as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from twinkle import checkpoint as ckpt
from twinkle.api.spec import CreateModelArgs
from twinkle.types import AdamParams, LoraConfig, LRSchedule

log = logging.getLogger(__name__)


def is_worker_loss(exc: BaseException) -> bool:
    """Did this call fail because the worker process is gone (rather than because of the request)?"""
    from ray import exceptions

    losses = (exceptions.RayActorError, exceptions.WorkerCrashedError, exceptions.NodeDiedError,
              exceptions.OutOfMemoryError)
    cause = getattr(exc, "cause", None)
    return isinstance(exc, losses) or isinstance(cause, losses)


async def watch_group(group, on_loss: Callable[[object, BaseException], None]) -> None:
    """Wait on every worker's never-returning `watch` call; the first that fails reports the loss
    (a group shut down on purpose fails them too: `on_loss` must ignore groups no longer in use)."""
    try:
        await asyncio.gather(*(actor.watch.remote() for actor in group.actors))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure of a watch call means the worker is gone
        await asyncio.get_running_loop().run_in_executor(None, on_loss, group, exc)


def saved_step(folder: Path) -> int | None:
    """The optimizer step a saved folder holds (None if it cannot resume training)."""
    try:
        state = ckpt.read_json(folder / ckpt.TRAINER_STATE)
    except (OSError, ValueError):
        return None
    if not state.get("has_optimizer") or not (folder / ckpt.ADAPTER_WEIGHTS).exists():
        return None
    return int((state.get("train_state") or {}).get("step", 0))


def newest_state(candidates: list[Path]) -> tuple[Path, int] | None:
    """The candidate folder with the most optimizer steps (the most recent write on a tie)."""
    found = [(step, folder.stat().st_mtime, folder) for folder in candidates
             if folder.is_dir() and (step := saved_step(folder)) is not None]
    if not found:
        return None
    step, _, folder = max(found)
    return folder, step


def recovery_note(folder: Path | None, saved: int | None, live: int | None) -> str:
    """What a tenant is told about a model whose live state was lost."""
    if folder is None:
        return ("the worker holding this model died and the server had no saved state of it (it had not yet "
                "been checkpointed or autosaved); create a new model, or load one of your checkpoints")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(folder.stat().st_mtime))
    lost = ""
    if live is not None and live > saved:
        lost = f"; step {live} was lost" if live == saved + 1 else f"; steps {saved + 1}-{live} were lost"
    return f"the worker holding this model died; it was restored from its state saved at step {saved} ({when}){lost}"


def adoption_args(folder: Path, base_model: str) -> CreateModelArgs:
    """A model's creation settings as saved beside its weights (LoRA, optimizer, schedule, loss)."""
    state = ckpt.read_json(folder / ckpt.TRAINER_STATE)
    api = (state.get("metadata") or {}).get("api", {})
    return CreateModelArgs(
        base_model=base_model, lora=LoraConfig(**state["lora"]), optimizer=AdamParams(**(state.get("adam") or {})),
        schedule=LRSchedule(**state["schedule"]) if state.get("schedule") else None,
        **{k: v for k, v in api.items() if k in ("loss", "loss_config", "grad_accumulation_steps")})
