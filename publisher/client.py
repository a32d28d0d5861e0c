"""The Python API for publishing a rollout: plan, sign, publish, serve chunks, follow to the end.

    from publisher.client import Publisher, Targets
    from publisher.bus import BrokerAddress

    with Publisher(BrokerAddress.parse("127.0.0.1:1883"), key_path="keys/publisher.key") as pub:
        result = pub.push("model.tflite", "1.1.0", Targets.parse(["dev-1", "group:lab"]), timeout=120)
    print(result.ok, result.as_dict())

The deploy is retained on each desired topic, so a device offline now gets it when it comes back; the
chunks, though, are served only while this process runs (``fleetbus serve`` takes that over in the
staged-rollout design, docs/rollouts.md).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from publisher.bus import BrokerAddress, Bus
from publisher.chunkshell import MAX_PUSHED_DEVICES, PUSH_BYTES, ChunkShell, push_count
from publisher.errors import ConfigError
from publisher.plan import PlanOptions, build_manifest
from publisher.progress import DeviceOutcome, RolloutProgress, Targets
from schemas import topics
from schemas.codec import decode, encode
from schemas.errors import DecodeError, TopicError
from schemas.messages import Birth, Death, Deploy, ExecStatus, Manifest, State
from schemas.signing import SignatureError, load_private_key, sign

log = structlog.get_logger("publisher.client")

ProgressCallback = Callable[[RolloutProgress], None]
# Retained births arrive right after the SUBACK; give them a moment before group membership counts.
RETAINED_SETTLE_S = 0.3

__all__ = ["BrokerAddress", "Publisher", "RolloutResult", "Targets"]


@dataclass
class RolloutResult:
    """How a pushed rollout ended, per device."""

    rollout_id: str
    version: str
    manifest: Manifest
    outcomes: dict[str, DeviceOutcome]
    elapsed_s: float
    timed_out: bool
    chunks: dict[str, int] = field(default_factory=dict)
    strays: int = 0

    @property
    def ok(self) -> bool:
        return (
            bool(self.outcomes)
            and not self.timed_out
            and all(o.status is ExecStatus.SUCCEEDED for o in self.outcomes.values())
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "version": self.version,
            "model_sha256": self.manifest.model_sha256,
            "size": self.manifest.size,
            "chunk_size": self.manifest.chunk_size,
            "chunk_count": self.manifest.chunk_count,
            "ok": self.ok,
            "timed_out": self.timed_out,
            "elapsed_s": round(self.elapsed_s, 3),
            "devices": {d: o.as_dict() for d, o in sorted(self.outcomes.items())},
            "chunks": self.chunks,
            "strays": self.strays,
        }


class Publisher:
    """One operator connection: signs and publishes rollouts and serves their chunks."""

    def __init__(
        self,
        address: BrokerAddress,
        key_path: str | os.PathLike[str],
        client_id: str | None = None,
        tick_s: float = 0.05,
    ) -> None:
        try:
            self._key, self._key_id = load_private_key(key_path)
        except SignatureError as exc:
            raise ConfigError(str(exc)) from None
        self.bus = Bus(address, client_id=client_id)
        self.chunks = ChunkShell(self.bus, tick_s=tick_s)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._following: list[RolloutProgress] = []
        self.decode_errors = 0
        self._started = False

    def __enter__(self) -> Publisher:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self.bus.connect()
        self.bus.on(topics.device_stream_filter(topics.DeviceStream.STATE), self._on_device)
        self.bus.on(topics.device_stream_filter(topics.DeviceStream.BIRTH), self._on_device)
        self.bus.on(topics.device_stream_filter(topics.DeviceStream.DEATH), self._on_device)
        self.chunks.start()
        self._started = True

    def close(self) -> None:
        if self._started:
            self.chunks.stop()
        self.bus.close()

    # --- the steps of a push ----------------------------------------------------------------------

    def plan(
        self,
        model: str | os.PathLike[str],
        version: str,
        options: PlanOptions | None = None,
        rollout_id: str | None = None,
    ) -> Manifest:
        """Hash, parse and golden-run the model into a manifest (no network)."""
        from device.runtime import default_runtime

        opts = options or PlanOptions()
        runtime = default_runtime() if opts.golden_count > 0 else None
        return build_manifest(model, version, rollout_id=rollout_id, options=opts, runtime=runtime)

    def publish(self, manifest: Manifest, model: str | os.PathLike[str], targets: Targets) -> Deploy:
        """Serve the model's chunks, then publish the signed deploy retained to every target."""
        if not targets:
            raise ConfigError("a rollout needs at least one target: --to DEVICE or --group GROUP")
        self.chunks.serve(Path(model), manifest)
        return self.announce(manifest, targets)

    def announce(self, manifest: Manifest, targets: Targets, push_bytes: int = PUSH_BYTES) -> Deploy:
        """Publish the signed deploy retained to every target, each followed by the first chunks.

        The file must be served already (``publish`` does both).  Deploy and chunks go out on this one
        connection, so a broker forwards the deploy to a member first; a device that gets the deploy
        later, retained, fetches instead.
        """
        sha = manifest.model_sha256
        deploy = sign(manifest, self._key, self._key_id)
        count = push_count(manifest, push_bytes)
        plain = encode(deploy)
        with_push = encode(deploy.model_copy(update={"pushed": count})) if count else plain
        push = count > 0 and len(targets.devices) <= MAX_PUSHED_DEVICES
        device_payload = with_push if push else plain
        infos = []
        sent = 0
        for device in targets.devices:
            infos.append(self.bus.publish(topics.device_desired(device), device_payload, qos=1, retain=True))
            if push:
                sent += self.chunks.push(sha, functools.partial(topics.repair, device, sha), count)
        for group in targets.groups:
            infos.append(self.bus.publish(topics.group_desired(group), with_push, qos=1, retain=True))
            if count:
                sent += self.chunks.push(sha, functools.partial(topics.push, group, sha), count)
        # For backends, so after what the devices wait for.
        manifest_topic = topics.manifest(manifest.rollout_id)
        infos.append(self.bus.publish(manifest_topic, encode(manifest), qos=1, retain=True))
        self.bus.wait_published(infos)
        log.info(
            "rollout published",
            rollout=manifest.rollout_id,
            version=manifest.version,
            targets=str(targets),
            size=manifest.size,
            chunks=manifest.chunk_count,
            pushed=sent,
        )
        return deploy

    def follow(
        self,
        progress: RolloutProgress,
        manifest: Manifest,
        timeout: float,
        on_progress: ProgressCallback | None = None,
    ) -> bool:
        """Wait until every expected device is terminal (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for device, (held, total) in self.chunks.progress(manifest.model_sha256).items():
                    progress.note_chunks(device, held, total)
                finished = progress.done()
            if on_progress is not None:
                on_progress(progress)
            if finished:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.wait(min(remaining, 0.2))
            self._changed.clear()

    def push(
        self,
        model: str | os.PathLike[str],
        version: str,
        targets: Targets,
        options: PlanOptions | None = None,
        *,
        timeout: float = 300.0,
        on_progress: ProgressCallback | None = None,
        rollout_id: str | None = None,
    ) -> RolloutResult:
        """Plan, publish and follow one rollout; returns per-device outcomes (never raises on failure)."""
        started = time.monotonic()
        before = self._chunk_counts()
        manifest = self.plan(model, version, options, rollout_id)
        progress = RolloutProgress(manifest.rollout_id, targets)
        with self._lock:
            self._following.append(progress)
        try:
            # Births and states are retained: subscribe before publishing so none is missed.
            self.bus.subscribe(
                [
                    topics.device_stream_filter(s)
                    for s in (topics.DeviceStream.BIRTH, topics.DeviceStream.DEATH, topics.DeviceStream.STATE)
                ]
            )
            time.sleep(RETAINED_SETTLE_S)
            self.publish(manifest, model, targets)
            finished = self.follow(progress, manifest, timeout, on_progress)
        finally:
            with self._lock:
                self._following.remove(progress)
        if not progress.outcomes:
            log.warning("no device reported or is known for the targets", targets=str(targets))
        return RolloutResult(
            rollout_id=manifest.rollout_id,
            version=manifest.version,
            manifest=manifest,
            outcomes=dict(progress.outcomes),
            elapsed_s=time.monotonic() - started,
            timed_out=not finished,
            chunks={k: v - before.get(k, 0) for k, v in self._chunk_counts().items()},
            strays=progress.strays,
        )

    def _chunk_counts(self) -> dict[str, int]:
        return {**self.chunks.server.counters.as_dict(), "pushed": self.chunks.counters.pushed}

    # --- network thread ----------------------------------------------------------------------------

    def _on_device(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
            message = decode(payload)
        except (DecodeError, TopicError) as exc:
            self.decode_errors += 1
            log.warning("undecodable device message skipped", topic=topic, error=str(exc))
            return
        if getattr(message, "device_id", parsed.device) != parsed.device:
            self.decode_errors += 1
            log.warning("device id does not match its topic", topic=topic)
            return
        with self._lock:
            for progress in self._following:
                if isinstance(message, Birth):
                    progress.apply_birth(message)
                elif isinstance(message, Death):
                    progress.apply_death(message)
                elif isinstance(message, State):
                    progress.apply_state(message)
        self._changed.set()
