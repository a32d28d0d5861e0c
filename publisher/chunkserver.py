"""The chunk server's bookkeeping (docs/protocol.md, "Model transfer"), with no I/O at all.

Devices send a ``Fetch``: the bitmap of chunks they hold and a window of how many they will take now
(their credit).  ``due(now)`` says what to send for the fetches gathered since the last call, each
chunk once per call, in index order, at most ``window`` per device, skipping chunks on their way:

* **The first send of a chunk goes on** ``blob/{sha}/{i}``, even for one device: every device
  fetching the file is subscribed there, those that got the deploy a moment later included (their
  first fetch is still on its way), so one publish serves all of them.
* **A chunk already broadcast** goes on ``blob`` again only when most of the devices still fetching
  the file (last fetch under ``active_s`` old) lack it and it is not on its way to them; otherwise
  each device that asked gets it on ``repair/{device}/{sha}/{i}``.  A repeat on ``blob`` reaches
  every subscriber, most of which would drop it as a duplicate.

**On its way.**  A send counts as on its way to a device, and is not repeated for it, until the
device's bitmap proves it lost or its patience runs out:

* sends are numbered in publish order.  A send older than the newest one the device's bitmap holds,
  and still missing, was lost: it is resent at once.  (amqtt reorders the messages of a badly
  overloaded subscriber, so at 100 devices in one process this resends some chunks that were only
  overtaken; waiting a fetch for confirmation cost small fleets a fetch timeout each.)
* a broadcast reached the device if it was already fetching when it went out, or if its bitmap holds
  an earlier broadcast.  A device whose first fetch came after a broadcast may have subscribed in
  time or not: its first fetch assumes it did, a later fetch whose bitmap shows no broadcast gets
  what it lacks;
* patience is ``quiet_s``, or twice the longest a chunk has taken to show up in that device's bitmap
  (TCP's retransmission timeout idea): in a 100-device fleet a window takes seconds to fan out.

**When to answer** (``next_due``): as soon as every device still fetching the file has asked in this
round, so a lone device, or a fleet in step, is served the moment its fetch lands; a round that some
device is late for waits at most ``hold_s``.  ``gather_s`` (0 by default) holds the first fetch of a
file nobody is fetching.  A device asks for its next window when half of the last one has landed,
so the wait for the next answer hides behind the other half (credit-based flow control).

The MQTT shell (``publisher/chunkshell.py``) feeds fetches in, calls ``due`` when ``next_due`` says,
and reads the chunk bytes from the model file by offset.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from schemas import topics
from schemas.messages import Fetch

DEFAULT_QUIET_S = 3.0
DEFAULT_ACTIVE_S = 3.0
DEFAULT_HOLD_S = 0.02
DEFAULT_GATHER_S = 0.0


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
    rebroadcasts: int = 0  # a chunk sent on blob again because most fetching devices lacked it

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
            "rebroadcasts": self.rebroadcasts,
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
    # Sends (by publish order) this device's bitmap shows it received: the earliest broadcast (it was
    # subscribed from then on) and the latest send (one sent before that and still missing was lost).
    seen_from: int | None = None
    last_seen: int | None = None
    # How long a send to this device counts as on its way: quiet_s, or twice the longest it has
    # taken a chunk to show up in this device's bitmap (TCP's RTO idea), whichever is longer.
    patience: float = DEFAULT_QUIET_S


@dataclass(frozen=True)
class _Sent:
    at: float
    seq: int  # publish order


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
    hold_s: float = DEFAULT_HOLD_S
    gather_s: float = DEFAULT_GATHER_S
    counters: Counters = field(default_factory=Counters)
    _files: dict[str, int] = field(default_factory=dict)
    _pending: dict[tuple[str, str], _Request] = field(default_factory=dict)
    _broadcast_at: dict[tuple[str, int], _Sent] = field(default_factory=dict)
    _repair_at: dict[tuple[str, str, int], _Sent] = field(default_factory=dict)
    _seq: int = 0
    _held: dict[str, dict[str, int]] = field(default_factory=dict)
    _latest: dict[str, dict[str, _Request]] = field(default_factory=dict)
    _broadcast_once: dict[str, set[int]] = field(default_factory=dict)
    _last_send: dict[str, float] = field(default_factory=dict)

    def add_file(self, sha256: str, chunk_count: int) -> None:
        """Start serving a file of ``chunk_count`` chunks."""
        topics.validate_sha(sha256)
        if chunk_count < 1:
            raise ValueError(f"a file has at least one chunk, got {chunk_count}")
        self._files[sha256] = chunk_count
        self._held.setdefault(sha256, {})

    def note_push(self, sha256: str, indexes: list[int]) -> None:
        """Chunks pushed after a deploy (docs/protocol.md): they count as broadcast once.

        A device that still lacks one (it missed the push, or came later) is then sent it like any
        chunk already broadcast: on repair, unless most devices fetching lack it. A first-time blob
        broadcast of it late in a transfer would reach every device that took the push as the
        newest send its bitmap holds, and mark everything older it still waits for as lost.
        """
        if sha256 in self._files:
            self._broadcast_once.setdefault(sha256, set()).update(indexes)

    def remove_file(self, sha256: str) -> None:
        self._files.pop(sha256, None)
        self._held.pop(sha256, None)
        self._latest.pop(sha256, None)
        self._broadcast_once.pop(sha256, None)
        self._last_send.pop(sha256, None)
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
        seen_from, last_seen, slowest = self._seen(device, fetch, previous, now)
        patience = max(self.quiet_s, 2 * slowest, previous.patience if previous is not None else 0.0)
        request = _Request(
            device,
            fetch.sha256,
            count,
            fetch.bitmap,
            fetch.window,
            now,
            since,
            seen_from,
            last_seen,
            patience,
        )
        self._pending[key] = request
        self._latest.setdefault(fetch.sha256, {})[device] = request
        return FetchVerdict.ACCEPTED

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _seen(
        self, device: str, fetch: Fetch, previous: _Request | None, now: float
    ) -> tuple[int | None, int | None, float]:
        """Among recent sends this bitmap holds: the earliest broadcast, the latest send, and the
        longest a send took to show up (over those the device's previous bitmap lacked)."""
        broadcasts: list[_Sent] = [
            sent
            for (sha, index), sent in self._broadcast_at.items()
            if sha == fetch.sha256 and has_chunk(fetch.bitmap, index)
        ]
        sends = broadcasts + [
            sent
            for (dev, sha, index), sent in self._repair_at.items()
            if dev == device and sha == fetch.sha256 and has_chunk(fetch.bitmap, index)
        ]
        slowest = 0.0
        if previous is not None:
            mine = [
                ((sha, index), sent) for (dev, sha, index), sent in self._repair_at.items() if dev == device
            ]
            fresh = [
                sent
                for (sha, index), sent in [*self._broadcast_at.items(), *mine]
                if sha == fetch.sha256
                and has_chunk(fetch.bitmap, index)
                and not has_chunk(previous.bitmap, index)
            ]
            slowest = max((now - sent.at for sent in fresh), default=0.0)
        return (
            min((b.seq for b in broadcasts), default=None),
            max((x.seq for x in sends), default=None),
            slowest,
        )

    def _in_flight(self, request: _Request, index: int) -> bool:
        sent = self._broadcast_at.get((request.sha256, index))
        if sent is not None and request.since > sent.at and request.seen_from is None:
            # A newcomer whose bitmap shows no broadcast yet: on its first fetch a broadcast counts
            # as on its way (it subscribed just before, maybe in time); a later fetch still showing
            # none means it subscribed too late, and it is sent what it lacks.
            if request.at == request.since and self._on_its_way(request, sent):
                return True
        elif sent is not None and self._subscribed(request, sent) and self._on_its_way(request, sent):
            return True
        sent = self._repair_at.get((request.device, request.sha256, index))
        return sent is not None and self._on_its_way(request, sent)

    def _on_its_way(self, request: _Request, sent: _Sent) -> bool:
        """A send the device may still receive: recent, and nothing sent after it arrived first."""
        if request.at - sent.at >= request.patience:
            return False
        return request.last_seen is None or sent.seq > request.last_seen

    def next_due(self, now: float) -> float | None:
        """When ``due`` should next be called for the fetches pending now (None: nothing pending)."""
        first: dict[str, float] = {}
        asked: dict[str, set[str]] = {}
        for request in self._pending.values():
            first[request.sha256] = min(first.get(request.sha256, request.at), request.at)
            asked.setdefault(request.sha256, set()).add(request.device)
        soonest: float | None = None
        for sha, started in first.items():
            fetching = {d for d, r in self._latest.get(sha, {}).items() if now - r.at < self.active_s}
            if now - self._last_send.get(sha, -1e18) >= self.active_s:
                at = started + self.gather_s  # a cold file: wait for the rest of the fleet's first fetch
            elif fetching <= asked[sha]:
                at = now  # everyone still fetching has asked: nobody to wait for
            else:
                at = started + self.hold_s
            soonest = at if soonest is None else min(soonest, at)
        return soonest

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
            if self._broadcast_pays(sha, index, devices, now):
                sends.append(Send(sha, index))
                self._broadcast_at[(sha, index)] = self._stamp(now)
                self.counters.blob_sent += 1
                once = self._broadcast_once.setdefault(sha, set())
                if index in once:
                    self.counters.rebroadcasts += 1
                once.add(index)
            else:
                for device in devices:
                    sends.append(Send(sha, index, device))
                    self._repair_at[(device, sha, index)] = self._stamp(now)
                    self.counters.repair_sent += 1
            self._last_send[sha] = now
        patience = max((r.patience for f in self._latest.values() for r in f.values()), default=0.0)
        self._forget_before(now - 2 * max(self.quiet_s, patience))
        return sends

    def _stamp(self, now: float) -> _Sent:
        self._seq += 1
        return _Sent(now, self._seq)

    @staticmethod
    def _subscribed(request: _Request, sent: _Sent) -> bool:
        """Whether a broadcast reached the device, when its bitmap holds an earlier one."""
        if request.since <= sent.at:
            return True  # the device was already fetching, so subscribed, when it went out
        return request.seen_from is not None and sent.seq >= request.seen_from

    def _broadcast_pays(self, sha256: str, index: int, devices: list[str], now: float) -> bool:
        """Whether chunk ``index`` goes on blob (True) or to each of ``devices`` on repair."""
        if index not in self._broadcast_once.get(sha256, ()):
            # Its first send: everyone subscribed lacks it, and devices starting a moment later
            # (whose first fetch is still on its way) get it from the same publish.
            return True
        fetching = 0
        lacking = len(devices)
        for other, request in self._latest.get(sha256, {}).items():
            if now - request.at >= self.active_s:
                continue
            fetching += 1
            if (
                other not in devices
                and not has_chunk(request.bitmap, index)
                and not self._in_flight(request, index)
            ):
                lacking += 1
        # Sent on blob before: again only if most subscribers want it, else it mostly lands as duplicates.
        return lacking >= 2 and 2 * lacking > fetching

    def _forget_before(self, horizon: float) -> None:
        # Sends older than this can no longer mark anything in flight; drop them to bound memory.
        self._broadcast_at = {k: t for k, t in self._broadcast_at.items() if t.at >= horizon}
        self._repair_at = {k: t for k, t in self._repair_at.items() if t.at >= horizon}
        for latest in self._latest.values():
            for device in [d for d, r in latest.items() if r.at < horizon - self.active_s]:
                del latest[device]
