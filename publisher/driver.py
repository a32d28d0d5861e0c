"""The rollout driver inside ``fleetbus serve``: the MQTT shell around the pure rollout controllers.

One thread owns every ``Controller``. Everything else only puts work on its queue: paho's thread
(telemetry the aggregator decoded, ``rollout_control`` messages), the HTTP threads (a submitted
document, a pause/resume/cancel; they wait for the answer). The driver thread feeds each item to the
controllers it concerns, carries out the effects they return, ticks them when a deadline passes,
saves their state and publishes each rollout's retained ``rollout_status``.

Carrying out effects (docs/rollouts.md, "The service"):

* ``Notify``: a deploy whose manifest's ``rollout_id`` is the execution id (``{id}``, ``{id}:r2``,
  ``{id}:shadow``), signed with serve's key and published retained on ``desired/dev/{device}``. When
  one batch of effects notifies at most ``MAX_PUSHED_DEVICES`` devices (a canary wave), each deploy is
  followed by the file's first chunks on that device's repair topic (docs/protocol.md, "The first
  window rides with the deploy"); a bigger wave fetches, and its first fetch starts one broadcast.
* ``CancelDevice`` / ``MarkTimedOut``: a ``cancel`` for the device's current execution on its command
  topic (re-sent when the device comes back, since commands are not retained); an offline device's
  retained deploy is cleared so it never starts it.
* ``Rollback``: a deploy of the model the device ran before (serve keeps every model it published in
  its blob directory, by SHA-256) with ``rollback = true`` and execution id ``{id}:rb``.

Restart safety: the state is saved *before* any deploy or cancel is published (write-ahead) and
otherwise at most once per ``save_every_s``. A restored controller never re-notifies a device it
recorded as notified; deploys whose publish may have been lost (saved, then killed) are found by
comparing the retained ``desired`` topics with the execution each device should have, and only
those are published again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from publisher.bus import Bus
from publisher.chunkshell import MAX_PUSHED_DEVICES, ChunkShell, push_count
from publisher.controller import Controller
from publisher.document import document_from_mapping
from publisher.errors import BusError, ConfigError, PlanError, RolloutError, StoreError
from publisher.plan import PlanOptions, build_manifest
from publisher.rollout_events import (
    Aborted,
    Anomaly,
    CancelDevice,
    Canceled,
    Command,
    CommandRefused,
    Completed,
    DeviceOffline,
    DeviceOnline,
    Effect,
    Event,
    MarkTimedOut,
    Notify,
    Paused,
    Resumed,
    Rollback,
    ShadowSample,
    Start,
    StatusUpdate,
    Tick,
    WaveCompleted,
    WaveFailed,
    WaveStarted,
    execution_id,
    kpi_sample_from_health,
    parse_execution_id,
)
from publisher.rollout_state import KpiTotals, RolloutState
from publisher.store import RolloutRow, SqliteStore
from publisher.submission import SignedSubmission, open_submission
from publisher.waves import DeviceInfo, KpiFigures, ModelNeeds, device_info_from_birth, plan_rollout
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.errors import DecodeError, TopicError
from schemas.messages import (
    Birth,
    Cancel,
    Death,
    Deploy,
    ExecStatus,
    Health,
    Manifest,
    Message,
    RolloutControl,
    RolloutStatus,
    Shadow,
    State,
)
from schemas.signing import SignatureError, load_private_key, pin_keys, read_public_key, sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from device.runtime import InferenceRuntime
    from publisher.service import Aggregator

log = structlog.get_logger("publisher.driver")

ROLLBACK_SUFFIX = ":rb"
BLOB_SUFFIX = ".tflite"
_READ_BLOCK = 1 << 20
#: Items the driver thread takes off its queue before it ticks, saves and publishes statuses again.
_BATCH = 2000


class ByteReader(Protocol):
    """Anything with ``read(n)``: an HTTP request body, an open file."""

    def read(self, size: int, /) -> bytes: ...


def rollback_id(rollout_id: str) -> str:
    """The execution id of the rollback deploys of a rollout (``{id}:rb``)."""
    return f"{rollout_id}{ROLLBACK_SUFFIX}"


@dataclass(frozen=True)
class DriverOptions:
    """Timing of the driver's own loop; every field has a working default."""

    save_every_s: float = 1.0
    status_every_s: float = 0.25
    tick_every_s: float = 1.0
    reconcile_after_s: float = 1.5
    golden_count: int = 3
    chunk_tick_s: float = 0.05


@dataclass
class _Rollout:
    """One rollout as the driver holds it: its controller, base manifest and what it needs to undo."""

    controller: Controller
    manifest: Manifest
    signed: bytes
    previous: dict[str, str | None]
    rollbacks: dict[str, str] = field(default_factory=dict)
    rollback_manifest: Manifest | None = None
    last_status: dict[str, Any] | None = None
    last_state: str | None = None
    status_at: float = 0.0


@dataclass
class _Work:
    """An item for the driver thread, and the future its submitter waits on (None: nobody waits)."""

    kind: str
    payload: Any
    now: float
    future: concurrent.futures.Future[Any] | None = None


class RolloutDriver:
    """Holds the controllers of every staged rollout; ``start()`` runs it, ``stop()`` saves and ends it."""

    def __init__(
        self,
        bus: Bus,
        store: SqliteStore,
        key_path: str | os.PathLike[str],
        blob_dir: str | os.PathLike[str],
        *,
        trusted: Sequence[str] = (),
        online: Callable[[], Mapping[str, bool]] | None = None,
        online_of: Callable[[str], bool] | None = None,
        runtime: InferenceRuntime | None = None,
        options: DriverOptions | None = None,
    ) -> None:
        try:
            self._key, self._key_id = load_private_key(key_path)
        except SignatureError as exc:
            raise ConfigError(str(exc)) from None
        own = self._key.public_key().public_bytes_raw().hex()
        try:
            self._pinned: dict[str, Ed25519PublicKey] = pin_keys(
                [own, *(read_public_key(k) for k in trusted)]
            )
        except SignatureError as exc:
            raise ConfigError(f"--trust: {exc}") from None
        self.bus = bus
        self.store = store
        self.blob_dir = Path(blob_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.options = options or DriverOptions()
        self._online = online or (dict)
        # Retained births and deaths replay in no set order after a restart; judge by the fleet view.
        self._online_of = online_of
        self._runtime = runtime
        self.chunks = ChunkShell(bus, tick_s=self.options.chunk_tick_s)
        self.counters: Counter[str] = Counter()
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._lock = threading.Lock()  # guards _births, _statuses (read by HTTP threads)
        self._rollouts: dict[str, _Rollout] = {}
        self._statuses: dict[str, RolloutStatus] = {}
        self._births: dict[str, Birth] = {}
        self._deaths: dict[str, int] = {}  # the latest death bdseq per device
        # What each device runs now (version, sha256): its birth, then every success we deployed.
        self._current: dict[str, tuple[str | None, str | None]] = {}
        self._health: dict[str, Health] = {}
        self._kpi: dict[str, tuple[str | None, KpiTotals]] = {}
        self._desired: dict[str, str] = {}
        self._desired_seen = False
        self._pending_cancels: dict[str, str] = {}
        self._shadow_seen: dict[tuple[str, str], tuple[int, int]] = {}
        self._served: set[str] = set()
        self._dirty: set[str] = set()  # rollouts whose status may have changed since it was published
        self._unsaved: set[str] = set()  # rollouts whose controller changed since it was saved
        self._last_save = 0.0
        self._last_tick = 0.0
        self._reconcile_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def runtime(self) -> InferenceRuntime:
        if self._runtime is None:
            from device.runtime import default_runtime

            self._runtime = default_runtime()
        return self._runtime

    def attach(self, aggregator: Aggregator) -> None:
        """Wire into ``fleetbus serve``'s aggregator: its telemetry, fleet view, HTTP API and metrics."""
        self._online = lambda: {d.device_id: d.online for d in aggregator.devices()}
        self._online_of = aggregator.is_online
        aggregator.telemetry_hooks.append(self.on_telemetry)
        aggregator.rollout_source = self.statuses
        aggregator.controls = self.control
        aggregator.intake = self
        aggregator.extra_counters = self.metrics

    def restore(self) -> int:
        """Reload every stored rollout (before ``start``); returns how many."""
        restored = 0
        for row in self.store.load_rollouts():
            try:
                controller = Controller.from_dict(row.controller)
                manifest = decode_as(row.manifest, Manifest)
            except (RolloutError, DecodeError) as exc:
                self.counters["restore_errors"] += 1
                log.error("stored rollout unreadable, skipped", rollout=row.rollout_id, error=str(exc))
                continue
            previous = {str(k): v for k, v in dict(row.extra.get("previous", {})).items()}
            self._rollouts[row.rollout_id] = _Rollout(controller, manifest, row.signed, previous)
            restored += 1
        if restored:
            self._reconcile_at = time.monotonic() + self.options.reconcile_after_s
        return restored

    def start(self) -> None:
        """Serve chunks, subscribe to controls and retained deploys, and start the driver thread."""
        self.chunks.start()
        for rollout in self._rollouts.values():
            self._serve_model(rollout.manifest)
            for sha in {s for s in rollout.previous.values() if s}:
                self._serve_blob(sha)
        control = topics.rollout_filter("control")
        desired = topics.PREFIX + "/desired/dev/+"
        self.bus.on(control, self._on_control_message)
        self.bus.on(desired, self._on_desired_message)
        self.bus.subscribe([control, desired])
        now = time.time()
        for rid, rollout in self._rollouts.items():
            self._publish_status(rid, rollout, now, force=True)
        self._thread = threading.Thread(target=self._run, name="rollout-driver", daemon=True)
        self._thread.start()
        log.info("rollout driver started", rollouts=len(self._rollouts), blobs=str(self.blob_dir))

    def stop(self) -> None:
        """End the driver thread, save every controller and stop serving chunks."""
        self._stop.set()
        self._queue.put(_Work("stop", None, time.time()))
        if self._thread is not None:
            self._thread.join(10)
        self._save_all(time.time())
        self.chunks.stop()

    # --- inputs from other threads ----------------------------------------------------------------

    def on_telemetry(self, message: Message, now: float, changed: bool) -> None:
        """Aggregator hook (paho's thread): a decoded device message and whether it changed the fleet."""
        if isinstance(message, (Birth, Death, State, Health, Shadow)):
            self._queue.put(_Work("telemetry", (message, changed), now))

    def _on_control_message(self, topic: str, payload: bytes) -> None:
        try:
            rollout = topics.parse(topic).rollout
            command = decode_as(payload, RolloutControl)
        except (DecodeError, TopicError) as exc:
            self.counters["bad_controls"] += 1
            log.warning("bad rollout control skipped", topic=topic, error=str(exc))
            return
        if command.rollout_id != rollout:
            self.counters["bad_controls"] += 1
            log.warning("rollout control for another rollout than its topic", topic=topic)
            return
        self._queue.put(_Work("control", command, time.time()))

    def _on_desired_message(self, topic: str, payload: bytes) -> None:
        try:
            device = topics.parse(topic).device
            deploy = decode_as(payload, Deploy) if payload else None
        except (DecodeError, TopicError):
            return  # not ours to judge; devices check deploys themselves
        if device is not None:
            self._queue.put(_Work("desired", (device, deploy.rollout_id if deploy else None), time.time()))

    def control(self, command: RolloutControl, timeout: float = 10.0) -> RolloutStatus:
        """Apply a pause/resume/cancel and return the new status (HTTP ``controls`` callback).

        ``LookupError`` for an unknown rollout, ``RolloutError`` for a command its state refuses.
        """
        return self._ask("control", command, timeout)  # type: ignore[no-any-return]

    def submit(self, signed: SignedSubmission, timeout: float = 60.0) -> RolloutStatus:
        """Check, plan and start a submitted document; returns its first status.

        ``SignatureError`` (not signed by a pinned key), ``ConfigError`` (the document or plan is
        refused: nothing was published), ``RolloutError`` (the id is taken by another document).
        """
        submission = open_submission(signed, self._pinned)
        blob = self.blob_path(submission.model_sha256)
        if not blob.is_file():
            raise ConfigError(
                f"model {submission.model_sha256[:12]} has not been uploaded; PUT it to "
                "/api/blobs/{sha256} first (`fleetbus rollout push` does)"
            )
        document = dict(submission.document)
        document["model"] = {**dict(document.get("model") or {}), "path": str(blob)}
        doc = document_from_mapping(document)
        rollout_id = doc.rollout_id
        with self._lock:
            known = self._statuses.get(rollout_id)
        existing = self._rollouts.get(rollout_id)
        if existing is not None:
            if existing.signed == signed.body and known is not None:
                return known  # the same submission again (a CLI retry): idempotent
            raise RolloutError(
                f"rollout {rollout_id} exists with another document; give the new one another id"
            )
        options = PlanOptions(
            name=doc.model.name,
            golden_count=self.options.golden_count,
            timeout_s=doc.in_progress_timeout_s,
        )
        try:
            manifest = build_manifest(blob, doc.model.version, rollout_id, options, self.runtime)
        except PlanError as exc:
            raise ConfigError(f"model.path: {exc}") from None
        fleet = self.fleet()
        plan = plan_rollout(doc, fleet, ModelNeeds(frozenset(manifest.ops), manifest.arena_bytes))
        controller = Controller.from_plan(doc, plan)
        with self._lock:
            previous = {d: self._current.get(d, (None, None))[1] for d in plan.eligible}
        rollout = _Rollout(controller, manifest, signed.body, previous)
        now = time.time()
        row = RolloutRow(
            rollout_id,
            now,
            now,
            controller.rollout_state.value,
            signed.body,
            signed.signature,
            signed.key_id,
            submission.model_sha256,
            encode(manifest),
            {"previous": previous},
            controller.to_dict(),
        )
        try:
            self.store.add_rollout(row)
        except StoreError as exc:
            raise RolloutError(str(exc)) from None
        return self._ask("add", rollout, timeout)  # type: ignore[no-any-return]

    def _ask(self, kind: str, payload: Any, timeout: float) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Work(kind, payload, time.time(), future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RolloutError(f"the rollout driver did not answer within {timeout:g}s") from None

    # --- blobs ------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / f"{topics.validate_sha(sha256)}{BLOB_SUFFIX}"

    def has_blob(self, sha256: str) -> int | None:
        """The size of a stored model file, or None."""
        path = self.blob_path(sha256)
        return path.stat().st_size if path.is_file() else None

    def put_blob(self, sha256: str, length: int, stream: ByteReader, max_bytes: int) -> int:
        """Store a model file read from ``stream``; ``ConfigError`` when it does not hash to ``sha256``."""
        target = self.blob_path(sha256)
        if length <= 0 or length > max_bytes:
            raise ConfigError(f"a model upload must be 1..{max_bytes} bytes, not {length}")
        if target.is_file():
            # Content-addressed: a file already here is this file. Drain the body all the same.
            self._drain(stream, length)
            return target.stat().st_size
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                left = length
                while left > 0:
                    block = stream.read(min(_READ_BLOCK, left))
                    if not block:
                        raise ConfigError(f"upload ended after {length - left} of {length} bytes")
                    digest.update(block)
                    out.write(block)
                    left -= len(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise ConfigError(f"uploaded bytes hash to {digest.hexdigest()}, not {sha256}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.store.add_model(sha256, length)
        log.info("model stored", sha256=sha256[:12], size=length)
        return length

    @staticmethod
    def _drain(stream: ByteReader, length: int) -> None:
        while length > 0:
            block = stream.read(min(_READ_BLOCK, length))
            if not block:
                return
            length -= len(block)

    def _serve_model(self, manifest: Manifest) -> None:
        if manifest.model_sha256 in self._served:
            return
        path = self.blob_path(manifest.model_sha256)
        if not path.is_file():
            log.error("model file missing from the blob directory", sha256=manifest.model_sha256[:12])
            return
        self.chunks.serve(path, manifest)
        self._served.add(manifest.model_sha256)

    def _serve_blob(self, sha256: str) -> Manifest | None:
        """Serve a stored model by its hash alone (rollbacks); the manifest is built once."""
        path = self.blob_path(sha256)
        if not path.is_file():
            return None
        from publisher.plan import digest_file

        if sha256 not in self._served:
            digest = digest_file(path)
            manifest = Manifest(
                rollout_id="serve",
                version="0",
                model_sha256=digest.sha256,
                size=digest.size,
                chunk_size=digest.chunk_size,
                chunk_sha256=list(digest.chunk_sha256),
            )
            self._serve_model(manifest)
        return None

    # --- read side (HTTP threads) -----------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The driver's counters, prefixed ``rollout_`` (merged into the aggregator's counters)."""
        counts: dict[str, float] = dict(self.counters)
        counts["chunk_bytes_sent"] = self.chunks.counters.bytes_sent
        for key, value in self.chunks.server.counters.as_dict().items():
            counts[f"chunk_{key}"] = value
        return {f"rollout_{k}": float(v) for k, v in counts.items()}

    def statuses(self) -> list[RolloutStatus]:
        with self._lock:
            return [self._statuses[r] for r in sorted(self._statuses)]

    def fleet(self) -> dict[str, DeviceInfo]:
        """Every device with a birth, as the planner sees it (with its current model's KPI baseline)."""
        online = self._online()
        with self._lock:
            births = dict(self._births)
            current = dict(self._current)
            kpis = {d: t for d, (_, t) in self._kpi.items()}
        out: dict[str, DeviceInfo] = {}
        for device, birth in sorted(births.items()):
            totals = kpis.get(device)
            baseline = (
                KpiFigures(totals.inferences, totals.errors, totals.p95_ms)
                if totals is not None and totals.inferences
                else None
            )
            info = device_info_from_birth(birth, online=online.get(device, True), baseline=baseline)
            version = current.get(device, (birth.model_version, None))[0]
            out[device] = dataclasses.replace(info, model_version=version)
        return out

    # --- the driver thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                work: _Work | None = self._queue.get(timeout=self._wait_time())
            except queue.Empty:
                work = None
            taken = 0
            while work is not None and taken < _BATCH:
                if work.kind == "stop":
                    return
                self._do(work)
                taken += 1
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    work = None
            if work is not None:
                self._do(work)
            try:
                self._housekeeping(time.time())
            except Exception:  # the driver must outlive any one bad turn
                self.counters["driver_errors"] += 1
                log.exception("rollout driver housekeeping failed")

    def _wait_time(self) -> float:
        now = time.time()
        wait = self.options.status_every_s
        for rollout in self._rollouts.values():
            deadline = rollout.controller.next_deadline(now)
            if deadline is not None:
                wait = min(wait, max(0.01, deadline - now))
        return wait

    def _do(self, work: _Work) -> None:
        try:
            result = self._dispatch(work)
        except Exception as exc:
            if work.future is not None:
                work.future.set_exception(exc)
            else:
                self.counters["driver_errors"] += 1
                log.exception("rollout driver work failed", kind=work.kind)
            return
        if work.future is not None:
            work.future.set_result(result)

    def _dispatch(self, work: _Work) -> Any:
        if work.kind == "telemetry":
            message, changed = work.payload
            self._on_telemetry(message, changed, work.now)
            return None
        if work.kind == "control":
            return self._on_control(work.payload, work.now, answer=work.future is not None)
        if work.kind == "add":
            return self._on_add(work.payload, work.now)
        if work.kind == "desired":
            device, execution = work.payload
            self._desired_seen = True
            if execution is None:
                self._desired.pop(device, None)
            else:
                self._desired[device] = execution
            return None
        raise AssertionError(f"unknown driver work {work.kind!r}")  # pragma: no cover

    def _on_add(self, rollout: _Rollout, now: float) -> RolloutStatus:
        rid = rollout.controller.rollout_id
        self._rollouts[rid] = rollout
        self._serve_model(rollout.manifest)
        for sha in {s for s in rollout.previous.values() if s}:
            self._serve_blob(sha)
        # The manifest retained on manifest/{id} tells the aggregator (and backends) the rollout exists.
        self.bus.publish(topics.manifest(rid), encode(rollout.manifest), qos=1, retain=True)
        log.info(
            "rollout started",
            rollout=rid,
            version=rollout.manifest.version,
            devices=len(rollout.controller.state.devices),
            skipped=len(rollout.controller.state.skipped),
        )
        self._feed(rid, Start(now))
        return self._publish_status(rid, rollout, now, force=True)

    def _on_control(self, command: RolloutControl, now: float, *, answer: bool) -> RolloutStatus | None:
        rollout = self._rollouts.get(command.rollout_id)
        if rollout is None:
            if answer:
                raise LookupError(f"no rollout {command.rollout_id!r}")
            self.counters["unknown_controls"] += 1
            return None
        effects = self._feed(command.rollout_id, Command(now, command.action, command.by, command.reason))
        refused = [e for e in effects if isinstance(e, CommandRefused)]
        status = self._publish_status(command.rollout_id, rollout, now, force=True)
        if refused and answer:
            raise RolloutError(refused[0].reason)
        return status

    def _on_telemetry(self, message: Message, changed: bool, now: float) -> None:
        if isinstance(message, Birth):
            device = message.device_id
            known = self._births.get(device)
            if known is not None and message.bdseq < known.bdseq:
                return  # an older session's birth, replayed late
            with self._lock:
                self._births[device] = message
                self._current[device] = (message.model_version, message.model_sha256)
            if self._is_online(device):
                self._broadcast(device, DeviceOnline(now, device))
                pending = self._pending_cancels.get(device)
                if pending is not None:
                    self._send_cancel(device, pending)
        elif isinstance(message, Death):
            device = message.device_id
            self._deaths[device] = max(message.bdseq, self._deaths.get(device, -1))
            if not self._is_online(device):
                self._broadcast(device, DeviceOffline(now, device))
        elif isinstance(message, State):
            self._on_state(message, now)
        elif isinstance(message, Health):
            self._on_health(message, now)
        elif isinstance(message, Shadow):
            self._on_shadow(message, now)

    def _on_state(self, state: State, now: float) -> None:
        execution = state.rollout_id
        if self._pending_cancels.get(state.device_id) == execution and state.status.terminal:
            del self._pending_cancels[state.device_id]
        if execution.endswith(ROLLBACK_SUFFIX):
            rollout = self._rollouts.get(execution[: -len(ROLLBACK_SUFFIX)])
            if rollout is not None and state.device_id in rollout.rollbacks:
                rollout.rollbacks[state.device_id] = state.status.value
                self._dirty.add(execution[: -len(ROLLBACK_SUFFIX)])
                if state.status is ExecStatus.SUCCEEDED:
                    self._note_running(
                        state.device_id, state.model_version, rollout.previous.get(state.device_id)
                    )
            return
        base, _, shadow = parse_execution_id(execution)
        if base not in self._rollouts:
            self.counters["states_of_other_rollouts"] += 1
            return
        if state.status is ExecStatus.SUCCEEDED and not shadow:
            manifest = self._rollouts[base].manifest
            self._note_running(state.device_id, manifest.version, manifest.model_sha256)
        self._feed(
            base,
            StatusUpdate(
                now,
                state.device_id,
                state.status,
                state.version_number,
                rollout_id=execution,
                reason=state.reason,
            ),
        )

    def _is_online(self, device: str) -> bool:
        """The aggregator's verdict (it keeps bdseq across restarts), else Sparkplug's rule on ours."""
        if self._online_of is not None:
            return self._online_of(device)
        birth = self._births.get(device)
        return birth is not None and birth.bdseq > self._deaths.get(device, -1)

    def _note_running(self, device: str, version: str | None, sha256: str | None) -> None:
        with self._lock:
            self._current[device] = (version, sha256)

    def _on_health(self, health: Health, now: float) -> None:
        previous = self._health.get(health.device_id)
        self._health[health.device_id] = health
        sample = kpi_sample_from_health(previous, health, now)
        if sample is None:
            return
        with self._lock:
            version, totals = self._kpi.get(health.device_id, (None, KpiTotals()))
            if version != sample.model_version:
                totals = KpiTotals()
            totals.add(sample.inferences, sample.errors, sample.p95_ms)
            self._kpi[health.device_id] = (sample.model_version, totals)
        self._broadcast(health.device_id, sample)

    def _on_shadow(self, shadow: Shadow, now: float) -> None:
        base, _, is_shadow = parse_execution_id(shadow.rollout_id)
        if not is_shadow or base not in self._rollouts:
            self.counters["stray_shadow_reports"] += 1
            return
        # Devices report cumulative counts per shadow run; the controller wants what is new.
        key = (shadow.device_id, shadow.rollout_id)
        seen_samples, seen_agreed = self._shadow_seen.get(key, (0, 0))
        if shadow.samples < seen_samples:
            seen_samples, seen_agreed = 0, 0  # the agent restarted its count
        self._shadow_seen[key] = (shadow.samples, shadow.agreed)
        samples = shadow.samples - seen_samples
        if samples > 0:
            agreed = max(0, shadow.agreed - seen_agreed)
            self._feed(base, ShadowSample(now, shadow.device_id, samples, agreed))

    def _broadcast(self, device_id: str, event: Event) -> None:
        for rid, rollout in self._rollouts.items():
            state = rollout.controller.rollout_state
            if state in (RolloutState.CANCELED, RolloutState.ABORTED, RolloutState.ROLLED_BACK):
                continue
            if device_id in rollout.controller.state.devices:
                self._feed(rid, event)

    def _feed(self, rid: str, event: Event) -> list[Effect]:
        rollout = self._rollouts[rid]
        effects = rollout.controller.handle(event)
        self._dirty.add(rid)
        self._unsaved.add(rid)
        if effects:
            self._carry_out(rid, rollout, effects, event.now)
        return effects

    # --- effects ----------------------------------------------------------------------------------

    def _carry_out(self, rid: str, rollout: _Rollout, effects: Iterable[Effect], now: float) -> None:
        effects = list(effects)
        if any(isinstance(e, (Notify, CancelDevice, Rollback, MarkTimedOut)) for e in effects):
            self._save(rid, rollout, now)  # write-ahead: what we publish next is already on record
        push = sum(isinstance(e, Notify) for e in effects) <= MAX_PUSHED_DEVICES
        for effect in effects:
            try:
                self._effect(rid, rollout, effect, now, push=push)
            except (BusError, PlanError, OSError) as exc:
                self.counters["effect_errors"] += 1
                log.error("effect not carried out", rollout=rid, effect=type(effect).__name__, error=str(exc))
        self._publish_status(rid, rollout, now)

    def _effect(self, rid: str, rollout: _Rollout, effect: Effect, now: float, push: bool = False) -> None:
        if isinstance(effect, Notify):
            execution = execution_id(rid, effect.attempt, effect.shadow)
            self._notify(rid, rollout, effect.device_id, execution, now, push=push)
        elif isinstance(effect, CancelDevice):
            self._cancel(rid, rollout, effect.device_id, clear=True)
        elif isinstance(effect, MarkTimedOut):
            log.warning("device timed out", rollout=rid, device=effect.device_id, attempt=effect.attempt)
            self.counters["timeouts"] += 1
            self._send_cancel(effect.device_id, execution_id(rid, effect.attempt))
        elif isinstance(effect, Rollback):
            self._rollback(rid, rollout, effect.device_id, effect.to_version, now)
        elif isinstance(effect, Anomaly):
            self.counters["anomalies"] += 1
            log.warning("rollout anomaly", rollout=rid, device=effect.device_id, reason=effect.reason)
        elif isinstance(effect, CommandRefused):
            self.counters["commands_refused"] += 1
            log.info("rollout command refused", rollout=rid, action=effect.action, reason=effect.reason)
        elif isinstance(
            effect, (WaveStarted, WaveCompleted, WaveFailed, Paused, Resumed, Completed, Aborted, Canceled)
        ):
            log.info("rollout " + type(effect).__name__, rollout=rid, **_fields(effect))

    def _notify(
        self, rid: str, rollout: _Rollout, device: str, execution: str, now: float, *, push: bool = False
    ) -> None:
        shadow = execution.endswith(":shadow")
        manifest = rollout.manifest.model_copy(update={"rollout_id": execution, "shadow": shadow, "ts": now})
        self._publish_deploy(device, manifest, push)

    def _publish_deploy(self, device: str, manifest: Manifest, push: bool = False) -> None:
        deploy = sign(manifest, self._key, self._key_id)
        count = push_count(manifest) if push else 0
        if count:
            deploy = deploy.model_copy(update={"pushed": count})
        self.bus.publish(topics.device_desired(device), encode(deploy), qos=1, retain=True)
        self._desired[device] = manifest.rollout_id
        self.counters["deploys_published"] += 1
        if count:
            sha = manifest.model_sha256
            sent = self.chunks.push(sha, functools.partial(topics.repair, device, sha), count)
            self.counters["chunks_pushed"] += sent

    def _current_execution(self, rid: str, rollout: _Rollout, device: str) -> str | None:
        rec = rollout.controller.state.devices.get(device)
        if rec is None:
            return None
        if rec.attempt > 0:
            return execution_id(rid, rec.attempt)
        return execution_id(rid, 0, shadow=True) if rec.shadow_notified else None

    def _cancel(self, rid: str, rollout: _Rollout, device: str, *, clear: bool) -> None:
        execution = self._current_execution(rid, rollout, device)
        if execution is None:
            return
        self._send_cancel(device, execution)
        rec = rollout.controller.state.devices[device]
        if clear and not rec.online and self._desired.get(device) == execution:
            # It cannot hear the cancel now; with the deploy gone it will not start it on return.
            self.bus.publish(topics.device_desired(device), b"", qos=1, retain=True)
            self._desired.pop(device, None)

    def _send_cancel(self, device: str, execution: str) -> None:
        self.bus.publish(topics.device_cmd(device), encode(Cancel(rollout_id=execution)), qos=1)
        self._pending_cancels[device] = execution
        self.counters["cancels_sent"] += 1

    def _rollback(self, rid: str, rollout: _Rollout, device: str, to_version: str | None, now: float) -> None:
        sha = rollout.previous.get(device)
        if sha is None or to_version is None or not self.blob_path(sha).is_file():
            self.counters["rollbacks_unavailable"] += 1
            rollout.rollbacks[device] = "UNAVAILABLE"
            log.error(
                "cannot roll back: serve does not hold the previous model",
                rollout=rid,
                device=device,
                to_version=to_version,
                sha256=(sha or "")[:12],
            )
            return
        manifest = self._rollback_manifest(rid, rollout, sha, to_version)
        self._publish_deploy(device, manifest.model_copy(update={"ts": now}))
        rollout.rollbacks[device] = "NOTIFIED"
        self.counters["rollbacks_published"] += 1

    def _rollback_manifest(self, rid: str, rollout: _Rollout, sha: str, version: str) -> Manifest:
        cached = rollout.rollback_manifest
        if cached is not None and cached.model_sha256 == sha and cached.version == version:
            return cached
        options = PlanOptions(
            name=rollout.manifest.name,
            golden_count=self.options.golden_count,
            timeout_s=rollout.manifest.timeout_s,
            rollback=True,
        )
        manifest = build_manifest(self.blob_path(sha), version, rollback_id(rid), options, self.runtime)
        if sha not in self._served:
            self.chunks.serve(self.blob_path(sha), manifest)
            self._served.add(sha)
        rollout.rollback_manifest = manifest
        return manifest

    # --- periodic work ----------------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        if now - self._last_tick >= self.options.tick_every_s or any(
            (d := r.controller.next_deadline(now)) is not None and d <= now for r in self._rollouts.values()
        ):
            self._last_tick = now
            for rid, rollout in list(self._rollouts.items()):
                if rollout.controller.rollout_state in (RolloutState.RUNNING, RolloutState.PAUSED):
                    self._feed(rid, Tick(now))
                elif rollout.controller.outstanding:
                    deadline = rollout.controller.next_deadline(now)
                    if deadline is not None and deadline <= now:
                        self._feed(rid, Tick(now))
        if self._reconcile_at is not None and time.monotonic() >= self._reconcile_at:
            self._reconcile_at = None
            self._reconcile(now)
        for rid in list(self._dirty):
            self._publish_status(rid, self._rollouts[rid], now)
        if now - self._last_save >= self.options.save_every_s:
            self._save_all(now)

    def _reconcile(self, now: float) -> None:
        """After a restart: publish again only the deploys the broker does not hold (lost publishes)."""
        if not self._desired_seen:
            log.info("no retained deploys seen (none exist, or the ACL hides them); nothing to reconcile")
            return
        for rid, rollout in self._rollouts.items():
            if rollout.controller.rollout_state not in (
                RolloutState.RUNNING,
                RolloutState.PAUSED,
                RolloutState.COMPLETED,
            ):
                continue
            for device, rec in rollout.controller.state.devices.items():
                if rec.final or rec.canceled or rec.due:
                    continue
                execution = self._current_execution(rid, rollout, device)
                if execution is None or self._desired.get(device) == execution:
                    continue
                log.warning("re-publishing a deploy the broker does not hold", rollout=rid, device=device)
                self.counters["deploys_republished"] += 1
                self._notify(rid, rollout, device, execution, now)

    def _save(self, rid: str, rollout: _Rollout, now: float) -> None:
        ctl = rollout.controller
        try:
            self.store.save_controller(rid, ctl.rollout_state.value, ctl.to_dict(), now)
        except StoreError as exc:
            self.counters["save_errors"] += 1
            log.error("rollout state not saved; will retry", rollout=rid, error=str(exc))
            return
        self._unsaved.discard(rid)
        self.counters["saves"] += 1

    def _save_all(self, now: float) -> None:
        self._last_save = now
        for rid in sorted(self._unsaved):
            self._save(rid, self._rollouts[rid], now)

    def _publish_status(
        self, rid: str, rollout: _Rollout, now: float, *, force: bool = False
    ) -> RolloutStatus:
        status = rollout.controller.status(now)
        if rollout.rollbacks:
            states = dict(status.states)
            for outcome in rollout.rollbacks.values():
                key = f"ROLLBACK_{outcome}"
                states[key] = states.get(key, 0) + 1
            status = status.model_copy(update={"states": states})
        with self._lock:
            self._statuses[rid] = status
        body = status.model_dump(mode="json", exclude={"ts"})
        state_changed = status.state != rollout.last_state
        if body == rollout.last_status and not force:
            self._dirty.discard(rid)
            return status
        if not (force or state_changed) and now - rollout.status_at < self.options.status_every_s:
            self._dirty.add(rid)  # publish the latest once the interval is over
            return status
        try:
            self.bus.publish(topics.rollout_status(rid), encode(status), qos=1, retain=True)
        except BusError as exc:
            log.warning("rollout status not published", rollout=rid, error=str(exc))
            self._dirty.add(rid)
            return status
        rollout.last_status, rollout.last_state, rollout.status_at = body, status.state, now
        self._dirty.discard(rid)
        return status


def _fields(effect: Effect) -> dict[str, Any]:
    return {k: getattr(effect, k) for k in getattr(effect, "__slots__", ())}
