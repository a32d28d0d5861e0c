"""broker/session_store.py: the sqlite file of sessions, queues and retained messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import SessionStoreError
from broker.session_store import QueuedMessage, SessionStore


def test_everything_written_is_read_back_after_reopening(tmp_path: Path) -> None:
    """Retained messages, sessions with subscriptions and queues survive closing the file."""
    store = SessionStore(tmp_path)
    store.put_retained("r/1", b"one", 1)
    store.put_retained("r/2", b"two", 0)
    store.put_retained("r/1", b"uno", 1)
    store.drop_retained("r/2")
    store.save_session("dev-1", "dev-1")
    store.put_subscription("dev-1", "cmd/dev-1", 1)
    store.put_subscription("dev-1", "tmp/#", 0)
    store.drop_subscription("dev-1", "tmp/#")
    first = store.enqueue("dev-1", "cmd/dev-1", b"a", 1)
    second = store.enqueue("dev-1", "cmd/dev-1", b"b", 1)
    store.dequeue(first)
    store.save_session("gone", None)
    store.put_subscription("gone", "x", 0)
    store.delete_session("gone")
    store.close()

    again = SessionStore(tmp_path)
    assert again.retained() == [("r/1", b"uno", 1)]
    [session] = again.sessions()
    assert session.client_id == "dev-1"
    assert session.username == "dev-1"
    assert session.subscriptions == {"cmd/dev-1": 1}
    assert session.queued == [QueuedMessage(second, "cmd/dev-1", b"b", 1)]
    again.close()


def test_unusable_directory_raises_session_store_error(tmp_path: Path) -> None:
    """A data_dir that is a file gives SessionStoreError with the path, not an sqlite error."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SessionStoreError, match="cannot open"):
        SessionStore(blocker)
