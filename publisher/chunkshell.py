"""The chunk server on the bus: fetches in, chunks out, bytes read from the model file by offset.

``ChunkShell`` subscribes to every device's ``fetch`` stream and feeds the pure ``ChunkServer`` under
a lock; a sender thread, woken by every fetch, publishes what ``due()`` returns as ``Chunk`` messages
as soon as ``next_due()`` says the round is ready (no fixed tick: a lone device is answered at once).
Each chunk's SHA-256 is checked against the manifest as it is read, so a model file changed on disk
after planning is never sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
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


@dataclass
class _ServedFile:
    path: Path
    manifest: Manifest
    handle: BinaryIO

    def read(self, index: int) -> bytes:
        from publisher.plan import read_chunk

        data = read_chunk(self.handle, self.manifest.size, self.manifest.chunk_size, index)
        if hashlib.sha256(data).hexdigest() != self.manifest.chunk_sha256[index]:
            raise PlanError(f"{self.path} changed on disk: chunk {index} no longer matches the manifest")
        return data


@dataclass
class ShellCounters:
    decode_errors: int = 0
    foreign_fetches: int = 0
    read_errors: int = 0
    publish_errors: int = 0
    tick_errors: int = 0
    bytes_sent: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


class ChunkShell:
    """Serve the chunks of one or more model files to whoever fetches them."""

    def __init__(
        self,
        bus: Bus,
        tick_s: float = DEFAULT_TICK_S,
        quiet_s: float = DEFAULT_QUIET_S,
        hold_s: float = DEFAULT_HOLD_S,
        gather_s: float = DEFAULT_GATHER_S,
    ) -> None:
        self.bus = bus
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
        with self._lock:
            old = self._files.pop(manifest.model_sha256, None)
            self._files[manifest.model_sha256] = _ServedFile(Path(path), manifest, handle)
            self.server.add_file(manifest.model_sha256, manifest.chunk_count)
        if old is not None:
            old.handle.close()

    def withdraw(self, sha256: str) -> None:
        with self._lock:
            served = self._files.pop(sha256, None)
            self.server.remove_file(sha256)
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
        if served is None:
            return False
        try:
            data = served.read(send.index)
        except (PlanError, OSError, ValueError) as exc:
            self.counters.read_errors += 1
            log.error("chunk not sent", sha256=send.sha256[:12], index=send.index, error=str(exc))
            return False
        message = Chunk(sha256=send.sha256, index=send.index, data=data)
        try:
            self.bus.publish(send.topic, encode(message), qos=1)
        except BusError as exc:
            # The device's fetch timeout asks again; the chunk is not lost for good.
            self.counters.publish_errors += 1
            log.warning("chunk publish failed", topic=send.topic, error=str(exc))
            return False
        self.counters.bytes_sent += len(data)
        return True
