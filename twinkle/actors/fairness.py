"""Sharing a lane between tenants by tokens: deficit round robin.

Each time a batch is formed, every tenant with work waiting earns a quantum (the budget divided
among them) and spends it on its requests in order; what it cannot spend carries over, so a tenant
whose requests are larger than a quantum still runs, just less often. A tenant sending huge batches
therefore gets the same tokens per pass as one sending small ones, never more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class DeficitRoundRobin(Generic[T]):
    def __init__(self) -> None:
        self._deficit: dict[str, float] = {}
        self._order: list[str] = []  # tenants in round-robin order, rotated after every batch

    def pick(self, waiting: dict[str, Sequence[tuple[int, T]]], budget: int, max_items: int | None = None) -> list[T]:
        """Choose what runs next: per tenant, a prefix of its (cost, item) list; in total at most
        `budget` cost (at least one item, however large) and `max_items` items."""
        tenants = [t for t, items in waiting.items() if items]
        for tenant in list(self._deficit):
            if tenant not in tenants:  # an idle tenant keeps no credit
                del self._deficit[tenant]
        self._order = [t for t in self._order if t in tenants] + [t for t in tenants if t not in self._order]
        if not tenants:
            return []
        quantum = budget / len(tenants)
        taken = {t: 0 for t in tenants}
        chosen: list[T] = []
        used = 0
        progress = True
        while progress and (used < budget or not chosen) and (max_items is None or len(chosen) < max_items):
            progress = False
            for tenant in self._order:
                items = waiting[tenant]
                if taken[tenant] >= len(items):
                    continue
                self._deficit[tenant] = self._deficit.get(tenant, 0.0) + quantum
                while taken[tenant] < len(items) and (max_items is None or len(chosen) < max_items):
                    cost, item = items[taken[tenant]]
                    if cost > self._deficit[tenant] or (used + cost > budget and chosen):
                        break  # a request larger than the whole budget runs once it leads a batch
                    self._deficit[tenant] -= cost
                    used += cost
                    taken[tenant] += 1
                    chosen.append(item)
                    progress = True
        if not chosen:  # every head is larger than what is left: the longest-waiting tenant's runs alone
            tenant = max(self._order, key=lambda t: self._deficit.get(t, 0.0))
            cost, item = waiting[tenant][0]
            self._deficit[tenant] = self._deficit.get(tenant, 0.0) - cost
            chosen.append(item)
        self._order = self._order[1:] + self._order[:1]
        return chosen
