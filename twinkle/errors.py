"""Exceptions shared by every layer.

Each error carries an HTTP status so the server can turn it into a clear 4xx/5xx reply and the
clients can turn that reply back into the same exception type. Messages say what was wrong and
how to fix it; they never include tracebacks.
"""

from __future__ import annotations


class TwinkleError(Exception):
    """Base class of all Twinkle errors."""

    status_code: int = 500
    category: str = "server"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)

    def to_dict(self) -> dict:
        return {
            "error": str(self),
            "type": type(self).__name__,
            "field": self.field,
            "category": self.category,
        }


class InvalidInputError(TwinkleError, ValueError):
    """The request is malformed: wrong types, shapes, values or unknown names (HTTP 400)."""

    status_code = 400
    category = "user"


class UnprocessableError(InvalidInputError):
    """The request is well formed but cannot be applied, e.g. an unsupported option (HTTP 422)."""

    status_code = 422


class PayloadTooLargeError(InvalidInputError):
    """A request body (as sent, or once decompressed) beyond the server's size limit (HTTP 413)."""

    status_code = 413


class AuthenticationError(TwinkleError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    category = "user"


class PermissionDeniedError(TwinkleError):
    """The caller may not do this on this server (HTTP 403)."""

    status_code = 403
    category = "user"


class NotFoundError(TwinkleError, KeyError):
    """Unknown id, or an id that belongs to another tenant (HTTP 404)."""

    status_code = 404
    category = "user"

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class ConflictError(TwinkleError):
    """The request conflicts with existing state, e.g. a checkpoint that already exists (HTTP 409)."""

    status_code = 409
    category = "user"


class SessionExpiredError(TwinkleError):
    """The session was closed or reaped; start a new one (HTTP 410)."""

    status_code = 410
    category = "user"


class StateLostError(TwinkleError):
    """The server lost a model's live state (a worker crashed) and holds no saved copy (HTTP 410)."""

    status_code = 410
    category = "server"


class CapacityError(TwinkleError):
    """The server is at capacity; retry later (HTTP 429)."""

    status_code = 429
    category = "server"


class QuotaExceededError(CapacityError):
    """A per-tenant quota of this server is reached (HTTP 429); the message names the limit."""

    category = "user"


class ServerUnavailableError(TwinkleError):
    """The server could not be reached or stopped answering (client side)."""

    status_code = 503
    category = "server"


_BY_NAME = {
    cls.__name__: cls
    for cls in (
        TwinkleError,
        InvalidInputError,
        UnprocessableError,
        PayloadTooLargeError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        SessionExpiredError,
        StateLostError,
        CapacityError,
        QuotaExceededError,
        ServerUnavailableError,
    )
}
_BY_STATUS = {400: InvalidInputError, 401: AuthenticationError, 403: PermissionDeniedError,
              404: NotFoundError, 409: ConflictError, 410: SessionExpiredError, 413: PayloadTooLargeError,
              422: UnprocessableError, 429: CapacityError}


def error_from_dict(payload: dict, status_code: int | None = None) -> TwinkleError:
    """Rebuild the exception a server reported (see `TwinkleError.to_dict`)."""
    cls = _BY_NAME.get(str(payload.get("type")))
    if cls is None:
        cls = _BY_STATUS.get(status_code or 0, TwinkleError)
    message = str(payload.get("error") or payload.get("detail") or "unknown error")
    field = payload.get("field")
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2:]
    return cls(message, field=field)
