"""Where the aggregator keeps the fleet: SQLite in WAL mode, written in batches.

The ``Store`` protocol is all the service uses, so another backend (PostgreSQL, say) is one more
class.  ``SqliteStore`` is meant to be used from one thread (the service's writer); every ``write``
is one transaction however many rows it carries.

Tables:
    devices            one row per device: liveness, model, rollout, counters, and the full view as JSON
    executions         latest status of each (rollout, device)
    execution_history  every status change, in order
    rollups            per device and minute: results, errors, p95 latency, model version
    models             every model file ``fleetbus serve`` holds in its blob directory, by SHA-256
    rollouts           each staged rollout: its signed document, base manifest and controller state
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from publisher.errors import StoreError
from publisher.fleet import DeviceView, Rollup

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    online INTEGER NOT NULL,
    groups_json TEXT NOT NULL,
    model_version TEXT,
    model_sha256 TEXT,
    last_seen REAL,
    rollout_id TEXT,
    rollout_status TEXT,
    inference_count INTEGER NOT NULL DEFAULT 0,
    error_count INTEGER NOT NULL DEFAULT 0,
    latency_p95_ms REAL,
    view_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS executions (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    version_number INTEGER NOT NULL,
    step TEXT,
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS execution_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    version_number INTEGER NOT NULL,
    step TEXT,
    reason TEXT,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS execution_history_rollout ON execution_history (rollout_id, ts);
CREATE TABLE IF NOT EXISTS rollups (
    device_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    results INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    batches INTEGER NOT NULL,
    latency_p95_ms REAL,
    model_version TEXT,
    PRIMARY KEY (device_id, minute)
);
CREATE TABLE IF NOT EXISTS models (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL,
    signed BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    manifest BLOB NOT NULL,
    extra_json TEXT NOT NULL,
    controller_json TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ExecutionRow:
    """One status change of one device in one rollout."""

    rollout_id: str
    device_id: str
    status: str
    version_number: int
    step: str | None
    reason: str | None
    ts: float


@dataclass(frozen=True)
class Batch:
    """Everything one flush writes, in one transaction."""

    devices: Sequence[DeviceView] = ()
    executions: Sequence[ExecutionRow] = ()
    rollups: Sequence[Rollup] = ()

    def __bool__(self) -> bool:
        return bool(self.devices or self.executions or self.rollups)


class Store(Protocol):
    """What the aggregator needs from storage."""

    def write(self, batch: Batch) -> None: ...

    def load_devices(self) -> list[dict[str, Any]]: ...

    def executions(self, rollout_id: str) -> list[ExecutionRow]: ...

    def history(self, rollout_id: str) -> list[ExecutionRow]: ...

    def rollups(self, device_id: str | None = None, since: float | None = None) -> list[dict[str, Any]]: ...

    def prune(self, older_than: float) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RolloutRow:
    """One staged rollout as stored: what was submitted, what serve derived, where the controller is."""

    rollout_id: str
    created_at: float
    updated_at: float
    state: str
    signed: bytes
    signature: bytes
    key_id: str
    model_sha256: str
    manifest: bytes
    extra: dict[str, Any]
    controller: dict[str, Any]


class RolloutStore(Protocol):
    """What the rollout driver needs from storage (``SqliteStore`` implements it too)."""

    def add_model(self, sha256: str, size: int) -> None: ...

    def models(self) -> dict[str, int]: ...

    def add_rollout(self, row: RolloutRow) -> None: ...

    def save_controller(self, rollout_id: str, state: str, controller: dict[str, Any], ts: float) -> None: ...

    def load_rollouts(self) -> list[RolloutRow]: ...


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[SqliteStore, _P], _R]) -> Callable[Concatenate[SqliteStore, _P], _R]:
    def wrapper(self: SqliteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper.__doc__ = method.__doc__
    return wrapper


class SqliteStore:
    """The default store: one SQLite file in WAL mode.

    One connection shared by the service's writer and the HTTP threads' readers, behind a lock: a
    batch is a few milliseconds, so readers wait at most that long, and nobody sees half a batch.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            if self.path.parent and str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL makes NORMAL safe against corruption; a crash loses at most the last flush.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        self.writes = 0
        self.rows_written = 0
        self._lock = threading.RLock()

    @property
    def journal_mode(self) -> str:
        row = self._db.execute("PRAGMA journal_mode").fetchone()
        return str(row[0])

    @_locked
    def write(self, batch: Batch) -> None:
        if not batch:
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
                "online=excluded.online, groups_json=excluded.groups_json, "
                "model_version=excluded.model_version, model_sha256=excluded.model_sha256, "
                "last_seen=excluded.last_seen, rollout_id=excluded.rollout_id, "
                "rollout_status=excluded.rollout_status, inference_count=excluded.inference_count, "
                "error_count=excluded.error_count, latency_p95_ms=excluded.latency_p95_ms, "
                "view_json=excluded.view_json",
                [_device_row(v) for v in batch.devices],
            )
            self._db.executemany(
                "INSERT INTO executions VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(rollout_id, device_id) DO UPDATE SET "
                "status=excluded.status, version_number=excluded.version_number, step=excluded.step, "
                "reason=excluded.reason, updated_at=excluded.updated_at "
                "WHERE excluded.version_number > executions.version_number",
                [_exec_row(e) for e in batch.executions],
            )
            self._db.executemany(
                "INSERT INTO execution_history "
                "(rollout_id, device_id, status, version_number, step, reason, ts) VALUES (?,?,?,?,?,?,?)",
                [_exec_row(e) for e in batch.executions],
            )
            self._db.executemany(
                "INSERT INTO rollups VALUES (?,?,?,?,?,?,?) ON CONFLICT(device_id, minute) DO UPDATE SET "
                "results=rollups.results+excluded.results, errors=rollups.errors+excluded.errors, "
                "batches=rollups.batches+excluded.batches, "
                "latency_p95_ms=max(coalesce(rollups.latency_p95_ms, 0), "
                "coalesce(excluded.latency_p95_ms, 0)), "
                "model_version=excluded.model_version",
                [
                    (r.device_id, r.minute, r.results, r.errors, r.batches, r.latency_p95_ms, r.model_version)
                    for r in batch.rollups
                ],
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"write to {self.path} failed: {exc}") from None
        self.writes += 1
        self.rows_written += len(batch.devices) + 2 * len(batch.executions) + len(batch.rollups)

    @_locked
    def load_devices(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT view_json FROM devices ORDER BY device_id").fetchall()
        return [json.loads(r[0]) for r in rows]

    @_locked
    def executions(self, rollout_id: str) -> list[ExecutionRow]:
        rows = self._db.execute(
            "SELECT rollout_id, device_id, status, version_number, step, reason, updated_at FROM executions "
            "WHERE rollout_id = ? ORDER BY device_id",
            (rollout_id,),
        ).fetchall()
        return [ExecutionRow(*r) for r in rows]

    @_locked
    def history(self, rollout_id: str) -> list[ExecutionRow]:
        rows = self._db.execute(
            "SELECT rollout_id, device_id, status, version_number, step, reason, ts FROM execution_history "
            "WHERE rollout_id = ? ORDER BY id",
            (rollout_id,),
        ).fetchall()
        return [ExecutionRow(*r) for r in rows]

    @_locked
    def rollups(self, device_id: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Per device-minute rows, oldest first; ``since`` keeps minutes that end after it."""
        query = (
            "SELECT device_id, minute, results, errors, batches, latency_p95_ms, model_version FROM rollups"
        )
        clauses: list[str] = []
        params: list[str | float] = []
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if since is not None:
            clauses.append("minute + 60 > ?")
            params.append(since)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        cols = ("device_id", "minute", "results", "errors", "batches", "latency_p95_ms", "model_version")
        return [dict(zip(cols, r, strict=True)) for r in self._db.execute(query + " ORDER BY minute", params)]

    @_locked
    def prune(self, older_than: float) -> int:
        """Retention: drop history and rollups older than ``older_than`` (Unix seconds)."""
        with self._db:
            a = self._db.execute("DELETE FROM execution_history WHERE ts < ?", (older_than,)).rowcount
            b = self._db.execute("DELETE FROM rollups WHERE minute < ?", (int(older_than),)).rowcount
        return int(a) + int(b)

    # --- rollouts (publisher/driver.py) ------------------------------------------------------------

    @_locked
    def add_model(self, sha256: str, size: int) -> None:
        try:
            self._db.execute(
                "INSERT INTO models VALUES (?,?,?) ON CONFLICT(sha256) DO NOTHING",
                (sha256, size, time.time()),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record model {sha256[:12]} in {self.path}: {exc}") from None

    @_locked
    def models(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute("SELECT sha256, size FROM models")}

    @_locked
    def add_rollout(self, row: RolloutRow) -> None:
        try:
            self._db.execute(
                "INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.rollout_id,
                    row.created_at,
                    row.updated_at,
                    row.state,
                    row.signed,
                    row.signature,
                    row.key_id,
                    row.model_sha256,
                    row.manifest,
                    json.dumps(row.extra),
                    json.dumps(row.controller),
                ),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"rollout {row.rollout_id} is already stored") from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store rollout {row.rollout_id} in {self.path}: {exc}") from None

    @_locked
    def save_controller(self, rollout_id: str, state: str, controller: dict[str, Any], ts: float) -> None:
        try:
            self._db.execute(
                "UPDATE rollouts SET state = ?, controller_json = ?, updated_at = ? WHERE rollout_id = ?",
                (state, json.dumps(controller, separators=(",", ":")), ts, rollout_id),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot save rollout {rollout_id} in {self.path}: {exc}") from None

    @_locked
    def load_rollouts(self) -> list[RolloutRow]:
        rows = self._db.execute(
            "SELECT rollout_id, created_at, updated_at, state, signed, signature, key_id, model_sha256, "
            "manifest, extra_json, controller_json FROM rollouts ORDER BY created_at"
        ).fetchall()
        return [
            RolloutRow(
                str(r[0]),
                float(r[1]),
                float(r[2]),
                str(r[3]),
                bytes(r[4]),
                bytes(r[5]),
                str(r[6]),
                str(r[7]),
                bytes(r[8]),
                json.loads(r[9]),
                json.loads(r[10]),
            )
            for r in rows
        ]

    @_locked
    def close(self) -> None:
        self._db.close()


def _device_row(v: DeviceView) -> tuple[Any, ...]:
    return (
        v.device_id,
        int(v.online),
        json.dumps(list(v.groups)),
        v.model_version,
        v.model_sha256,
        v.last_seen,
        v.rollout_id,
        v.rollout_status.value if v.rollout_status else None,
        v.inference_count,
        v.error_count,
        v.latency_p95_ms,
        json.dumps(v.as_dict()),
    )


def _exec_row(e: ExecutionRow) -> tuple[Any, ...]:
    return (e.rollout_id, e.device_id, e.status, e.version_number, e.step, e.reason, e.ts)


def retention_horizon(days: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) - days * 86400
