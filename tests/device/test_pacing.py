"""Fetch pacing: pipelining at half a window, backpressure, and retries with capped backoff."""

from __future__ import annotations

import pytest

from device.pacing import FetchPacer


def pacer(jitter: float = 0.0) -> FetchPacer:
    return FetchPacer(window=8, timeout_s=1.0, backoff_max_s=5.0, jitter=lambda: jitter)


def test_next_fetch_goes_out_when_half_the_window_is_stored() -> None:
    """With a window of 8, the 4th stored chunk triggers the next fetch (pipelining)."""
    p = pacer()
    p.sent(0.0)
    assert [p.stored(0.1 * i, backlog=0) for i in range(1, 5)] == [False, False, False, True]


def test_a_push_is_waited_for_like_a_fetch_of_that_many_chunks() -> None:
    """Four pushed chunks: the 2nd stored asks for more; silence after the push retries at the timeout."""
    p = pacer()
    p.expect(0.0, 4)
    assert [p.stored(0.1 * i, backlog=0) for i in range(1, 3)] == [False, True]
    p = pacer()
    p.expect(0.0, 4)
    assert not p.tick(0.9, backlog=0)
    assert p.tick(1.0, backlog=0)
    p.sent(1.0)  # a real fetch asks for a whole window again
    assert [p.stored(1.0 + 0.1 * i, backlog=0) for i in range(1, 5)] == [False, False, False, True]


def test_a_backlog_holds_the_next_fetch() -> None:
    """While more than half a window sits unread in the inbox, no new fetch is asked for."""
    p = pacer()
    p.sent(0.0)
    for i in range(3):
        p.stored(0.1 * i, backlog=0)
    assert not p.stored(0.4, backlog=5)
    assert p.stored(0.5, backlog=4)


def test_silence_retries_with_exponential_backoff_capped() -> None:
    """Each unanswered fetch waits twice as long as the last, never more than the cap."""
    p = pacer()
    now, waits = 0.0, []
    p.sent(now)
    for _ in range(5):
        waits.append(p.due - now)
        now = p.due
        assert p.tick(now, backlog=0)
        p.sent(now)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_progress_resets_the_backoff_and_a_busy_inbox_is_not_silence() -> None:
    """A stored chunk restarts the timeout from its base; a backlog postpones the retry."""
    p = pacer()
    p.sent(0.0)
    assert p.tick(1.0, backlog=0)
    p.sent(1.0)
    assert p.attempt == 1
    p.stored(1.5, backlog=0)
    assert p.attempt == 0
    assert not p.tick(p.due, backlog=3)
    assert p.attempt == 0
    assert not p.tick(0.0, backlog=0)
    p.stop()
    assert not p.tick(1e9, backlog=0)


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_jitter_spreads_retries_by_at_most_a_quarter(jitter: float) -> None:
    """Jitter adds between 0 and 25 % to every wait, so a fleet does not retry in step."""
    p = pacer(jitter)
    p.sent(0.0)
    assert 1.0 <= p.due <= 1.25
