"""Checkpoint folders written atomically.

A checkpoint is a standard PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`)
that peft and vLLM load as they are, optionally with `optimizer.pt` and `trainer_state.json` beside
it. Everything is written into a temporary sibling folder and renamed into place, so a reader sees
either the old checkpoint or the complete new one, never a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twinkle.errors import ConflictError, NotFoundError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
GRADIENTS = "gradients.pt"
TRAINER_STATE = "trainer_state.json"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise ConflictError(f"checkpoint {target.name!r} already exists; pass overwrite=True or pick another name",
                            field="path")
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def require_adapter_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise NotFoundError(f"no PEFT adapter (adapter_config.json + adapter_model.safetensors) in {folder.name!r}",
                            field="path")
    return folder


def folder_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def base_model_of(path: str | os.PathLike) -> str | None:
    """The base model a checkpoint was trained on, as recorded in the folder."""
    folder = Path(path)
    if (folder / TRAINER_STATE).exists():
        name = read_json(folder / TRAINER_STATE).get("base_model")
        if name:
            return str(name)
    if (folder / ADAPTER_CONFIG).exists():
        return read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    return None
