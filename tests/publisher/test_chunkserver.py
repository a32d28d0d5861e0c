"""The chunk server's bookkeeping, driven directly with no network."""

from __future__ import annotations

from collections.abc import Iterable

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from publisher.chunkserver import ChunkServer, FetchVerdict, Send, bitmap_size, missing
from schemas import topics
from schemas.messages import Fetch

SHA = "ab" * 32
OTHER = "cd" * 32


def bitmap(count: int, held: Iterable[int] = ()) -> bytes:
    out = bytearray(bitmap_size(count))
    for i in held:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def fetch(device: str, count: int, held: Iterable[int] = (), window: int = 8, sha: str = SHA) -> Fetch:
    return Fetch(device_id=device, sha256=sha, chunk_count=count, bitmap=bitmap(count, held), window=window)


def server(count: int = 20, quiet_s: float = 1.0) -> ChunkServer:
    s = ChunkServer(quiet_s=quiet_s)
    s.add_file(SHA, count)
    return s


def test_single_device_gets_its_window_as_repairs() -> None:
    """One device asking alone gets the first `window` missing chunks on its repair topic."""
    s = server()
    assert s.on_fetch("d1", fetch("d1", 20, {0, 2}, window=3), now=0.0) is FetchVerdict.ACCEPTED
    sends = s.due(0.05)
    assert sends == [Send(SHA, 1, "d1"), Send(SHA, 3, "d1"), Send(SHA, 4, "d1")]
    assert sends[0].topic == topics.repair("d1", SHA, 1)
    assert s.counters.repair_sent == 3
    assert s.counters.blob_sent == 0


def test_two_devices_wanting_a_chunk_share_one_broadcast() -> None:
    """A chunk wanted by two or more devices in one tick is published once, on the blob topic."""
    s = server()
    for d in ("d1", "d2", "d3"):
        s.on_fetch(d, fetch(d, 20, window=4), now=0.0)
    sends = s.due(0.05)
    assert sends == [Send(SHA, i) for i in range(4)]
    assert all(x.topic == topics.blob(SHA, x.index) for x in sends)
    assert s.counters.blob_sent == 4
    assert s.counters.repair_sent == 0


def test_mixed_demand_splits_into_blob_and_repair() -> None:
    """A chunk asked for by two goes on blob, one only its asker lacks goes on repair; one the other
    fetcher also lacks goes on blob too."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, {2}, window=2), now=0.0)  # wants 0, 1
    s.on_fetch("d2", fetch("d2", 20, {0}, window=2), now=0.0)  # wants 1, 2
    assert s.due(0.05) == [Send(SHA, 0, "d1"), Send(SHA, 1), Send(SHA, 2, "d2")]
    s.on_fetch("d3", fetch("d3", 20, range(4), window=2), now=0.1)  # wants 4, 5; d1 and d2 lack them
    assert s.due(0.15) == [Send(SHA, 4), Send(SHA, 5)]


def test_staggered_fetchers_still_share_broadcasts() -> None:
    """A device asking one tick after another for chunks the other also lacks gets them on blob."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=4), now=0.0)
    assert s.due(0.05) == [Send(SHA, i, "d1") for i in range(4)]
    s.on_fetch("d2", fetch("d2", 20, window=8), now=0.07)
    # 0-3 are on their way to d1 only, so d2 gets them repaired; 4-7 are lacked by both: broadcast.
    assert s.due(0.1) == [*(Send(SHA, i, "d2") for i in range(4)), *(Send(SHA, i) for i in range(4, 8))]


def test_idle_fetcher_no_longer_counts_as_wanting() -> None:
    """A device whose last fetch is older than active_s does not turn a repair into a broadcast."""
    s = server()
    s.on_fetch("gone", fetch("gone", 20, window=1), now=0.0)
    s.due(0.0)
    s.on_fetch("d1", fetch("d1", 20, {0}, window=1), now=10.0)
    assert s.due(10.0) == [Send(SHA, 1, "d1")]


def test_window_is_respected_per_device() -> None:
    """No device is sent more chunks in one tick than its window."""
    s = server(count=100)
    s.on_fetch("small", fetch("small", 100, window=1), now=0.0)
    s.on_fetch("big", fetch("big", 100, range(50), window=10), now=0.0)
    sends = s.due(0.05)
    # small's one chunk only it lacks goes to it alone; big's ten (which small lacks too) are broadcast.
    assert sends == [Send(SHA, 0, "small"), *(Send(SHA, i) for i in range(50, 60))]


def test_recent_broadcast_is_not_repeated_for_an_early_request() -> None:
    """A chunk broadcast under a second before a request arrived is treated as in flight and skipped."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=2), now=0.0)
    s.on_fetch("d2", fetch("d2", 20, window=2), now=0.0)
    assert s.due(0.05) == [Send(SHA, 0), Send(SHA, 1)]
    # d1 asks again before chunks 0 and 1 could have landed: it gets the next window instead.
    s.on_fetch("d1", fetch("d1", 20, window=2), now=0.3)
    assert s.due(0.35) == [Send(SHA, 2), Send(SHA, 3)]  # d2, still fetching, lacks them too
    assert s.counters.in_flight_skips == 2


def test_newcomer_is_not_denied_a_chunk_broadcast_before_it_asked() -> None:
    """A device whose first fetch follows a broadcast may have missed it, so it is sent again."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    s.on_fetch("d2", fetch("d2", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0)]
    s.on_fetch("late", fetch("late", 20, window=1), now=0.2)
    assert s.due(0.2) == [Send(SHA, 0, "late")]


def test_lost_chunk_is_sent_again_after_the_quiet_period() -> None:
    """A request made more than quiet_s after a send gets the chunk again (it was lost)."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0, "d1")]
    s.on_fetch("d1", fetch("d1", 20, window=1), now=1.5)
    assert s.due(1.5) == [Send(SHA, 0, "d1")]


def test_repair_to_one_device_does_not_hide_the_chunk_from_another() -> None:
    """A repair sent to d1 is in flight only for d1; d2 asking for the same chunk still gets it."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    s.due(0.0)
    s.on_fetch("d2", fetch("d2", 20, window=1), now=0.1)
    assert s.due(0.1) == [Send(SHA, 0, "d2")]


def test_latest_fetch_of_a_device_replaces_its_earlier_one() -> None:
    """Two fetches from one device in one tick count once, with the newest bitmap."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=2), now=0.0)
    s.on_fetch("d1", fetch("d1", 20, {0, 1}, window=2), now=0.01)
    assert s.due(0.05) == [Send(SHA, 2, "d1"), Send(SHA, 3, "d1")]


def test_unknown_file_and_bad_bitmaps_are_refused_and_counted() -> None:
    """Fetches for a file not served, or with a bitmap that does not fit, send nothing."""
    s = server(count=20)
    assert s.on_fetch("d1", fetch("d1", 20, sha=OTHER), now=0) is FetchVerdict.UNKNOWN_FILE
    assert s.on_fetch("d1", fetch("d1", 21), now=0) is FetchVerdict.BAD_BITMAP
    short = Fetch(device_id="d1", sha256=SHA, chunk_count=20, bitmap=b"\x00")
    assert s.on_fetch("d1", short, now=0) is FetchVerdict.BAD_BITMAP
    assert s.due(0.1) == []
    assert s.counters.rejected == 3
    assert s.counters.fetches == 3


def test_full_bitmap_completes_and_records_progress() -> None:
    """A full bitmap is COMPLETE, sends nothing, and shows as all chunks held."""
    s = server(count=10)
    s.on_fetch("d1", fetch("d1", 10, range(4)), now=0)
    assert s.progress(SHA) == {"d1": (4, 10)}
    assert s.on_fetch("d1", fetch("d1", 10, range(10)), now=0) is FetchVerdict.COMPLETE
    assert s.due(0.1) == []
    assert s.progress(SHA) == {"d1": (10, 10)}


def test_two_files_are_served_independently() -> None:
    """Fetches for different files never merge into one broadcast."""
    s = server(count=4)
    s.add_file(OTHER, 4)
    s.on_fetch("d1", fetch("d1", 4, window=1), now=0)
    s.on_fetch("d2", fetch("d2", 4, window=1, sha=OTHER), now=0)
    assert s.due(0.1) == [Send(SHA, 0, "d1"), Send(OTHER, 0, "d2")]


def test_withdrawn_file_drops_pending_requests() -> None:
    """Removing a file forgets the fetches waiting for it."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20), now=0)
    s.remove_file(SHA)
    assert s.due(0.1) == []


def test_lockstep_fleet_moves_each_chunk_once() -> None:
    """Ten devices fetching together and applying what they receive get every chunk, each sent once."""
    count, devices = 37, [f"d{i}" for i in range(10)]
    s = server(count=count, quiet_s=1.0)
    held: dict[str, set[int]] = {d: set() for d in devices}
    now = 0.0
    for _ in range(50):
        for d in devices:
            if len(held[d]) < count:
                s.on_fetch(d, fetch(d, count, held[d], window=8), now)
        now += 1.1  # each round waits out the quiet period, so nothing is held back
        for send in s.due(now):
            targets = devices if send.device is None else [send.device]
            for d in targets:
                held[d].add(send.index)
        if all(len(h) == count for h in held.values()):
            break
    assert all(h == set(range(count)) for h in held.values())
    assert s.counters.blob_sent == count
    assert s.counters.repair_sent == 0


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 200),
    held=st.sets(st.integers(0, 199)),
    window=st.integers(1, 64),
)
def test_sends_are_missing_in_order_and_within_window(count: int, held: set[int], window: int) -> None:
    """For any bitmap, one device is sent the first `window` chunks it lacks, in order, never a held one."""
    s = server(count=count)
    mine = {i for i in held if i < count}
    s.on_fetch("d1", fetch("d1", count, mine, window=window), now=0)
    sends = s.due(0.0)
    expected = [i for i in range(count) if i not in mine][:window]
    assert [x.index for x in sends] == expected
    assert list(missing(bitmap(count, mine), count)) == [i for i in range(count) if i not in mine]


def test_add_file_rejects_a_bad_hash_or_count() -> None:
    """add_file refuses a non-SHA-256 name and an empty file."""
    s = ChunkServer()
    with pytest.raises(ValueError, match="SHA-256"):
        s.add_file("nothex", 3)
    with pytest.raises(ValueError, match="at least one chunk"):
        s.add_file(SHA, 0)
