"""The chunk server on the bus: fetches in, chunks out, bytes read from the model file by offset.

``ChunkShell`` subscribes to every device's ``fetch`` stream and feeds the pure ``ChunkServer`` under
a lock; a sender thread, woken by every fetch, publishes what ``due()`` returns as ``Chunk`` messages
as soon as ``next_due()`` says the round is ready (no fixed tick: a lone device is answered at once).
Each chunk's SHA-256 is checked against the manifest as it is read, so a model file changed on disk
after planning is never sent.

Encoded chunk messages are kept (up to ``cache_bytes`` per shell), and ``serve()`` encodes a file's
chunks up front: the first window then goes out at the broker's pace, not at the pace of reading,
hashing and encoding each chunk between publishes, and a repair or rebroadcast costs no read.

``push()`` sends a file's first chunks unasked, right after a live deploy on the same connection
(docs/protocol.md, "The first window rides with the deploy"). The devices that take them claim them
in their fetches until they land; the server counts them as broadcast once (``note_push``), so one
that a device still lacks goes to it on repair.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from publisher.bus import Bus
from publisher.chunkserver import (
    DEFAULT_GATHER_S,
    DEFAULT_HOLD_S,
    DEFAULT_QUIET_S,
    ChunkServer,
    FetchVerdict,
    Send,
)
from publisher.errors import BusError, PlanError
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.errors import DecodeError, TopicError
from schemas.messages import Chunk, Fetch, Manifest

log = structlog.get_logger("publisher.chunks")

DEFAULT_TICK_S = 0.05
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
# The first chunks of a file follow each live deploy unasked, so a device does not wait a fetch's
# round trip for them (docs/protocol.md).  A quarter of the most a device's fetch may ask for (4 MiB):
# what every device is sent without asking stays within any credit it could have given.
PUSH_BYTES = 1024 * 1024
# One push per target crosses the broker: a group costs one, but each device target costs its own.
# Beyond this many devices at once they fetch, and the first fetch starts one broadcast for all.
MAX_PUSHED_DEVICES = 8


def push_count(manifest: Manifest, push_bytes: int = PUSH_BYTES) -> int:
    """How many of the file's first chunks fit in ``push_bytes`` (0: no push)."""
    return min(manifest.chunk_count, max(0, push_bytes) // manifest.chunk_size)


@dataclass
class _ServedFile:
    path: Path
    manifest: Manifest
    handle: BinaryIO
    encoded: dict[int, bytes] = field(default_factory=dict)  # index -> encoded Chunk message

    def read(self, index: int) -> bytes:
        from publisher.plan import read_chunk

        data = read_chunk(self.handle, self.manifest.size, self.manifest.chunk_size, index)
        if hashlib.sha256(data).hexdigest() != self.manifest.chunk_sha256[index]:
            raise PlanError(f"{self.path} changed on disk: chunk {index} no longer matches the manifest")
        return data

    def message(self, index: int) -> bytes:
        """The encoded ``Chunk`` message for chunk ``index`` (read and checked, or cached)."""
        payload = self.encoded.get(index)
        if payload is None:
            data = self.read(index)
            payload = encode(Chunk(sha256=self.manifest.model_sha256, index=index, data=data))
        return payload


@dataclass
class ShellCounters:
    decode_errors: int = 0
    foreign_fetches: int = 0
    read_errors: int = 0
    publish_errors: int = 0
    tick_errors: int = 0
    bytes_sent: int = 0
    pushed: int = 0  # chunks sent unasked after a deploy
    verdicts: dict[str, int] = field(default_factory=dict)


class ChunkShell:
    """Serve the chunks of one or more model files to whoever fetches them."""

    def __init__(
        self,
        bus: Bus,
        *,
        tick_s: float = DEFAULT_TICK_S,
        quiet_s: float = DEFAULT_QUIET_S,
        hold_s: float = DEFAULT_HOLD_S,
        gather_s: float = DEFAULT_GATHER_S,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.bus = bus
        self.cache_bytes = cache_bytes
        self._cached = 0
        self.tick_s = tick_s  # the longest the sender sleeps without a fetch waking it
        self.server = ChunkServer(quiet_s=quiet_s, hold_s=hold_s, gather_s=gather_s)
        self.counters = ShellCounters()
        self._lock = threading.Lock()
        self._files: dict[str, _ServedFile] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self, path: str | Path, manifest: Manifest) -> None:
        """Start answering fetches for ``manifest``'s file, read from ``path``."""
        handle = open(path, "rb")  # noqa: SIM115 - held open for the life of the shell, closed in stop()
        served = _ServedFile(Path(path), manifest, handle)
        warmed = self._warm(served, self.cache_bytes - self._cached)
        with self._lock:
            self._cached += warmed
            old = self._files.pop(manifest.model_sha256, None)
            if old is not None:
                self._cached -= sum(map(len, old.encoded.values()))
            self._files[manifest.model_sha256] = served
            self.server.add_file(manifest.model_sha256, manifest.chunk_count)
        if old is not None:
            old.handle.close()

    @staticmethod
    def _warm(served: _ServedFile, room: int) -> int:
        """Encode the file's chunks, in order, within ``room`` bytes; returns the bytes kept."""
        kept = 0
        for index in range(served.manifest.chunk_count):
            if kept + served.manifest.chunk_size > room:
                break
            try:
                payload = served.message(index)
            except (PlanError, OSError, ValueError):
                continue  # a bad chunk is counted and logged when it is due to be sent
            served.encoded[index] = payload
            kept += len(payload)
        return kept

    def push(self, sha256: str, topic: Callable[[int], str], count: int) -> int:
        """Publish chunks ``0..count-1`` of a served file on ``topic(index)``; returns how many went out."""
        with self._lock:
            served = self._files.get(sha256)
        if served is None:
            return 0
        sent = 0
        for index in range(min(count, served.manifest.chunk_count)):
            if not self._publish_to(served, index, topic(index)):
                break  # the devices fetch what a push did not bring
            self.counters.pushed += 1
            sent += 1
        with self._lock:
            self.server.note_push(sha256, list(range(sent)))
        return sent

    def withdraw(self, sha256: str) -> None:
        with self._lock:
            served = self._files.pop(sha256, None)
            self.server.remove_file(sha256)
            if served is not None:
                self._cached -= sum(map(len, served.encoded.values()))
        if served is not None:
            served.handle.close()

    def start(self, ticker: bool = True) -> None:
        """Subscribe to fetches and start the ticker thread (tests may call ``tick()`` themselves)."""
        fetch_filter = topics.device_stream_filter(topics.DeviceStream.FETCH)
        self.bus.on(fetch_filter, self._on_fetch)
        self.bus.subscribe([fetch_filter])
        if ticker:
            self._thread = threading.Thread(target=self._run, name="chunk-ticker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for served in self._files.values():
                served.handle.close()
            self._files.clear()
            self._cached = 0

    def progress(self, sha256: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            return self.server.progress(sha256)

    def _on_fetch(self, topic: str, payload: bytes) -> None:
        try:
            device = topics.parse(topic).device
            fetch = decode_as(payload, Fetch)
        except (DecodeError, TopicError) as exc:
            self.counters.decode_errors += 1
            log.warning("bad fetch skipped", topic=topic, error=str(exc))
            return
        if device is None or fetch.device_id != device:
            # A device may only fetch for itself; the broker's ACL should already enforce this.
            self.counters.decode_errors += 1
            log.warning("fetch device id does not match its topic", topic=topic, device_id=fetch.device_id)
            return
        with self._lock:
            verdict = self.server.on_fetch(device, fetch, time.monotonic())
        self.counters.verdicts[verdict.value] = self.counters.verdicts.get(verdict.value, 0) + 1
        if verdict is FetchVerdict.ACCEPTED:
            self._wake.set()
        if verdict is FetchVerdict.UNKNOWN_FILE:
            self.counters.foreign_fetches += 1
        elif verdict is FetchVerdict.BAD_BITMAP:
            log.warning("fetch bitmap does not fit the manifest", device=device, sha256=fetch.sha256[:12])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    now = time.monotonic()
                    at = self.server.next_due(now)
                if at is not None and at <= now:
                    self.tick()
                    continue
                wait = self.tick_s if at is None else min(self.tick_s, at - now)
                self._wake.wait(wait)
                self._wake.clear()
            except Exception:  # the sender is the only thing sending chunks: it must survive anything
                self.counters.tick_errors += 1
                log.exception("chunk tick failed")
                self._stop.wait(self.tick_s)

    def tick(self) -> int:
        """Publish what is due now, ready or not; returns how many chunks were published."""
        with self._lock:
            sends = self.server.due(time.monotonic())
            files = dict(self._files)
        published = 0
        for send in sends:
            if self._publish(files, send):
                published += 1
        return published

    def _publish(self, files: dict[str, _ServedFile], send: Send) -> bool:
        served = files.get(send.sha256)
        return served is not None and self._publish_to(served, send.index, send.topic)

    def _publish_to(self, served: _ServedFile, index: int, topic: str) -> bool:
        try:
            payload = served.message(index)
        except (PlanError, OSError, ValueError) as exc:
            self.counters.read_errors += 1
            log.error("chunk not sent", sha256=served.manifest.model_sha256[:12], index=index, error=str(exc))
            return False
        try:
            self.bus.publish(topic, payload, qos=1)
        except BusError as exc:
            # The device's fetch timeout asks again; the chunk is not lost for good.
            self.counters.publish_errors += 1
            log.warning("chunk publish failed", topic=topic, error=str(exc))
            return False
        self.counters.bytes_sent += _chunk_length(served.manifest, index)
        return True


def _chunk_length(manifest: Manifest, index: int) -> int:
    if index == manifest.chunk_count - 1:
        return manifest.size - manifest.chunk_size * (manifest.chunk_count - 1)
    return manifest.chunk_size
