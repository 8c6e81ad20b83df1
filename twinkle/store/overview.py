"""Read-only summaries of the store for the operator's metrics and the status page.

Each query is one cheap aggregate or a short, newest-first list; the tenant argument scopes a
list to one tenant's rows (None: every tenant, for the operator).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

OVERVIEW_SCHEMA = """
CREATE INDEX IF NOT EXISTS futures_pending ON futures(base_model) WHERE status='pending';
CREATE INDEX IF NOT EXISTS models_session ON models(session_id);
"""


class OverviewMixin:
    """Mixed into `Store` (which provides `_conn`)."""

    _conn: Callable[[], sqlite3.Connection]

    def gauge_summary(self) -> dict[str, Any]:
        """Active sessions per tenant, models per (base model, status), pending futures per base model."""
        db = self._conn()
        return {
            "sessions_active": {r[0]: r[1] for r in db.execute(
                "SELECT tenant, COUNT(*) FROM sessions WHERE status='active' GROUP BY tenant")},
            "models": [(r[0], r[1], r[2]) for r in db.execute(
                "SELECT base_model, status, COUNT(*) FROM models GROUP BY base_model, status")],
            "futures_pending": {r[0] or "": r[1] for r in db.execute(
                "SELECT base_model, COUNT(*) FROM futures WHERE status='pending' GROUP BY base_model")},
        }

    def offloaded_counts(self, tenant: str | None) -> dict[str, int]:
        """Training models offloaded to disk, per base model (one tenant's, or all)."""
        where, params = (" AND tenant=?", [tenant]) if tenant is not None else ("", [])
        rows = self._conn().execute(f"SELECT base_model, COUNT(*) FROM models WHERE status='offloaded'{where} "
                                    "GROUP BY base_model", params).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def recent_sessions(self, tenant: str | None, limit: int = 50) -> list[dict[str, Any]]:
        """Sessions, active ones first, then by last heartbeat; with how many models each holds."""
        where, params = ("WHERE s.tenant=?", [tenant]) if tenant is not None else ("", [])
        rows = self._conn().execute(
            "SELECT s.session_id, s.tenant, s.status, s.created_at, s.last_heartbeat, s.sdk_version, "
            "(SELECT COUNT(*) FROM models m WHERE m.session_id = s.session_id) AS models "
            f"FROM sessions s {where} ORDER BY (s.status = 'active') DESC, s.last_heartbeat DESC LIMIT ?",
            [*params, limit]).fetchall()
        return [dict(r) for r in rows]

    def recent_models(self, tenant: str | None, limit: int = 20) -> list[dict[str, Any]]:
        """Training models (runs), most recently used first."""
        where, params = ("WHERE tenant=?", [tenant]) if tenant is not None else ("", [])
        rows = self._conn().execute(
            "SELECT model_id, tenant, session_id, base_model, status, created_at, last_request_at FROM models "
            f"{where} ORDER BY last_request_at DESC LIMIT ?", [*params, limit]).fetchall()
        return [dict(r) for r in rows]
