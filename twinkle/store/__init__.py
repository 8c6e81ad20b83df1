"""Durable server state in an embedded SQLite database: sessions, models, samplers, futures,
checkpoints. Shared by the HTTP layer and the model schedulers (same node, WAL mode)."""

from twinkle.store.sqlite import FutureRecord, Store

__all__ = ["FutureRecord", "Store"]
