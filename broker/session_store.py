"""Persistent sessions and retained messages in one sqlite file under the broker's ``data_dir``.

Why our own store rather than ``amqtt.contrib.persistence.SessionDBPlugin``: that plugin restores a
session without its user name, so an ACL plugin denies the restored subscriptions, and it writes the
whole session table on shutdown, so a crash loses everything since the last clean stop.

Here every change is written when it happens (write-through): a retained message, a persistent
session's subscription, a QoS 1/2 message queued for an offline persistent session, and its removal
once delivered. sqlite runs in WAL mode with ``synchronous=NORMAL``: each write is in the OS page
cache when the call returns, so a SIGKILLed broker loses nothing (a power cut may lose the last
transactions, never corrupt the file). Calls are synchronous; each is one small indexed statement,
cheaper than a hop to a thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import SessionStoreError

DB_NAME = "broker.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, username TEXT);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter));
CREATE TABLE IF NOT EXISTS queued (
    id INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS queued_by_client ON queued (client_id, id);
"""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    row_id: int
    topic: str
    payload: bytes
    qos: int


@dataclass(slots=True)
class StoredSession:
    client_id: str
    username: str | None
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: list[QueuedMessage] = field(default_factory=list)


class SessionStore:
    """The sqlite file; one instance per broker, used from the broker's event loop only."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_NAME
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SessionStoreError(f"cannot open the session store {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise SessionStoreError(f"session store {self.path}: {exc}") from None

    # retained messages
    def retained(self) -> list[tuple[str, bytes, int]]:
        return [(t, bytes(p), q) for t, p, q in self._run("SELECT topic, payload, qos FROM retained")]

    def put_retained(self, topic: str, payload: bytes, qos: int) -> None:
        self._run("INSERT OR REPLACE INTO retained VALUES (?, ?, ?)", (topic, payload, qos))

    def drop_retained(self, topic: str) -> None:
        self._run("DELETE FROM retained WHERE topic = ?", (topic,))

    # persistent sessions
    def sessions(self) -> list[StoredSession]:
        by_id = {
            cid: StoredSession(cid, user)
            for cid, user in self._run("SELECT client_id, username FROM sessions")
        }
        for cid, topic_filter, qos in self._run("SELECT client_id, filter, qos FROM subscriptions"):
            if cid in by_id:
                by_id[cid].subscriptions[topic_filter] = qos
        for row_id, cid, topic, payload, qos in self._run(
            "SELECT id, client_id, topic, payload, qos FROM queued ORDER BY id"
        ):
            if cid in by_id:
                by_id[cid].queued.append(QueuedMessage(row_id, topic, bytes(payload), qos))
        return list(by_id.values())

    def save_session(self, client_id: str, username: str | None) -> None:
        self._run("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (client_id, username))

    def delete_session(self, client_id: str) -> None:
        for table in ("sessions", "subscriptions", "queued"):
            self._run(f"DELETE FROM {table} WHERE client_id = ?", (client_id,))  # noqa: S608 - fixed names

    def put_subscription(self, client_id: str, topic_filter: str, qos: int) -> None:
        self._run("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?)", (client_id, topic_filter, qos))

    def drop_subscription(self, client_id: str, topic_filter: str) -> None:
        self._run("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?", (client_id, topic_filter))

    def enqueue(self, client_id: str, topic: str, payload: bytes, qos: int) -> int:
        cursor = self._run(
            "INSERT INTO queued (client_id, topic, payload, qos) VALUES (?, ?, ?, ?)",
            (client_id, topic, payload, qos),
        )
        return int(cursor.lastrowid or 0)

    def dequeue(self, row_id: int) -> None:
        self._run("DELETE FROM queued WHERE id = ?", (row_id,))
