"""The chunk server's bookkeeping (docs/protocol.md, "Model transfer"), with no I/O at all.

Devices send a ``Fetch``: the bitmap of chunks they hold and a window of how many they will take now.
The server gathers fetches for a tick; ``due(now)`` then says what to send, each chunk once:

* on ``blob/{sha}/{i}`` when two or more devices want chunk i (every device fetching that file is
  subscribed there, so one publish serves all of them);
* on ``repair/{device}/{sha}/{i}`` when only one device does.

A device "wants" chunk i when it asked for it in this tick, or when it is still fetching the file
(its last fetch is under ``active_s`` old), its last bitmap lacks i, and i is not already on its way
to it.  The second half matters because devices that received a deploy together do not fetch in the
same 50 ms tick: without it, each of them would be repaired the same chunks one by one.  A device
keeps a chunk it lacks even when it did not ask for it (docs/protocol.md step 3), so nothing is lost.

A chunk sent less than ``quiet_s`` before a device's fetch arrived may still be on its way to that
device (its bitmap was written before the chunk could land), so it is not sent again for that fetch;
the window is filled from the next missing chunks instead, and the device asks again if it is lost.
A broadcast counts as on its way only to devices that were already fetching the file when it went
out: a device whose first fetch comes later may have subscribed after it.

The MQTT shell (``publisher/chunkshell.py``) feeds fetches in, calls ``due`` on a timer, and reads the
chunk bytes from the model file by offset.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from schemas import topics
from schemas.messages import Fetch

DEFAULT_QUIET_S = 1.0
DEFAULT_ACTIVE_S = 3.0


class FetchVerdict(str, enum.Enum):
    """What ``on_fetch`` made of a fetch."""

    ACCEPTED = "accepted"
    COMPLETE = "complete"  # the bitmap is full: nothing to send
    UNKNOWN_FILE = "unknown_file"  # not a file this server serves (another publisher's, or finished)
    BAD_BITMAP = "bad_bitmap"  # chunk count or bitmap length disagrees with the manifest


@dataclass(frozen=True)
class Send:
    """One chunk to publish: broadcast when ``device`` is None, else a repair for that device."""

    sha256: str
    index: int
    device: str | None = None

    @property
    def topic(self) -> str:
        if self.device is None:
            return topics.blob(self.sha256, self.index)
        return topics.repair(self.device, self.sha256, self.index)


@dataclass
class Counters:
    """What the server has done since it started; the shell reports these."""

    fetches: int = 0
    rejected: int = 0
    complete: int = 0
    blob_sent: int = 0
    repair_sent: int = 0
    in_flight_skips: int = 0

    @property
    def chunks_sent(self) -> int:
        return self.blob_sent + self.repair_sent

    def as_dict(self) -> dict[str, int]:
        return {
            "fetches": self.fetches,
            "rejected": self.rejected,
            "complete": self.complete,
            "blob_sent": self.blob_sent,
            "repair_sent": self.repair_sent,
            "in_flight_skips": self.in_flight_skips,
        }


@dataclass(frozen=True)
class _Request:
    device: str
    sha256: str
    chunk_count: int
    bitmap: bytes
    window: int
    at: float
    since: float  # when this device's first fetch of the file arrived


def bitmap_size(chunk_count: int) -> int:
    return (chunk_count + 7) // 8


def has_chunk(bitmap: bytes, index: int) -> bool:
    return bool(bitmap[index // 8] & (1 << (index % 8)))


def held_count(bitmap: bytes, chunk_count: int) -> int:
    return sum(1 for i in range(chunk_count) if has_chunk(bitmap, i))


def missing(bitmap: bytes, chunk_count: int) -> Iterator[int]:
    """Indices of the chunks a bitmap lacks, in order (lazily: a window needs only the first few)."""
    for byte_index, byte in enumerate(bitmap):
        if byte == 0xFF:
            continue
        base = byte_index * 8
        for bit in range(8):
            i = base + bit
            if i >= chunk_count:
                return
            if not byte & (1 << bit):
                yield i


@dataclass
class ChunkServer:
    """Pending fetches and recent sends for every file being served; drive it with on_fetch / due."""

    quiet_s: float = DEFAULT_QUIET_S
    active_s: float = DEFAULT_ACTIVE_S
    counters: Counters = field(default_factory=Counters)
    _files: dict[str, int] = field(default_factory=dict)
    _pending: dict[tuple[str, str], _Request] = field(default_factory=dict)
    _broadcast_at: dict[tuple[str, int], float] = field(default_factory=dict)
    _repair_at: dict[tuple[str, str, int], float] = field(default_factory=dict)
    _held: dict[str, dict[str, int]] = field(default_factory=dict)
    _latest: dict[str, dict[str, _Request]] = field(default_factory=dict)

    def add_file(self, sha256: str, chunk_count: int) -> None:
        """Start serving a file of ``chunk_count`` chunks."""
        topics.validate_sha(sha256)
        if chunk_count < 1:
            raise ValueError(f"a file has at least one chunk, got {chunk_count}")
        self._files[sha256] = chunk_count
        self._held.setdefault(sha256, {})

    def remove_file(self, sha256: str) -> None:
        self._files.pop(sha256, None)
        self._held.pop(sha256, None)
        self._latest.pop(sha256, None)
        self._pending = {k: r for k, r in self._pending.items() if r.sha256 != sha256}

    @property
    def files(self) -> dict[str, int]:
        return dict(self._files)

    def progress(self, sha256: str) -> dict[str, tuple[int, int]]:
        """Per device that has fetched this file: (chunks held, chunk count) from its last bitmap."""
        total = self._files.get(sha256, 0)
        return {dev: (held, total) for dev, held in self._held.get(sha256, {}).items()}

    def on_fetch(self, device: str, fetch: Fetch, now: float) -> FetchVerdict:
        """Record a device's fetch; the latest fetch of a device for a file replaces its earlier one."""
        self.counters.fetches += 1
        count = self._files.get(fetch.sha256)
        if count is None:
            self.counters.rejected += 1
            return FetchVerdict.UNKNOWN_FILE
        if fetch.chunk_count != count or len(fetch.bitmap) != bitmap_size(count):
            self.counters.rejected += 1
            return FetchVerdict.BAD_BITMAP
        self._held[fetch.sha256][device] = held_count(fetch.bitmap, count)
        key = (device, fetch.sha256)
        if next(missing(fetch.bitmap, count), None) is None:
            self.counters.complete += 1
            self._pending.pop(key, None)
            self._latest.get(fetch.sha256, {}).pop(device, None)
            return FetchVerdict.COMPLETE
        previous = self._latest.get(fetch.sha256, {}).get(device)
        since = previous.since if previous is not None else now
        request = _Request(device, fetch.sha256, count, fetch.bitmap, fetch.window, now, since)
        self._pending[key] = request
        self._latest.setdefault(fetch.sha256, {})[device] = request
        return FetchVerdict.ACCEPTED

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _in_flight(self, request: _Request, index: int) -> bool:
        sent = self._broadcast_at.get((request.sha256, index))
        # A broadcast counts as on its way only to devices already fetching when it went out; one
        # that first asked later may have subscribed too late to see it.
        if sent is not None and request.since <= sent and request.at - sent < self.quiet_s:
            return True
        sent = self._repair_at.get((request.device, request.sha256, index))
        return sent is not None and request.at - sent < self.quiet_s

    def due(self, now: float) -> list[Send]:
        """Everything the fetches gathered since the last call ask for, each chunk once, in order."""
        demand: dict[tuple[str, int], list[str]] = {}
        for request in self._pending.values():
            picked = 0
            for index in missing(request.bitmap, request.chunk_count):
                if picked >= request.window:
                    break
                if self._in_flight(request, index):
                    self.counters.in_flight_skips += 1
                    continue
                demand.setdefault((request.sha256, index), []).append(request.device)
                picked += 1
        self._pending.clear()
        sends: list[Send] = []
        for (sha, index), devices in sorted(demand.items()):
            if len(devices) >= 2 or self._someone_else_lacks(sha, index, devices[0], now):
                sends.append(Send(sha, index))
                self._broadcast_at[(sha, index)] = now
                self.counters.blob_sent += 1
            else:
                sends.append(Send(sha, index, devices[0]))
                self._repair_at[(devices[0], sha, index)] = now
                self.counters.repair_sent += 1
        self._forget_before(now - 2 * self.quiet_s)
        return sends

    def _someone_else_lacks(self, sha256: str, index: int, device: str, now: float) -> bool:
        for other, request in self._latest.get(sha256, {}).items():
            if (
                other != device
                and now - request.at < self.active_s
                and not has_chunk(request.bitmap, index)
                and not self._in_flight(request, index)
            ):
                return True
        return False

    def _forget_before(self, horizon: float) -> None:
        # Sends older than this can no longer mark anything in flight; drop them to bound memory.
        self._broadcast_at = {k: t for k, t in self._broadcast_at.items() if t >= horizon}
        self._repair_at = {k: t for k, t in self._repair_at.items() if t >= horizon}
        for latest in self._latest.values():
            for device in [d for d, r in latest.items() if r.at < horizon - self.active_s]:
                del latest[device]
