"""Where a base model comes from, checked before anything starts.

`twinkle serve` and `twinkle check-config` call `check_model_source` for every configured model
so that a missing folder or an uncached Hub id fails in a second with one line saying what to do,
instead of half a minute later as a Ray worker traceback. Nothing here touches the network: a Hub
id is looked up in the local Hugging Face cache with huggingface_hub's own cache functions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from twinkle.tiny.build import BUILTIN_MODELS

SourceKind = Literal["builtin", "local", "hub-cached", "hub-download"]


class ModelSourceError(ValueError):
    """A model that cannot be loaded as configured; the message says how to fix it (one line)."""


@dataclass(frozen=True)
class ModelSource:
    """What a model name resolved to: `kind` and a human-readable `where`."""

    name: str
    kind: SourceKind
    where: str

    def describe(self) -> str:
        labels = {"builtin": "built-in, generated offline", "local": f"local folder {self.where}",
                  "hub-cached": f"Hugging Face cache {self.where}",
                  "hub-download": "Hugging Face Hub, downloaded on first start"}
        return labels[self.kind]


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def check_model_source(name: str) -> ModelSource:
    """Resolve a built-in name, a local folder or a Hub id without loading it; raise ModelSourceError.

    A local folder must exist and hold `config.json`. A Hub id must already be in the local cache
    when the Hub is offline (`HF_HUB_OFFLINE=1`); online it is accepted and downloaded at start.
    """
    if not name or not name.strip():
        raise ModelSourceError("model: empty name; give a built-in name (twinkle-tiny), a local folder "
                               "or a Hugging Face id")
    if name in BUILTIN_MODELS:
        return ModelSource(name, "builtin", name)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(f"model {name!r} is a file, not a model folder: pass the folder that holds "
                                   "config.json and the weights")
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"model folder {str(local.resolve())!r} has no config.json: pass the folder "
                                   "a `save_pretrained` wrote (config.json + weights), e.g. the snapshot folder "
                                   "of a downloaded model")
        return ModelSource(name, "local", str(local.resolve()))
    if _looks_local(name):
        raise ModelSourceError(f"model folder {str(local)!r} does not exist: pass an existing folder with "
                               f"config.json, a Hugging Face id, or a built-in name ({_builtin_names()})")
    return _check_hub_id(name)


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def _check_hub_id(repo_id: str) -> ModelSource:
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelSourceError(f"model {repo_id!r} is neither a built-in name ({_builtin_names()}), an existing "
                               "folder, nor a valid Hugging Face id (org/name)") from None
    cache = _hub_cache_dir()
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    if isinstance(cached, str):
        return ModelSource(repo_id, "hub-cached", str(Path(cached).parent))
    if is_offline_mode():
        close = difflib.get_close_matches(repo_id, list(BUILTIN_MODELS), n=1)
        hint = f"did you mean the built-in {close[0]!r}? Otherwise " if close else ""
        raise ModelSourceError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: {hint}pass a local folder (--model /path/with/config.json), point HF_HUB_CACHE "
            "(or HF_HOME) at a cache that holds it, or unset HF_HUB_OFFLINE on a machine that can reach "
            "the Hub")
    return ModelSource(repo_id, "hub-download", repo_id)
