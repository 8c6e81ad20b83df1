"""The SQLite store.

Every row belongs to a tenant; lookups take the tenant and treat another tenant's ids as missing.
Futures are unique per (model, seq_id), which makes a retried request find the first one instead of
running twice. Connections are per thread; callers in async code run these methods in a thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinkle.store.history import HISTORY_SCHEMA, HistoryMixin
from twinkle.store.overview import OVERVIEW_SCHEMA, OverviewMixin

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL, status TEXT NOT NULL DEFAULT 'active',
    tags TEXT, user_metadata TEXT, sdk_version TEXT, counters TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT, base_model TEXT NOT NULL,
    lora TEXT NOT NULL, created_at REAL NOT NULL, last_request_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', user_metadata TEXT, run_dir TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS models_tenant ON models(tenant);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT, base_model TEXT NOT NULL,
    model_path TEXT, folder TEXT, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, target_id TEXT, seq_id INTEGER,
    kind TEXT NOT NULL, status TEXT NOT NULL, result BLOB, error TEXT, created_at REAL NOT NULL,
    completed_at REAL, base_model TEXT, extra TEXT,
    UNIQUE(target_id, kind, seq_id)
);
CREATE INDEX IF NOT EXISTS futures_completed ON futures(completed_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, request_id TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, checkpoint_id TEXT NOT NULL, tenant TEXT NOT NULL, kind TEXT NOT NULL,
    folder TEXT NOT NULL, size_bytes INTEGER, created_at REAL NOT NULL, expires_at REAL,
    public INTEGER NOT NULL DEFAULT 0, user_metadata TEXT,
    PRIMARY KEY (run_id, checkpoint_id)
);
CREATE INDEX IF NOT EXISTS checkpoints_tenant ON checkpoints(tenant);
"""

PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass
class FutureRecord:
    request_id: str
    tenant: str
    target_id: str | None
    seq_id: int | None
    kind: str
    status: str
    result: bytes | None
    error: dict | None
    created_at: float
    completed_at: float | None
    base_model: str | None
    extra: dict


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _unjson(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class Store(HistoryMixin, OverviewMixin):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(SCHEMA + HISTORY_SCHEMA + OVERVIEW_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------- sessions
    def create_session(self, session_id: str, tenant: str, *, tags=None, user_metadata=None,
                       sdk_version: str | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO sessions (session_id, tenant, created_at, last_heartbeat, tags, user_metadata,"
                       " sdk_version) VALUES (?,?,?,?,?,?,?)",
                       (session_id, tenant, now, now, _json(tags), _json(user_metadata), sdk_version))

    def get_session(self, session_id: str, tenant: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM sessions WHERE session_id=? AND tenant=?",
                                   (session_id, tenant)).fetchone()
        return dict(row) if row else None

    def heartbeat(self, session_id: str, tenant: str) -> str | None:
        """Refresh a session; returns its status before the call (None if unknown).

        An expired session that beats again (its client paused) becomes active again, with a fresh
        heartbeat, so the next sweep does not expire it a second time."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM sessions WHERE session_id=? AND tenant=?",
                             (session_id, tenant)).fetchone()
            if row is None:
                return None
            if row["status"] in ("active", "expired"):
                db.execute("UPDATE sessions SET status='active', last_heartbeat=? WHERE session_id=?",
                           (time.time(), session_id))
            return row["status"]

    def set_session_status(self, session_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sessions SET status=? WHERE session_id=?", (status, session_id))

    def list_sessions(self, tenant: str, limit: int, offset: int) -> list[str]:
        rows = self._conn().execute("SELECT session_id FROM sessions WHERE tenant=? ORDER BY created_at DESC "
                                    "LIMIT ? OFFSET ?", (tenant, limit, offset)).fetchall()
        return [r["session_id"] for r in rows]

    def stale_sessions(self, older_than: float) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM sessions WHERE status='active' AND last_heartbeat < ?",
                                    (older_than,)).fetchall()
        return [dict(r) for r in rows]

    def next_counter(self, session_id: str, name: str) -> int:
        """Server-side counters per session (e.g. sampler numbers for unnamed sampler saves)."""
        with self._tx() as db:
            row = db.execute("SELECT counters FROM sessions WHERE session_id=?", (session_id,)).fetchone()
            counters = json.loads(row["counters"]) if row else {}
            value = int(counters.get(name, 0))
            counters[name] = value + 1
            db.execute("UPDATE sessions SET counters=? WHERE session_id=?", (json.dumps(counters), session_id))
            return value

    # --------------------------------------------------------------- models
    def create_model(self, model_id: str, tenant: str, *, session_id: str | None, base_model: str, lora: dict,
                     run_dir: str, user_metadata=None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO models (model_id, tenant, session_id, base_model, lora, created_at,"
                       " last_request_at, status, user_metadata, run_dir) VALUES (?,?,?,?,?,?,?,'active',?,?)",
                       (model_id, tenant, session_id, base_model, json.dumps(lora), now, now,
                        _json(user_metadata), run_dir))

    def get_model(self, model_id: str, tenant: str | None) -> dict | None:
        if tenant is None:
            row = self._conn().execute("SELECT * FROM models WHERE model_id=?", (model_id,)).fetchone()
        else:
            row = self._conn().execute("SELECT * FROM models WHERE model_id=? AND tenant=?",
                                       (model_id, tenant)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["lora"] = json.loads(out["lora"])
        out["user_metadata"] = _unjson(out["user_metadata"])
        return out

    def list_models(self, tenant: str, limit: int, offset: int) -> tuple[list[dict], int]:
        db = self._conn()
        total = db.execute("SELECT COUNT(*) FROM models WHERE tenant=?", (tenant,)).fetchone()[0]
        rows = db.execute("SELECT model_id FROM models WHERE tenant=? ORDER BY created_at DESC LIMIT ? OFFSET ?",
                          (tenant, limit, offset)).fetchall()
        return [self.get_model(r["model_id"], tenant) for r in rows], int(total)

    def models_of_session(self, session_id: str) -> list[dict]:
        rows = self._conn().execute("SELECT model_id, tenant FROM models WHERE session_id=?", (session_id,)).fetchall()
        return [self.get_model(r["model_id"], r["tenant"]) for r in rows]

    def touch_model(self, model_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE models SET last_request_at=? WHERE model_id=?", (time.time(), model_id))

    def set_model_status(self, model_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE models SET status=? WHERE model_id=?", (status, model_id))

    def tenant_summary(self) -> dict[str, dict]:
        """Per tenant: active sessions, models by status, checkpoints and their bytes (operator view)."""
        db = self._conn()
        out: dict[str, dict] = {}
        for row in db.execute("SELECT tenant, COUNT(*) FROM sessions WHERE status='active' GROUP BY tenant"):
            out.setdefault(row[0], {})["active_sessions"] = row[1]
        for row in db.execute("SELECT tenant, status, COUNT(*) FROM models GROUP BY tenant, status"):
            out.setdefault(row[0], {}).setdefault("models", {})[row[1]] = row[2]
        for row in db.execute("SELECT tenant, COUNT(*), COALESCE(SUM(size_bytes), 0) FROM checkpoints GROUP BY tenant"):
            out.setdefault(row[0], {}).update(checkpoints=row[1], checkpoint_bytes=row[2])
        return out

    def checkpoint_usage(self, tenant: str) -> tuple[int, int]:
        """(checkpoints, bytes) a tenant's saved checkpoints take (what its checkpoint quota counts)."""
        row = self._conn().execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM checkpoints WHERE tenant=?",
                                   (tenant,)).fetchone()
        return int(row[0]), int(row[1])

    def live_model_count(self, tenant: str) -> int:
        """Training models a tenant holds in its active sessions (what its model quota counts)."""
        return int(self._conn().execute(
            "SELECT COUNT(*) FROM models m LEFT JOIN sessions s ON m.session_id = s.session_id "
            "WHERE m.tenant=? AND m.status != 'unloaded' AND (s.status IS NULL OR s.status = 'active')",
            (tenant,)).fetchone()[0])

    def session_model_count(self, session_id: str) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM models WHERE session_id=?",
                                        (session_id,)).fetchone()[0])

    # ------------------------------------------------------------- samplers
    def create_sampler(self, sampler_id: str, tenant: str, *, session_id: str | None, base_model: str,
                       model_path: str | None, folder: str | None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO samplers (sampler_id, tenant, session_id, base_model, model_path,"
                       " folder, created_at) VALUES (?,?,?,?,?,?,?)",
                       (sampler_id, tenant, session_id, base_model, model_path, folder, time.time()))

    def get_sampler(self, sampler_id: str, tenant: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM samplers WHERE sampler_id=? AND tenant=?",
                                   (sampler_id, tenant)).fetchone()
        return dict(row) if row else None

    def samplers_of_session(self, session_id: str) -> list[str]:
        rows = self._conn().execute("SELECT sampler_id FROM samplers WHERE session_id=?", (session_id,)).fetchall()
        return [r["sampler_id"] for r in rows]

    # -------------------------------------------------------------- futures
    def _future(self, row: sqlite3.Row | None) -> FutureRecord | None:
        if row is None:
            return None
        return FutureRecord(row["request_id"], row["tenant"], row["target_id"], row["seq_id"], row["kind"],
                            row["status"], row["result"], _unjson(row["error"]), row["created_at"],
                            row["completed_at"], row["base_model"], _unjson(row["extra"]) or {})

    def create_future(self, request_id: str, tenant: str, *, kind: str, target_id: str | None = None,
                      seq_id: int | None = None, base_model: str | None = None, extra: dict | None = None,
                      idempotency_key: str | None = None) -> tuple[FutureRecord, bool]:
        """Insert a pending future; returns (record, created). A duplicate (same target, kind and
        seq_id, or same idempotency key) returns the existing record and created=False."""
        with self._tx() as db:
            if idempotency_key:
                row = db.execute("SELECT request_id FROM idempotency WHERE key=? AND tenant=?",
                                 (idempotency_key, tenant)).fetchone()
                if row is not None:
                    existing = db.execute("SELECT * FROM futures WHERE request_id=?", (row["request_id"],)).fetchone()
                    if existing is not None:
                        return self._future(existing), False
            if seq_id is not None and target_id is not None:
                existing = db.execute("SELECT * FROM futures WHERE target_id=? AND kind=? AND seq_id=?",
                                      (target_id, kind, seq_id)).fetchone()
                if existing is not None:
                    return self._future(existing), False
            now = time.time()
            db.execute("INSERT INTO futures (request_id, tenant, target_id, seq_id, kind, status, created_at,"
                       " base_model, extra) VALUES (?,?,?,?,?,?,?,?,?)",
                       (request_id, tenant, target_id, seq_id, kind, PENDING, now, base_model, _json(extra)))
            if idempotency_key:
                db.execute("INSERT OR REPLACE INTO idempotency (key, tenant, request_id, created_at) VALUES (?,?,?,?)",
                           (idempotency_key, tenant, request_id, now))
            row = db.execute("SELECT * FROM futures WHERE request_id=?", (request_id,)).fetchone()
            return self._future(row), True

    def get_future(self, request_id: str, tenant: str | None = None) -> FutureRecord | None:
        if tenant is None:
            row = self._conn().execute("SELECT * FROM futures WHERE request_id=?", (request_id,)).fetchone()
        else:
            row = self._conn().execute("SELECT * FROM futures WHERE request_id=? AND tenant=?",
                                       (request_id, tenant)).fetchone()
        return self._future(row)

    def complete_future(self, request_id: str, result: bytes) -> None:
        with self._tx() as db:
            db.execute("UPDATE futures SET status=?, result=?, completed_at=? WHERE request_id=? AND status=?",
                       (DONE, result, time.time(), request_id, PENDING))

    def fail_future(self, request_id: str, error: dict) -> None:
        with self._tx() as db:
            db.execute("UPDATE futures SET status=?, error=?, completed_at=? WHERE request_id=? AND status=?",
                       (FAILED, json.dumps(error), time.time(), request_id, PENDING))

    def fail_pending_futures(self, base_model: str, error: dict) -> int:
        """A scheduler starting afresh can never run what its predecessor had queued: fail it."""
        with self._tx() as db:
            cur = db.execute("UPDATE futures SET status=?, error=?, completed_at=? WHERE status=? AND base_model=?",
                             (FAILED, json.dumps(error), time.time(), PENDING, base_model))
            return cur.rowcount

    def next_train_seq(self, target_id: str) -> int:
        """The seq_id a model's next ordered request has, after those already run (for a restarted scheduler)."""
        row = self._conn().execute("SELECT MAX(seq_id) FROM futures WHERE target_id=? AND kind='train' AND status!=?",
                                   (target_id, PENDING)).fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def delete_future(self, request_id: str) -> None:
        """Forget a future that was never queued (refused by a quota), so a retry starts afresh."""
        with self._tx() as db:
            db.execute("DELETE FROM futures WHERE request_id=? AND status=?", (request_id, PENDING))
            db.execute("DELETE FROM idempotency WHERE request_id=?", (request_id,))

    def pending_futures(self, base_model: str | None = None) -> list[FutureRecord]:
        if base_model is None:
            rows = self._conn().execute("SELECT * FROM futures WHERE status=?", (PENDING,)).fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM futures WHERE status=? AND base_model=?",
                                        (PENDING, base_model)).fetchall()
        return [self._future(r) for r in rows]

    def purge_futures(self, completed_before: float) -> int:
        """Drop results completed long ago (kept a while after delivery so re-polls still work)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM futures WHERE completed_at IS NOT NULL AND completed_at < ?",
                             (completed_before,))
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (completed_before,))
            return cur.rowcount

    # ---------------------------------------------------------- checkpoints
    def add_checkpoint(self, run_id: str, checkpoint_id: str, tenant: str, *, kind: str, folder: str,
                       size_bytes: int, ttl_seconds: float | None = None, user_metadata=None) -> None:
        now = time.time()
        expires = now + ttl_seconds if ttl_seconds else None
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints (run_id, checkpoint_id, tenant, kind, folder, size_bytes,"
                       " created_at, expires_at, public, user_metadata) VALUES (?,?,?,?,?,?,?,?,0,?)",
                       (run_id, checkpoint_id, tenant, kind, folder, size_bytes, now, expires, _json(user_metadata)))

    def get_checkpoint(self, run_id: str, checkpoint_id: str, tenant: str | None) -> dict | None:
        """A checkpoint visible to `tenant`: its own, or a published one (tenant None: any)."""
        row = self._conn().execute("SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=?",
                                   (run_id, checkpoint_id)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant and not row["public"]):
            return None
        return self._checkpoint(row)

    @staticmethod
    def _checkpoint(row: sqlite3.Row) -> dict:
        out = dict(row)
        out["user_metadata"] = _unjson(out["user_metadata"])
        out["public"] = bool(out["public"])
        return out

    def list_checkpoints(self, tenant: str, run_id: str | None = None, limit: int = 1000,
                         offset: int = 0) -> tuple[list[dict], int]:
        db = self._conn()
        where, params = "tenant=?", [tenant]
        if run_id is not None:
            where += " AND run_id=?"
            params.append(run_id)
        total = db.execute(f"SELECT COUNT(*) FROM checkpoints WHERE {where}", params).fetchone()[0]
        rows = db.execute(f"SELECT * FROM checkpoints WHERE {where} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                          [*params, limit, offset]).fetchall()
        return [self._checkpoint(r) for r in rows], int(total)

    def delete_checkpoint(self, run_id: str, checkpoint_id: str, tenant: str) -> dict | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=? AND tenant=?",
                             (run_id, checkpoint_id, tenant)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id))
            return self._checkpoint(row)

    def update_checkpoint(self, run_id: str, checkpoint_id: str, tenant: str, **fields) -> bool:
        allowed = {"public", "expires_at"}
        if not set(fields) <= allowed:
            raise ValueError(f"cannot update {set(fields) - allowed}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(f"UPDATE checkpoints SET {sets} WHERE run_id=? AND checkpoint_id=? AND tenant=?",
                             [*fields.values(), run_id, checkpoint_id, tenant])
            return cur.rowcount > 0

    def expired_checkpoints(self, now: float) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at < ?",
                                    (now,)).fetchall()
        return [self._checkpoint(r) for r in rows]

    def last_checkpoints(self, run_id: str) -> dict[str, dict]:
        out = {}
        for kind in ("training", "sampler"):
            row = self._conn().execute("SELECT * FROM checkpoints WHERE run_id=? AND kind=? ORDER BY created_at DESC"
                                       " LIMIT 1", (run_id, kind)).fetchone()
            if row is not None:
                out[kind] = self._checkpoint(row)
        return out
