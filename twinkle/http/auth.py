"""API keys: which tenant a request comes from.

Keys are kept only as SHA-256 digests. The Tinker SDK sends its key as `X-API-Key`, Twinkle's
client as `Authorization: Bearer`. With no keys configured (allowed on loopback only) the server
is open and every request belongs to the tenant `default`.
"""

from __future__ import annotations

import hashlib
import hmac

from twinkle.errors import AuthenticationError

OPEN_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: dict[str, str]) -> None:
        self._digests = [(_digest(key), tenant) for tenant, key in keys.items()]

    @property
    def open(self) -> bool:
        return not self._digests

    def tenant_for(self, headers) -> str:
        """The tenant owning the request's key; raises AuthenticationError (401) otherwise."""
        if self.open:
            return OPEN_TENANT
        key = headers.get("x-api-key")
        if not key:
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                key = auth[7:].strip()
        if not key:
            raise AuthenticationError("missing API key: send it as 'X-API-Key: <key>' or "
                                      "'Authorization: Bearer <key>'")
        digest = _digest(key)
        tenant = None
        for known, name in self._digests:  # compare with every digest: no early exit timing
            if hmac.compare_digest(known, digest):
                tenant = name
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant
