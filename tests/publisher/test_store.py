"""The SQLite store: WAL mode, batched writes, executions with history, rollups, retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from publisher.errors import StoreError
from publisher.fleet import DeviceView, Rollup
from publisher.store import Batch, ExecutionRow, SqliteStore
from schemas.messages import ExecStatus


def test_store_uses_wal(tmp_path: Path) -> None:
    """The database is opened in WAL mode."""
    store = SqliteStore(tmp_path / "f.db")
    assert store.journal_mode == "wal"
    store.close()


def test_devices_round_trip_and_upsert(tmp_path: Path) -> None:
    """Device views written in a batch load back; a second write replaces the first."""
    store = SqliteStore(tmp_path / "f.db")
    v = DeviceView(
        "d1", groups=("lab",), birth_bdseq=2, model_version="1", rollout_status=ExecStatus.SUCCEEDED
    )
    store.write(Batch(devices=[v]))
    v.model_version = "2"
    store.write(Batch(devices=[v]))
    loaded = store.load_devices()
    assert len(loaded) == 1
    assert loaded[0]["model_version"] == "2"
    assert loaded[0]["online"] is True
    assert loaded[0]["rollout_status"] == "SUCCEEDED"
    store.close()


def test_executions_keep_latest_and_full_history(tmp_path: Path) -> None:
    """executions holds the newest version per device; history holds every change in order."""
    store = SqliteStore(tmp_path / "f.db")
    rows = [
        ExecutionRow("r1", "d1", "QUEUED", 0, None, None, 1.0),
        ExecutionRow("r1", "d1", "IN_PROGRESS", 1, "downloading", None, 2.0),
        ExecutionRow("r1", "d1", "SUCCEEDED", 4, "activating", None, 3.0),
    ]
    store.write(Batch(executions=rows[:2]))
    store.write(Batch(executions=rows[2:]))
    store.write(Batch(executions=[ExecutionRow("r1", "d1", "QUEUED", 0, None, None, 4.0)]))  # a replay
    assert [e.status for e in store.executions("r1")] == ["SUCCEEDED"]
    assert [e.status for e in store.history("r1")] == ["QUEUED", "IN_PROGRESS", "SUCCEEDED", "QUEUED"]
    store.close()


def test_rollups_accumulate_per_device_minute(tmp_path: Path) -> None:
    """Two writes of the same device-minute add their counts and keep the larger p95."""
    store = SqliteStore(tmp_path / "f.db")
    store.write(Batch(rollups=[Rollup("d1", 60, results=10, errors=1, batches=1, latencies=[1.0, 2.0])]))
    store.write(Batch(rollups=[Rollup("d1", 60, results=5, errors=0, batches=1, latencies=[9.0])]))
    (row,) = store.rollups("d1")
    assert (row["results"], row["errors"], row["batches"], row["latency_p95_ms"]) == (15, 1, 2, 9.0)
    store.close()


def test_prune_drops_old_history_and_rollups(tmp_path: Path) -> None:
    """Retention removes history and rollups older than the horizon, and keeps newer rows."""
    store = SqliteStore(tmp_path / "f.db")
    store.write(
        Batch(
            executions=[
                ExecutionRow("r1", "d1", "QUEUED", 0, None, None, 10.0),
                ExecutionRow("r1", "d1", "SUCCEEDED", 1, None, None, 1000.0),
            ],
            rollups=[Rollup("d1", 0), Rollup("d1", 960)],
        )
    )
    assert store.prune(older_than=500.0) == 2
    assert [e.ts for e in store.history("r1")] == [1000.0]
    assert [r["minute"] for r in store.rollups()] == [960]
    store.close()


def test_one_batch_is_one_transaction(tmp_path: Path) -> None:
    """A failing batch leaves nothing of itself behind."""
    store = SqliteStore(tmp_path / "f.db")
    bad = Batch(
        devices=[DeviceView("d1")], executions=[ExecutionRow("r1", "d1", "QUEUED", 0, None, None, 1.0)]
    )
    store._db.execute("DROP TABLE execution_history")
    with pytest.raises(StoreError):
        store.write(bad)
    assert store.load_devices() == []
    store.close()


def test_unopenable_store_is_a_store_error(tmp_path: Path) -> None:
    """A path that cannot hold a database raises StoreError."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "dir.db")


def test_other_readers_see_committed_batches(tmp_path: Path) -> None:
    """A second connection reads what a batch committed (WAL readers do not block the writer)."""
    store = SqliteStore(tmp_path / "f.db")
    store.write(Batch(devices=[DeviceView("d1"), DeviceView("d2")]))
    with sqlite3.connect(tmp_path / "f.db") as other:
        assert other.execute("SELECT count(*) FROM devices").fetchone()[0] == 2
    store.close()
