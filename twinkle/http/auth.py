"""API keys: which tenant a request comes from.

Keys are kept only as SHA-256 digests. The Tinker SDK sends its key as `X-API-Key`, Twinkle's
client as `Authorization: Bearer`. With no keys configured (allowed on loopback only) the server
is open and every request belongs to the tenant `default`.
"""

from __future__ import annotations

import hashlib
import hmac

from twinkle.errors import AuthenticationError, PermissionDeniedError

OPEN_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Tenants' keys for the API, and operators' keys for the operator routes, kept apart."""

    def __init__(self, keys: dict[str, str], admin_keys: dict[str, str] | None = None) -> None:
        self._digests = [(_digest(key), tenant) for tenant, key in keys.items()]
        self._admin = [(_digest(key), name) for name, key in (admin_keys or {}).items()]

    @property
    def open(self) -> bool:
        return not self._digests

    def tenant_for(self, headers) -> str:
        """The tenant owning the request's key; raises AuthenticationError (401) otherwise."""
        if self.open:
            return OPEN_TENANT
        key = _key_of(headers)
        tenant = _match(self._digests, key)
        if tenant is None:
            if _match(self._admin, key) is not None:
                raise AuthenticationError("this is an operator key: it opens /api/v1/admin/... only; "
                                          "use a tenant's API key here")
            raise AuthenticationError("invalid API key")
        return tenant

    def operator_for(self, headers) -> str:
        """The operator owning the request's key. A tenant's key gets 403: the operator view shows
        every tenant's objects. An open loopback server (no keys at all) is its own operator."""
        if self.open and not self._admin:
            return OPEN_TENANT
        key = _key_of(headers)
        operator = _match(self._admin, key)
        if operator is not None:
            return operator
        if _match(self._digests, key) is not None:
            raise PermissionDeniedError("the operator routes need an operator key (auth.admin_keys or "
                                        "$TWINKLE_ADMIN_KEYS), not a tenant's API key")
        raise AuthenticationError("invalid API key")


def _key_of(headers) -> str:
    key = headers.get("x-api-key")
    if not key:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    if not key:
        raise AuthenticationError("missing API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
    return key


def _match(digests: list[tuple[bytes, str]], key: str) -> str | None:
    digest = _digest(key)
    found = None
    for known, name in digests:  # compare with every digest: no early exit timing
        if hmac.compare_digest(known, digest):
            found = name
    return found
