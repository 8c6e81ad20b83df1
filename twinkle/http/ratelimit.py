"""Requests per second per tenant: a token bucket in each ingress replica.

A tenant may burst to twice its rate; past that its requests answer 429 with a Retry-After, which
the Tinker SDK honours by backing off. Each replica counts on its own, so with N replicas a
tenant's ceiling is N times the configured rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from twinkle.errors import QuotaExceededError


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, tenant: str, rate: float) -> None:
        """Take one request's token from the tenant's bucket, or refuse it (429) naming the limit."""
        now = time.monotonic()
        burst = 2.0 * rate
        bucket = self._buckets.setdefault(tenant, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            error = QuotaExceededError(f"more than {rate:g} requests per second (bursts to {burst:g}), this server's "
                                       "limit per tenant; slow down and retry", field="quota")
            error.retry_after_s = (1.0 - bucket.tokens) / rate
            raise error
        bucket.tokens -= 1.0
