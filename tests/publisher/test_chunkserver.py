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


def test_first_send_of_a_chunk_is_a_broadcast_even_for_one_device() -> None:
    """A lone device's window goes on blob the first time: devices starting a moment later share it."""
    s = server()
    assert s.on_fetch("d1", fetch("d1", 20, {0, 2}, window=3), now=0.0) is FetchVerdict.ACCEPTED
    sends = s.due(0.0)
    assert sends == [Send(SHA, 1), Send(SHA, 3), Send(SHA, 4)]
    assert sends[0].topic == topics.blob(SHA, 1)
    assert s.counters.blob_sent == 3
    assert s.counters.repair_sent == 0


def test_a_lone_device_asking_again_for_a_broadcast_chunk_gets_a_repair() -> None:
    """Chunks already broadcast that one device still lacks after quiet_s go on its repair topic."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=2), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0), Send(SHA, 1)]
    s.on_fetch("d1", fetch("d1", 20, window=2), now=1.5)  # both were lost
    sends = s.due(1.5)
    assert sends == [Send(SHA, 0, "d1"), Send(SHA, 1, "d1")]
    assert sends[0].topic == topics.repair("d1", SHA, 0)


def test_a_pushed_chunk_one_device_lacks_goes_to_it_on_repair_not_on_blob() -> None:
    """Chunks pushed after a deploy count as broadcast once: a device that missed one gets it alone
    (a late blob broadcast would look, to every device that took the push, like the newest send)."""
    s = server()
    s.note_push(SHA, [0, 1, 2, 3])
    s.on_fetch("d1", fetch("d1", 20, {1, 2, 3}, window=2), now=0.0)  # lost pushed chunk 0
    s.on_fetch("d2", fetch("d2", 20, {0, 1, 2, 3}, window=2), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0, "d1"), Send(SHA, 4), Send(SHA, 5)]
    # Most devices lacking a pushed chunk (they came after the push): one broadcast serves them.
    t = server()
    t.note_push(SHA, [0, 1, 2, 3])
    for d in ("d1", "d2", "d3"):
        t.on_fetch(d, fetch(d, 20, window=1), now=0.0)
    assert t.due(0.0) == [Send(SHA, 0)]


def test_two_devices_wanting_a_chunk_share_one_broadcast() -> None:
    """A chunk wanted by two or more devices in one round is published once, on the blob topic."""
    s = server()
    for d in ("d1", "d2", "d3"):
        s.on_fetch(d, fetch(d, 20, window=4), now=0.0)
    sends = s.due(0.05)
    assert sends == [Send(SHA, i) for i in range(4)]
    assert all(x.topic == topics.blob(SHA, x.index) for x in sends)
    assert s.counters.blob_sent == 4
    assert s.counters.repair_sent == 0


def test_a_repeat_goes_on_blob_only_when_most_fetching_devices_lack_it() -> None:
    """A lost chunk 3 of 4 fetching devices lack is rebroadcast; one only 1 of them lacks is repaired."""
    s = server()
    devices = ["d1", "d2", "d3", "d4"]
    for d in devices:
        s.on_fetch(d, fetch(d, 20, window=3), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0), Send(SHA, 1), Send(SHA, 2)]
    for d in devices[:3]:
        s.on_fetch(d, fetch(d, 20, {1, 2}, window=1), now=0.1)  # three lost chunk 0 (1 and 2 came)
    s.on_fetch("d4", fetch("d4", 20, {0, 2}, window=1), now=0.1)  # d4 lost chunk 1
    assert s.due(0.1) == [Send(SHA, 0), Send(SHA, 1, "d4")]
    assert s.counters.rebroadcasts == 1


def test_patience_grows_with_a_slow_devices_delivery_time() -> None:
    """A device whose chunks took 2 s to show up keeps later sends in flight for 4 s, not quiet_s."""
    s = server(quiet_s=1.0)
    s.on_fetch("slow", fetch("slow", 20, window=2), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0), Send(SHA, 1)]
    s.on_fetch("slow", fetch("slow", 20, {0}, window=2), now=2.0)  # 0 took 2 s; 1 may follow
    assert s.due(2.0) == [Send(SHA, 2), Send(SHA, 3)]
    s.on_fetch("slow", fetch("slow", 20, {0}, window=1), now=3.5)
    assert s.due(3.5) == [Send(SHA, 4)]  # 1, 2 and 3 are all younger than 4 s: still coming
    s.on_fetch("slow", fetch("slow", 20, {0}, window=1), now=4.5)
    assert s.due(4.5) == [Send(SHA, 1, "slow")]  # 1 is 4.5 s old: lost


def test_staggered_fetchers_still_share_broadcasts() -> None:
    """A device starting after a broadcast joins the stream: new chunks on blob, what it missed repaired."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=4), now=0.0)
    assert s.due(0.0) == [Send(SHA, i) for i in range(4)]
    # d2 subscribed just before its first fetch: 0-3 may be reaching it, so it is sent 4-11 (new: blob).
    s.on_fetch("d2", fetch("d2", 20, window=8), now=0.07)
    assert s.due(0.07) == [Send(SHA, i) for i in range(4, 12)]
    # Its bitmap holds 4-7 but not 0-3: it joined after those went out, so they are repaired, while
    # 8-11, broadcast with 4-7, are still on their way to it.
    s.on_fetch("d2", fetch("d2", 20, range(4, 8), window=4), now=0.3)
    assert s.due(0.3) == [Send(SHA, i, "d2") for i in range(4)]


def test_a_device_holding_an_early_broadcast_is_counted_as_receiving_the_later_ones() -> None:
    """A newcomer whose bitmap shows broadcast chunk 1 is not sent chunks 2-7 again: they reach it too."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=4), now=0.0)
    s.due(0.0)
    s.on_fetch("d2", fetch("d2", 20, window=4), now=0.01)
    assert s.due(0.01) == [Send(SHA, i) for i in range(4, 8)]
    s.on_fetch("d2", fetch("d2", 20, {1}, window=4), now=0.2)
    # 0 went out before d2 is shown to have subscribed; 2-7 went out after 1, so they are coming.
    assert s.due(0.2) == [Send(SHA, 0, "d2"), *(Send(SHA, i) for i in range(8, 11))]


def test_a_chunk_missing_before_one_that_arrived_is_lost_and_resent_at_once() -> None:
    """Chunks arrive in publish order, so one lacked while a later one is held is resent without waiting."""
    s = server(quiet_s=60.0)
    s.on_fetch("d1", fetch("d1", 20, window=4), now=0.0)
    assert s.due(0.0) == [Send(SHA, i) for i in range(4)]
    s.on_fetch("d1", fetch("d1", 20, {0, 2}, window=4), now=0.1)
    # 1 was lost (2 came after it); 3 may still be on its way.
    assert s.due(0.1) == [Send(SHA, 1, "d1"), *(Send(SHA, i) for i in range(4, 7))]


def test_idle_fetcher_no_longer_counts_as_wanting() -> None:
    """A device whose last fetch is older than active_s does not turn a repair into a broadcast."""
    s = server()
    s.on_fetch("gone", fetch("gone", 20, window=1), now=0.0)
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0)]
    s.on_fetch("d1", fetch("d1", 20, window=1), now=10.0)  # lost it; "gone" lacks it too, but is idle
    assert s.due(10.0) == [Send(SHA, 0, "d1")]


def test_window_is_respected_per_device() -> None:
    """No device is sent more chunks in one round than its window."""
    s = server(count=100)
    s.on_fetch("small", fetch("small", 100, window=1), now=0.0)
    s.on_fetch("big", fetch("big", 100, range(50), window=10), now=0.0)
    assert s.due(0.05) == [Send(SHA, 0), *(Send(SHA, i) for i in range(50, 60))]


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


def test_newcomer_first_fetch_waits_for_a_recent_broadcast_and_its_next_gets_it_repaired() -> None:
    """A device whose first fetch follows a broadcast is not sent it at once; if its next bitmap shows
    it subscribed after it, it is repaired."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    s.on_fetch("d2", fetch("d2", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0)]
    s.on_fetch("late", fetch("late", 20, window=1), now=0.2)
    assert s.due(0.2) == [Send(SHA, 1)]  # the next chunk nobody has had: everyone lacks it
    s.on_fetch("late", fetch("late", 20, {1}, window=1), now=0.5)
    assert s.due(0.5) == [Send(SHA, 0, "late")]


def test_lost_chunk_is_sent_again_after_the_quiet_period() -> None:
    """A request made more than quiet_s after a send gets the chunk again (it was lost)."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0)]
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.5)
    assert s.due(0.5) == [Send(SHA, 1)]  # 0 may still be on its way
    s.on_fetch("d1", fetch("d1", 20, window=1), now=1.5)
    assert s.due(1.5) == [Send(SHA, 0, "d1")]


def test_repair_to_one_device_does_not_hide_the_chunk_from_another() -> None:
    """A repair sent to d1 is in flight only for d1; d2, which missed the broadcast, still gets it."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    s.due(0.0)
    s.on_fetch("d1", fetch("d1", 20, window=1), now=1.5)
    assert s.due(1.5) == [Send(SHA, 0, "d1")]
    s.on_fetch("d2", fetch("d2", 20, window=1), now=1.6)  # the broadcast of 0 is too old to be coming
    assert s.due(1.6) == [Send(SHA, 0, "d2")]


def test_latest_fetch_of_a_device_replaces_its_earlier_one() -> None:
    """Two fetches from one device in one round count once, with the newest bitmap."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=2), now=0.0)
    s.on_fetch("d1", fetch("d1", 20, {0, 1}, window=2), now=0.01)
    assert s.due(0.05) == [Send(SHA, 2), Send(SHA, 3)]


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
    s.on_fetch("d2", fetch("d2", 4, window=1, sha=OTHER), now=0)
    assert s.due(0.1) == [Send(SHA, 0), Send(OTHER, 0)]
    assert s.counters.blob_sent == 2


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


def test_lone_device_is_answered_at_once() -> None:
    """When every device fetching the file has asked, the round is due immediately."""
    s = ChunkServer(hold_s=0.02, gather_s=0.0)
    s.add_file(SHA, 20)
    assert s.next_due(0.0) is None
    s.on_fetch("d1", fetch("d1", 20), now=1.0)
    assert s.next_due(1.0) == 1.0


def test_a_round_waits_for_the_other_fetching_devices_at_most_hold_s() -> None:
    """With two devices fetching, one device's fetch waits for the other's, but only hold_s."""
    s = ChunkServer(hold_s=0.02, gather_s=0.0)
    s.add_file(SHA, 20)
    for d in ("d1", "d2"):
        s.on_fetch(d, fetch(d, 20, window=2), now=0.0)
    s.due(0.0)
    s.on_fetch("d1", fetch("d1", 20, {0, 1}, window=2), now=0.5)
    assert s.next_due(0.5) == pytest.approx(0.52)
    s.on_fetch("d2", fetch("d2", 20, {0, 1}, window=2), now=0.51)
    assert s.next_due(0.51) == 0.51


def test_the_first_fetch_of_a_cold_file_gathers_for_gather_s() -> None:
    """A file nobody has fetched lately waits gather_s after its first fetch, so starters share."""
    s = ChunkServer(hold_s=0.02, gather_s=0.1)
    s.add_file(SHA, 20)
    s.on_fetch("d1", fetch("d1", 20), now=5.0)
    assert s.next_due(5.0) == pytest.approx(5.1)
    s.on_fetch("d2", fetch("d2", 20), now=5.05)
    assert s.due(5.1) == [Send(SHA, i) for i in range(8)]
    s.on_fetch("d1", fetch("d1", 20, range(8)), now=5.2)
    assert s.next_due(5.2) == pytest.approx(5.22)  # warm now: d2 is still fetching, hold only


def test_a_newcomer_that_never_shows_a_broadcast_gets_it_after_its_patience() -> None:
    """A device whose first fetch followed a broadcast and which never receives it is sent it anyway."""
    s = server()
    s.on_fetch("d1", fetch("d1", 20, window=1), now=0.0)
    assert s.due(0.0) == [Send(SHA, 0)]
    s.on_fetch("late", fetch("late", 20, window=1), now=0.5)
    assert s.due(0.5) == [Send(SHA, 1)]
    s.on_fetch("late", fetch("late", 20, window=1), now=1.6)  # nothing came: it subscribed too late
    assert s.due(1.6) == [Send(SHA, 0, "late")]


def test_add_file_rejects_a_bad_hash_or_count() -> None:
    """add_file refuses a non-SHA-256 name and an empty file."""
    s = ChunkServer()
    with pytest.raises(ValueError, match="SHA-256"):
        s.add_file("nothex", 3)
    with pytest.raises(ValueError, match="at least one chunk"):
        s.add_file(SHA, 0)
