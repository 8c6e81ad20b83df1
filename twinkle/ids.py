"""The formats of the ids clients see: one module, so the HTTP layer and the clients agree.

A session's training models are `<session_id>:train:<n>` and its samplers `<session_id>:sample:<n>`
(Tinker's model_seq_id and sampling_session_seq_id), so a retried create maps to the same id.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["model", "sampler"]
SEPARATORS: dict[str, str] = {"model": ":train:", "sampler": ":sample:"}


def model_id(session_id: str, number: int) -> str:
    return f"{session_id}{SEPARATORS['model']}{number}"


def sampler_id(session_id: str, number: int) -> str:
    return f"{session_id}{SEPARATORS['sampler']}{number}"


def session_of(target_id: str, kind: Kind = "model") -> str | None:
    """The session a model or sampler id belongs to, or None if it has no session part.

    The number is any integer the client chose (Tinker's seq ids are not checked for sign)."""
    session, sep, number = target_id.partition(SEPARATORS[kind])
    return session if sep and number.lstrip("-").isdigit() else None


def adhoc_sampler_id(unique: str) -> str:
    """A sampler for one request of an SDK that names the model in each sample call."""
    return f"adhoc:{unique}"


def is_adhoc_sampler(target_id: str) -> bool:
    return target_id.startswith("adhoc:")
