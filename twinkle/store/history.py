"""Each training run's metrics history: one point per forward_backward (its loss) and per optimizer
step, written by the scheduler with the request's result, read by the status page and
`GET /api/v1/twinkle/runs/{model_id}/metrics`.

Bounded: a model keeps its newest `HISTORY_KEEP` points. The headline loss of a point (its
`loss:sum`, or its first `loss*` metric) is kept in a column of its own, so drawing a curve reads
two numbers per point and never parses the metrics JSON, and only the points added since the last
read (see `twinkle.http.curves`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

HISTORY_KEEP = 5000

HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_metrics (
    point_id INTEGER PRIMARY KEY AUTOINCREMENT, model_id TEXT NOT NULL, tenant TEXT NOT NULL,
    base_model TEXT, kind TEXT NOT NULL, step INTEGER NOT NULL, tokens INTEGER NOT NULL DEFAULT 0,
    seconds REAL, loss REAL, metrics TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_metrics_model ON run_metrics(model_id, point_id);
"""


def headline_loss(metrics: dict[str, float]) -> float | None:
    """The loss a curve shows: `loss:sum` (Tinker's convention), else the first metric named loss*."""
    if "loss:sum" in metrics:
        return float(metrics["loss:sum"])
    for key in sorted(metrics):
        if key.split(":", 1)[0] == "loss":
            return float(metrics[key])
    return None


class HistoryMixin:
    """The `run_metrics` table; mixed into `Store` (which provides `_conn` and `_tx`)."""

    history_keep: int = HISTORY_KEEP
    _conn: Callable[[], sqlite3.Connection]
    _tx: Callable[[], AbstractContextManager[sqlite3.Connection]]

    def add_run_points(self, points: list[dict]) -> None:
        """Append history points (see `bookkeeping.history_point`) and drop each model's oldest
        beyond `history_keep`."""
        if not points:
            return
        now = time.time()
        with self._tx() as db:
            for p in points:
                metrics = p.get("metrics") or {}
                db.execute("INSERT INTO run_metrics (model_id, tenant, base_model, kind, step, tokens, seconds, loss,"
                           " metrics, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (p["model_id"], p["tenant"], p.get("base_model"), p["kind"], int(p.get("step", 0)),
                            int(p.get("tokens", 0)), p.get("seconds"),
                            headline_loss(metrics) if p["kind"] == "forward_backward" else None,
                            json.dumps(metrics), p.get("created_at", now)))
            for model_id in {p["model_id"] for p in points}:
                db.execute("DELETE FROM run_metrics WHERE model_id=? AND point_id <= (SELECT point_id FROM run_metrics"
                           " WHERE model_id=? ORDER BY point_id DESC LIMIT 1 OFFSET ?)",
                           (model_id, model_id, self.history_keep))

    def run_points(self, model_id: str, tenant: str | None, *, after: int = 0, limit: int = HISTORY_KEEP,
                   kind: str | None = None) -> list[dict[str, Any]]:
        """A model's points after `after` (a point_id), oldest first; another tenant's model has
        none (tenant None: any model, for the operator)."""
        where, params = ["model_id=?", "point_id>?"], [model_id, after]
        if tenant is not None:
            where.append("tenant=?")
            params.append(tenant)
        if kind is not None:
            where.append("kind=?")
            params.append(kind)
        rows = self._conn().execute(f"SELECT point_id, kind, step, tokens, seconds, metrics, created_at FROM "
                                    f"run_metrics WHERE {' AND '.join(where)} ORDER BY point_id LIMIT ?",
                                    [*params, limit]).fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    def loss_points(self, model_id: str, after: int = 0) -> list[tuple[int, int, float]]:
        """(point_id, step, loss) of a model's kept forward_backward passes after `after`, oldest
        first (step: the optimizer steps taken before the pass)."""
        rows = self._conn().execute("SELECT point_id, step, loss FROM run_metrics WHERE model_id=? AND point_id>? "
                                    "AND loss IS NOT NULL ORDER BY point_id", (model_id, after)).fetchall()
        return [(int(r[0]), int(r[1]), float(r[2])) for r in rows]

    def run_totals(self, model_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per model: points kept, last optimizer step, tokens trained on, and the last loss."""
        out: dict[str, dict[str, Any]] = {}
        db = self._conn()
        for model_id in model_ids:
            row = db.execute("SELECT COUNT(*), MAX(step), COALESCE(SUM(tokens), 0), MAX(created_at) FROM run_metrics "
                             "WHERE model_id=?", (model_id,)).fetchone()
            last = db.execute("SELECT loss FROM run_metrics WHERE model_id=? AND loss IS NOT NULL "
                              "ORDER BY point_id DESC LIMIT 1", (model_id,)).fetchone()
            out[model_id] = {"points": int(row[0]), "step": int(row[1] or 0), "tokens": int(row[2]),
                             "last_point_at": row[3], "last_loss": None if last is None else float(last[0])}
        return out


def bucket_curve(points: list[tuple[int, float]], max_points: int) -> list[list[float]]:
    """[[pass, step, loss], ...] from (step, loss) of consecutive passes: at most `max_points`
    entries, each the mean loss of a run of consecutive passes (pass: its last, from 1; step: its
    last pass's step). What the status page draws."""
    n = len(points)
    out: list[list[float]] = []
    start = 0
    for bucket in range(min(n, max_points)):
        end = (bucket + 1) * n // min(n, max_points)
        chunk = points[start:end]
        out.append([end, chunk[-1][0], sum(loss for _, loss in chunk) / len(chunk)])
        start = end
    return out
