"""One progress line per model every few seconds while it has work, for the server log.

An operator watching `twinkle serve` sees that training is moving (passes, tokens per second, queue
depth) without turning on the access log; an idle model writes nothing. The figures come from the
scheduler's own `stats()`, read on its event loop, so this adds no locks and no work per request.
`timeouts.progress_log_s` in the server config sets the interval (default 15 s; 0 turns it off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("twinkle.progress")


class ProgressLine:
    """Turns successive `stats(operator=True)` snapshots into a line about what happened between them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last: dict | None = None
        self._last_at = 0.0

    def update(self, stats: dict, now: float) -> str | None:
        """The line for the interval ending now, or None when the model did nothing and has no queue."""
        totals = _totals(stats)
        previous, since = self._last, self._last_at
        self._last, self._last_at = totals, now
        if previous is None:
            return None
        delta = {key: totals[key] - previous.get(key, 0) for key in totals}
        queued = int(stats.get("queued") or 0)
        if not any(delta.values()) and not queued:
            return None
        seconds = max(now - since, 1e-9)
        return (f"{self.name}: last {seconds:.0f}s: {delta['passes']} train passes "
                f"({delta['pass_requests']} requests), {delta['sample_batches']} sample batches; "
                f"{delta['train_tokens'] / seconds:,.0f} train tok/s, {delta['sample_tokens'] / seconds:,.0f} "
                f"sampled tok/s; queue {queued}")


def _totals(stats: dict) -> dict[str, int]:
    tokens = (stats.get("telemetry") or {}).get("tokens_total") or {}
    return {"passes": int(stats.get("train_passes") or 0), "pass_requests": int(stats.get("train_pass_requests") or 0),
            "sample_batches": int(stats.get("sample_batches") or 0), "train_tokens": int(tokens.get("train") or 0),
            "sample_tokens": int(tokens.get("sample") or 0)}


async def report_progress(name: str, stats: Callable[[], Awaitable[dict]], interval_s: float) -> None:
    """Run forever (cancel to stop): every interval, log one line if the model worked or has a queue."""
    interval = interval_s
    if interval <= 0:
        return
    line = ProgressLine(name)
    while True:
        try:
            text = line.update(await stats(), time.monotonic())
            if text:
                log.info(text)
        except Exception as exc:  # noqa: BLE001 - a progress line must never take the scheduler down
            log.debug("progress line for %s skipped: %s", name, exc)
        await asyncio.sleep(interval)
