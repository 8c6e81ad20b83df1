"""Where Twinkle keeps its files, and safe joining of user-chosen names into those folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from twinkle.errors import InvalidInputError

STATE_DIR_ENV = "TWINKLE_STATE_DIR"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


def default_state_dir() -> Path:
    """State dir for local mode: `$TWINKLE_STATE_DIR`, else `~/.cache/twinkle`."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "twinkle"


def check_name(name: str, field: str = "name") -> str:
    """Accept a single path component made of letters, digits, '.', '_' and '-'.

    Checkpoint and adapter names come from remote users and become folder names, so anything
    that could escape its folder ('..', '/', absolute paths, hidden files) is refused.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in {".", ".."} or ".." in name:
        raise InvalidInputError(
            f"{name!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or '/'",
            field=field,
        )
    return name


def safe_join(root: str | os.PathLike, *names: str, field: str = "name") -> Path:
    """Join checked names under root and make sure the result stays inside root."""
    root_path = Path(root).resolve()
    path = root_path.joinpath(*(check_name(n, field) for n in names)).resolve()
    if root_path != path and root_path not in path.parents:
        raise InvalidInputError(f"path escapes its folder: {'/'.join(names)!r}", field=field)
    return path
