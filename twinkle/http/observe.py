"""What the operator's metrics and the status page read: who is looking, and each model's figures.

The schedulers are separate Ray actors; their stats are fetched concurrently with a deadline, so a
busy or restarting scheduler makes a scrape or a page refresh show it as down instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from twinkle.errors import AuthenticationError, PermissionDeniedError
from twinkle.http.context import ServerContext

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Viewer:
    """Who is looking: an operator sees every tenant's objects, a tenant only its own."""

    name: str
    operator: bool

    @property
    def tenant(self) -> str | None:
        """The tenant whose objects are shown (None: all of them)."""
        return None if self.operator else self.name


def key_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def viewer_for(ctx: ServerContext, key: str | None) -> Viewer:
    """The viewer holding `key`: an operator key, a tenant key, or anyone on an open server.

    Raises AuthenticationError (401) for a missing or unknown key where keys are configured."""
    headers = key_headers(key)
    try:
        return Viewer(ctx.keys.operator_for(headers), operator=True)
    except PermissionDeniedError:  # a tenant's key
        return Viewer(ctx.tenant_for(headers), operator=False)
    except AuthenticationError:
        if ctx.keys.open:  # no tenant keys: everyone is the open tenant (operators hold a key)
            return Viewer(ctx.tenant_for(headers), operator=False)
        raise


async def model_stats(ctx: ServerContext, viewer: Viewer | None = None) -> dict[str, dict | None]:
    """Each base model's scheduler stats as `viewer` may see them (None: the operator's view);
    None for a model whose scheduler did not answer within STATS_TIMEOUT_S."""
    await ctx.ensure_started()
    operator = viewer is None or viewer.operator
    tenant = None if viewer is None else viewer.tenant

    async def one(handle) -> dict | None:
        try:
            return await asyncio.wait_for(handle.stats.remote(tenant, operator=operator), STATS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a down scheduler is a figure here, not an error
            log.warning("scheduler stats unavailable: %s", type(exc).__name__)
            return None

    names = list(ctx.schedulers)
    answers = await asyncio.gather(*(one(ctx.schedulers[name]) for name in names))
    return dict(zip(names, answers))
