"""The device agent: the shell around the rollout table, the chunk book, the store and the gate.

One main thread owns all protocol state.  paho's thread only puts (topic, payload) on a queue
(`device.link`), the inference thread only runs the model and publishes result batches
(`device.inference`).  The main thread takes events from the queue, feeds the pure rollout table
(`device.rollout`) and carries out the effects it returns; between events it runs its timers
(fetch retry, rollout timeout, health).

Every bad input is logged, counted under a name that shows up in Health.counters, and dropped.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import replace
from typing import Any

import msgpack
import structlog

from device import shadow
from device.chunks import Outcome, set_bit
from device.config import Settings
from device.dist import installed_version
from device.errors import ConfigError, DeviceError, ModelLoadError, StoreError
from device.gate import precheck, run_gate
from device.health import Counters, CpuMeter, LatencyStats, meminfo, rss_bytes
from device.inference import Batch, InferenceLoop
from device.inputs import InputSource, make_source
from device.link import Event as LinkEvent
from device.link import Link
from device.pacing import FetchPacer
from device.rollout import (
    BEFORE_ACTIVATION,
    UNPERSISTED,
    Effect,
    Event,
    Step,
    is_downgrade,
    report,
    resume,
    transition,
)
from device.runtime import InferenceRuntime, LoadedModel, default_runtime
from device.store import AgentState, ModelRef, Staging, Store, crash_point, sha256_file, with_step
from device.watchdog import Watchdog, WatchdogResult
from schemas import topics
from schemas.errors import DecodeError, TopicError

# The device reads and writes its messages without pydantic (schemas/plain.py: 9 MiB of RSS).
from schemas.plain import (
    Birth,
    Cancel,
    Chunk,
    Death,
    Deploy,
    Fetch,
    Health,
    Manifest,
    Rebirth,
    Results,
    State,
    decode,
    decode_as,
    encode,
    verify,
)
from schemas.signing import SignatureError, pin_device_keys, read_public_key

log = structlog.get_logger("device.agent")

_Next = tuple[Event, str | None] | None

#: A state is persisted before each step is reported, but a download's progress reports (and the
#: UNPERSISTED steps) are not: each persisted state reserves this many version numbers for them, so
#: numbers still only grow across a crash without an fsync'd state save per report.
VERSION_RESERVE = 16
#: Progress reports during a download: at each 10 % boundary, but at most one per this interval.
#: A fast download (seconds) needs none: the chunk server reports every device's bitmap anyway.
PROGRESS_EVERY_S = 1.0
#: The credit a fetch gives is capped in bytes as well as in chunks: a slow board's inbox holds at
#: most a window, and 64 chunks of 256 KiB would be 16 MiB of it.
FETCH_WINDOW_BYTES = 4 * 1024 * 1024
_CHUNK_KINDS = ("blob", "push", "repair")


def _blob_of_manifest(manifest: bytes) -> str | None:
    try:
        return topics.blob_filter(msgpack.unpackb(manifest).get("model_sha256"))
    except Exception:  # not a manifest: nothing to subscribe to
        return None


def _blob_of(deploy_payload: bytes | bytearray) -> str | None:
    """The chunk filter of the file a deploy names, read without checking anything."""
    try:
        manifest = msgpack.unpackb(deploy_payload).get("manifest")
    except Exception:
        return None
    return _blob_of_manifest(manifest) if isinstance(manifest, bytes) else None


def agent_version() -> str:
    return installed_version("fleetbus") or "0+unknown"


class Agent:
    """A fleetbus device agent.  `run()` blocks; `start()` runs it in a thread (tests, benches)."""

    def __init__(
        self,
        settings: Settings,
        runtime: InferenceRuntime | None = None,
        source: InputSource | None = None,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device.id
        self.store = Store(settings.device.state_dir, settings.transfer.fsync_every)
        self.counters = Counters()
        self.stats = LatencyStats()
        self._runtime = runtime
        # Keys are checked now but turned into key objects only when a new deploy must be verified:
        # even the libcrypto binding (schemas/openssl_ed25519.py) costs 0.6 MiB of ctypes, and its
        # fallback, `cryptography`, ~7 MiB, that an agent resuming a finished rollout never needs.
        try:
            self._keys = [read_public_key(k) for k in settings.trust.publisher_keys]
        except SignatureError as exc:
            raise ConfigError(f"[trust] publisher_keys: {exc}") from None
        self._pinned_keys: dict[str, Any] | None = None
        self._events: queue.Queue[LinkEvent] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq_lock = threading.Lock()
        self._seq = 0
        self.bdseq = 0
        self.state = AgentState()
        self.manifest: Manifest | None = None
        self._staging: Staging | None = None
        self._candidate: LoadedModel | None = None
        self._watchdog: Watchdog | None = None
        self._last_state_msg: bytes | None = None
        self._last_percent = -1
        self._last_progress = 0.0
        self._version = 0  # of the last State report sent
        self._digest: tuple[str, str] | None = None  # (file, SHA-256 of the bytes written for it)
        self._started = time.monotonic()
        self._cpu = CpuMeter()
        self._last_error: str | None = None
        tr = settings.transfer
        self._pacer = FetchPacer(tr.window, tr.fetch_timeout_s, tr.fetch_backoff_max_s, settle_s=tr.settle_s)
        self._blob_filter: str | None = None
        self._early_blob: str | None = None  # subscribed while the deploy naming it is checked
        # Chunk filters subscribed from paho's thread the moment a deploy arrived (_on_arrival),
        # each claimed, or unsubscribed, when the agent's thread reaches that deploy.
        self._early_lock = threading.Lock()
        self._early_blobs: set[str] = set()
        self._push_offer = 0  # chunks the live deploy being accepted says are pushed after it
        # Pushed chunks not yet stored: the fetch claims them as held so the server does not send
        # them again while they are on their way (dropped when a fetch timeout says they are lost).
        self._pushed: set[int] = set()
        self._dropped_pushes: set[tuple[str, int]] = set()  # pushed chunks that beat their deploy
        self._next_health = 0.0
        self._ops: list[str] | None = None
        source = source or make_source(settings.inference.source)
        inf = settings.inference
        self.inference = InferenceLoop(
            source,
            self._publish_results,
            interval_s=inf.interval_s,
            batch_max=inf.batch_max,
            batch_interval_s=inf.batch_interval_s,
            stats=self.stats,
            counters=self.counters,
        )
        self.link = Link(self.device_id, settings.mqtt, self._events, self._will, self._on_arrival)

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def runtime(self) -> InferenceRuntime:
        if self._runtime is None:
            self._runtime = default_runtime()
        return self._runtime

    def start(self) -> threading.Thread:
        """Run the agent in a background thread; `stop()` ends it."""
        self._thread = threading.Thread(target=self.run, name=f"agent-{self.device_id}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._events.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        """Resume from disk, connect, and serve until `stop()`."""
        self._boot()
        self.inference.start()
        self.link.start()
        try:
            while not self._stopping.is_set():
                try:
                    kind, data = self._events.get(timeout=self._wait_time())
                except queue.Empty:
                    kind, data = "tick", None
                try:
                    self._handle(kind, data)
                    self._timers()
                except Exception as exc:  # one bad event must never take the agent down
                    self._error("agent_errors", f"{type(exc).__name__}: {exc}")
                    log.exception("event_failed", device=self.device_id, kind=kind)
        finally:
            self.inference.stop()
            if self._staging is not None:
                self._staging.close()
            death = Death(device_id=self.device_id, bdseq=self.bdseq)
            self.link.stop((topics.device_stream(self.device_id, topics.DeviceStream.DEATH), encode(death)))

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [self._next_health]
        if self._pacer.due:
            deadlines.append(self._pacer.due)
        return max(0.01, min(0.5, min(deadlines) - now))

    def _handle(self, kind: str, data: Any) -> None:
        if kind == "message":
            self._on_message(*data)
        elif kind == "connected":
            self._on_connected()
        elif kind == "watchdog":
            self._on_watchdog(data)
        elif kind == "disconnected":
            log.info("disconnected", device=self.device_id, reason=data)

    # --- boot and resume ----------------------------------------------------------------------

    def _boot(self) -> None:
        try:
            self.state = self.store.load_state()
        except StoreError as exc:
            self._error("state_corrupt", str(exc))
            self.state = AgentState()
        self._version = max(self.state.version_number, self.state.version_reserved)
        # A fresh reserve above every number the last run may have sent, persisted now, while the
        # board is booting: the next rollout's unpersisted reports then need no fsync of their own.
        # Unsaved (a read-only or full disk), the first report saves one as before.
        reserved = replace(self.state, version_reserved=self._version + VERSION_RESERVE)
        try:
            self.store.save_state(reserved)
            self.state = reserved
        except OSError as exc:
            self._error("state_write_errors", f"cannot save {self.store.state_file}: {exc}")
        deploy_bytes = self.store.load_deploy()
        if deploy_bytes is not None and self.state.rollout_id is not None:
            # deploy.bin was verified before it was saved; whoever can rewrite the state directory
            # can rewrite the model slots too, so checking the signature again buys nothing.
            try:
                deploy = decode_as(deploy_bytes, Deploy)
                self.manifest = decode_as(deploy.manifest, Manifest)
            except DecodeError as exc:
                self._error("resume_errors", f"saved deploy unusable: {exc}")
        self._serve_active()
        # The last report may have died with the process: repeat it on connect, numbered at the top
        # of the reserve, which no progress report uses, so it is above any report already sent.
        self._last_state_msg = self._state_message(version=self._version)
        step = self.state.step
        if step is Step.IDLE or (step.terminal and not (step is Step.SUCCEEDED and self.state.watching)):
            return
        if self.manifest is None and step is not Step.SUCCEEDED:
            self._feed(Event.ERROR, "the saved deploy is missing or unreadable")
            return
        resumes = self.state.resumes + 1
        self.state = replace(self.state, resumes=resumes)
        self.store.save_state(self.state)
        target, event = resume(step, resumes, self.settings.watchdog.max_resumes)
        log.info("resume", device=self.device_id, step=step.value, resumes=resumes)
        if event is not None:
            self._feed(event, f"crash loop: resumed {step.value} {resumes} times")
            return
        self._continue(target)

    def _continue(self, step: Step) -> None:
        """Re-run the work of ``step`` after a restart (each step is idempotent from its start)."""
        work: dict[Step, Effect] = {
            Step.QUEUED: Effect.PRECHECK,
            Step.DOWNLOADING: Effect.FETCH,
            Step.VERIFYING: Effect.VERIFY,
            Step.GATING: Effect.GATE,
            Step.ACTIVATING: Effect.ACTIVATE,
            Step.SUCCEEDED: Effect.WATCH,
            Step.ROLLING_BACK: Effect.ROLLBACK,
        }
        if self.state.step is not step:
            self.state = with_step(self.state, step)
            self.store.save_state(self.state)
        effect = work.get(step)
        if effect is not None:
            self._run_effects((effect,))

    def _serve_active(self) -> None:
        """Load the active slot into the inference loop (falling back to previous if it fails)."""
        if not self.store.active.exists():
            return
        try:
            model = self.runtime.load(self.store.active)
        except ModelLoadError as exc:
            self._error("active_load_errors", str(exc))
            if not self.store.previous.exists():
                return
            self.store.restore_previous()
            self.state = replace(self.state, active=self.state.previous)
            self.store.save_state(self.state)
            model = self.runtime.load(self.store.active)
        version = self.state.active.version if self.state.active else None
        self.inference.swap(model, version)

    # --- the state machine shell --------------------------------------------------------------

    def _feed(self, event: Event, reason: str | None = None) -> None:
        """Feed one event to the table, persist, report, then carry out the effects."""
        t = transition(self.state.step, event)
        if t.state is self.state.step and not t.effects:
            return  # an input the state ignores on purpose
        why = t.reason or reason
        changes: dict[str, Any] = {}
        if t.state is Step.ACTIVATING:
            changes["previous"] = self.state.active
        if t.state.terminal or t.state is Step.ROLLING_BACK:
            changes["reason"] = why
        if event is Event.ROLLED_BACK:
            changes["rolled_back"] = True
        if t.state is Step.SUCCEEDED and event is not Event.ALREADY_ACTIVE:
            changes["watching"] = True
        if t.state is not Step.SUCCEEDED:
            changes["watching"] = False
        if t.undefined:
            self.counters.inc("undefined_transitions")
        self.state = with_step(self.state, t.state, **changes)
        log.info(
            "rollout_step",
            device=self.device_id,
            rollout=self.state.rollout_id,
            on=event.value,
            step=t.state.value,
            reason=why,
        )
        self._report()
        crash_point(f"enter:{t.state.value}")
        self._run_effects(t.effects)

    def _run_effects(self, effects: tuple[Effect, ...]) -> None:
        nexts: list[_Next] = []
        for effect in effects:
            try:
                nexts.append(self._do(effect))
            except Exception as exc:  # a step that raised has failed, whatever it raised
                if not isinstance(exc, OSError | DeviceError):
                    log.exception("effect_failed", device=self.device_id, effect=effect.value)
                nexts.append((Event.ERROR, f"{effect.value}: {type(exc).__name__}: {exc}"))
                break
        for nxt in nexts:
            if nxt is not None:
                self._feed(*nxt)

    def _do(self, effect: Effect) -> _Next:
        crash_point(f"do:{effect.value}")
        m = self.manifest
        if effect is Effect.WATCH:
            return self._arm_watchdog()
        if effect is Effect.ROLLBACK:
            return self._rollback()
        if m is None:
            return Event.ERROR, f"{effect.value} without a manifest"
        if effect is Effect.PRECHECK:
            return self._precheck(m)
        if effect is Effect.FETCH:
            return self._begin_fetch(m)
        if effect is Effect.STOP_FETCH:
            self._end_fetch()
            return None
        if effect is Effect.DISCARD:
            self._end_fetch()
            self._drop_candidate()
            self.store.discard_staging(m.model_sha256)
            return None
        if effect is Effect.VERIFY:
            part, _ = self.store.staging_paths(m.model_sha256)
            if not part.exists():
                return Event.HASH_MISMATCH, "the staged file is gone"
            # Hashed as it was written when this process downloaded it; read back after a restart.
            digest, self._digest = self._digest, None
            got = digest[1] if digest is not None and digest[0] == m.model_sha256 else sha256_file(part)
            if got != m.model_sha256:
                return Event.HASH_MISMATCH, f"file hashes to {got}, manifest says {m.model_sha256}"
            return Event.VERIFIED, None
        if effect is Effect.ADVANCE:
            return (Event.GATE, None) if self.state.step is Step.STAGED else None
        if effect is Effect.GATE:
            return self._gate(m)
        if effect is Effect.ACTIVATE:
            return shadow.begin(self, m) if m.shadow else self._activate(m)
        raise AssertionError(f"unhandled effect {effect}")  # pragma: no cover - the table is closed

    def _precheck(self, m: Manifest) -> _Next:
        active = self.state.active
        if active is not None and active.sha256 == m.model_sha256:
            return Event.ALREADY_ACTIVE, None
        if not m.rollback and is_downgrade(m.version, active.version if active else None):
            return Event.REFUSED, (
                f"version {m.version} is older than the active {active.version if active else ''}; "
                "a downgrade needs a manifest signed with rollback = true"
            )
        why = precheck(m, self._supported_ops(), self._ram_budget())
        if why is not None:
            return Event.INCOMPATIBLE, why
        return Event.START, None

    def _supported_ops(self) -> list[str]:
        if self._ops is None:
            self._ops = self.runtime.supported_ops()
        return self._ops

    def _ram_budget(self) -> int:
        if self.settings.device.ram_bytes > 0:
            return self.settings.device.ram_bytes
        return meminfo()[1]

    def _gate(self, m: Manifest) -> _Next:
        part, _ = self.store.staging_paths(m.model_sha256)
        result = run_gate(self.runtime, part, m, self.settings.gate.latency_runs)
        if not result.ok:
            return Event.GATE_FAILED, result.reason
        self._drop_candidate()
        self._candidate = result.model
        return Event.PASSED, None

    def _activate(self, m: Manifest) -> _Next:
        part, bitmap = self.store.staging_paths(m.model_sha256)
        # The rename moves the staged file away, so a staged file still there is not active yet; only
        # a resume after the rename has to hash the active slot to know it holds the target.
        if part.exists():
            self.store.activate(part)
        elif self.store.active_sha256() != m.model_sha256:
            return Event.ERROR, "the staged file vanished before activation"
        with contextlib.suppress(FileNotFoundError):
            bitmap.unlink()
        model, self._candidate = self._candidate, None
        if model is None:
            model = self.runtime.load(self.store.active)
        self.inference.swap(model, m.version)
        self.state = replace(self.state, active=ModelRef(m.version, m.model_sha256))
        return Event.ACTIVATED, None

    def _arm_watchdog(self) -> _Next:
        wd = self.settings.watchdog
        self._watchdog = Watchdog(wd.window, wd.max_error_ratio, wd.collapse_tolerance)
        watchdog, events = self._watchdog, self._events

        def observe(values: list[float] | None) -> None:
            # Runs in the inference thread; only the verdict crosses over to the main thread.
            was = watchdog.result
            result = watchdog.error() if values is None else watchdog.output(values)
            if result is not None and was is None:
                events.put(("watchdog", result))

        self.inference.observe(observe)
        return None

    def _on_watchdog(self, result: WatchdogResult) -> None:
        self.inference.observe(None)
        self._watchdog = None
        if self.state.step is not Step.SUCCEEDED:
            return
        if result.ok:
            log.info("watchdog_ok", device=self.device_id, detail=result.reason)
            self.state = replace(self.state, watching=False, resumes=0)
            self.store.save_state(self.state)
            return
        self.counters.inc("watchdog_trips")
        self._feed(Event.WATCHDOG_TRIP, f"watchdog: {result.reason}")

    def _rollback(self) -> _Next:
        self.inference.observe(None)
        previous = self.state.previous
        if previous is not None and self.store.previous.exists():
            self.store.restore_previous()
            model: LoadedModel | None = self.runtime.load(self.store.active)
        else:
            # Nothing older to serve: stop serving rather than keep a model that failed.
            with contextlib.suppress(FileNotFoundError):
                self.store.active.unlink()
            model, previous = None, None
        self.inference.swap(model, previous.version if previous else None)
        self.state = replace(self.state, active=previous)
        return Event.ROLLED_BACK, self.state.reason

    def _drop_candidate(self) -> None:
        if self._candidate is not None:
            self._candidate.close()
            self._candidate = None

    # --- reporting ----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._seq_lock:
            seq = self._seq
            self._seq = (seq + 1) % 256
            return seq

    def _report(self, percent: int | None = None) -> None:
        """Persist the state with a new version number, then publish it (retained).

        A progress report (``percent``) or one of an UNPERSISTED step persists nothing while it uses
        a reserved number below the top one (kept for the report a restarted agent repeats).
        """
        self._version += 1
        if percent is None and self.state.step not in UNPERSISTED:
            self.state = replace(
                self.state, version_number=self._version, version_reserved=self._version + VERSION_RESERVE
            )
            self.store.save_state(self.state)
        elif self._version >= self.state.version_reserved:
            self.state = replace(self.state, version_reserved=self._version + VERSION_RESERVE)
            self.store.save_state(self.state)
        msg = self._state_message(percent, self._version)
        if msg is not None:
            self._last_state_msg = msg
            self.link.publish(self._topic(topics.DeviceStream.STATE), msg, qos=1, retain=True)

    def _state_message(self, percent: int | None = None, version: int | None = None) -> bytes | None:
        rep = report(self.state.step, percent=percent, rolled_back=self.state.rolled_back)
        if rep is None or self.state.rollout_id is None:
            return None
        msg = State(
            device_id=self.device_id,
            seq=self._next_seq(),
            rollout_id=self.state.rollout_id,
            status=rep.status,
            version_number=self.state.version_number if version is None else version,
            details=rep.details,
            reason=self.state.reason,
            model_version=self.state.active.version if self.state.active else None,
        )
        return encode(msg)

    def _topic(self, stream: topics.DeviceStream) -> str:
        return topics.device_stream(self.device_id, stream)

    def _will(self) -> tuple[str, bytes]:
        # Called from paho's thread before every connect: a fresh bdseq for the birth that follows.
        self.bdseq = self.store.next_bdseq()
        return self._topic(topics.DeviceStream.DEATH), encode(
            Death(device_id=self.device_id, bdseq=self.bdseq)
        )

    def birth(self) -> Birth:
        total, avail = meminfo()
        active = self.state.active
        runtime = self.runtime
        return Birth(
            device_id=self.device_id,
            seq=self._next_seq(),
            bdseq=self.bdseq,
            groups=list(self.settings.device.groups),
            agent_version=agent_version(),
            runtime=runtime.name,
            runtime_version=runtime.version,
            ops=self._supported_ops(),
            ram_total_bytes=self.settings.device.ram_bytes or total,
            ram_free_bytes=avail,
            disk_free_bytes=self.store.disk_free(),
            model_version=active.version if active else None,
            model_sha256=active.sha256 if active else None,
        )

    def _publish_birth(self) -> None:
        self.link.publish(self._topic(topics.DeviceStream.BIRTH), encode(self.birth()), qos=1, retain=True)

    def health(self) -> Health:
        p50, p95 = self.stats.p50_p95()
        return Health(
            device_id=self.device_id,
            seq=self._next_seq(),
            uptime_s=round(time.monotonic() - self._started, 3),
            cpu_percent=self._cpu.percent(),
            rss_bytes=rss_bytes(),
            disk_free_bytes=self.store.disk_free(),
            inference_count=self.stats.count,
            error_count=self.stats.errors,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            model_version=self.inference.version,
            counters=self.counters.snapshot(),
            last_error=self._last_error or self.inference.last_error,
        )

    def _publish_results(self, batch: Batch) -> None:
        # Called from the inference thread; paho's publish is thread-safe.
        msg = Results(
            device_id=self.device_id,
            seq=self._next_seq(),
            model_version=batch.model_version,
            outputs=batch.outputs,
            latency_ms=batch.latency_ms,
            errors=batch.errors,
            first_ts=batch.first_ts,
            last_ts=batch.last_ts,
        )
        self.link.publish(self._topic(topics.DeviceStream.RESULTS), encode(msg))

    def _error(self, counter: str, message: str, **fields: Any) -> None:
        self.counters.inc(counter)
        self._last_error = message
        log.warning(counter, device=self.device_id, error=message, **fields)

    # --- connection ---------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        d, groups = self.device_id, self.settings.device.groups
        subs = [topics.device_desired(d), topics.device_cmd(d), topics.repair_filter(d)]
        subs += [topics.group_desired(g) for g in groups] + [topics.group_cmd(g) for g in groups]
        if self.settings.transfer.accept_push:
            subs += [topics.push_filter(g) for g in groups]
        if self._blob_filter:
            subs.append(self._blob_filter)
        return subs

    def _on_connected(self) -> None:
        log.info("connected", device=self.device_id, bdseq=self.bdseq)
        self.link.subscribe(self._subscriptions())
        self._publish_birth()
        if self._last_state_msg is not None:
            self.link.publish(
                self._topic(topics.DeviceStream.STATE), self._last_state_msg, qos=1, retain=True
            )
        if self._staging is not None:
            self._pushed.clear()  # a push is never repeated: what the last session missed is fetched
            self._pacer.start()
            self._send_fetch()

    # --- messages -----------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        try:
            where = topics.parse(topic)
        except TopicError as exc:
            self._error("foreign_topics", str(exc))
            return
        if not self._is_for_me(where):
            # amqtt replays other clients' retained messages on connect; not ours to act on.
            self.counters.inc("foreign_messages")
            return
        if where.kind in _CHUNK_KINDS and self._skip_chunk(where):
            return
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self._error("decode_errors", str(exc), topic=topic)
            self._release_early(where, payload)
            return
        if where.kind in _CHUNK_KINDS:
            if not isinstance(msg, Chunk):
                self._error("unexpected_kinds", f"{msg.kind} on a chunk topic", topic=topic)
                return
            if msg.sha256 != where.sha256 or msg.index != where.index:
                self._error("chunk_topic_mismatch", f"chunk {msg.sha256[:12]}/{msg.index} on {topic}")
                return
            self._on_chunk(msg)
        elif where.kind in ("desired_dev", "desired_grp"):
            if not isinstance(msg, Deploy):
                self._error("unexpected_kinds", f"{msg.kind} on a desired topic", topic=topic)
                self._release_early(where, payload)
                return
            # A retained copy is a replay (a reconnect, a late subscriber): nothing is pushed after it.
            self._on_deploy(msg, payload, live=not retained)
        elif isinstance(msg, Rebirth):
            self._publish_birth()
        elif isinstance(msg, Cancel):
            if msg.rollout_id == self.state.rollout_id:
                shadow.end(self)
                self._feed(Event.CANCEL, "canceled by the operator")
        else:
            self._error("unexpected_kinds", f"{msg.kind} on a command topic", topic=topic)

    def _skip_chunk(self, where: topics.Topic) -> bool:
        """Drop, before decoding, a chunk of another file or one already held.

        In a fleet every device sees every broadcast chunk, most of them already held; judging by
        the topic alone keeps a duplicate's cost to a lookup.  Nothing is written on this path, so a
        lying topic can only make the device ask for the chunk again.
        """
        st, m = self._staging, self.manifest
        if st is None or m is None or where.sha256 != m.model_sha256:
            self.counters.inc("unexpected_chunks")
            if where.kind != "blob" and where.sha256 is not None and where.index is not None:
                # amqtt may let a pushed chunk overtake its deploy: remember it is not coming.
                if len(self._dropped_pushes) >= 4096:
                    self._dropped_pushes.clear()
                self._dropped_pushes.add((where.sha256, where.index))
            return True
        if where.index is not None and st.book.has(where.index):
            self.counters.inc("chunks_received")
            self.counters.inc("duplicate_chunks")
            return True
        return False

    def _is_for_me(self, where: topics.Topic) -> bool:
        groups = self.settings.device.groups
        if where.kind in ("desired_dev", "cmd_dev", "repair"):
            return where.device == self.device_id
        if where.kind in ("desired_grp", "cmd_grp", "push"):
            return where.group in groups
        return where.kind == "blob"

    def _pinned(self) -> dict[str, Any]:
        if self._pinned_keys is None:
            self._pinned_keys = pin_device_keys(self._keys)
        return self._pinned_keys

    def _on_arrival(self, topic: str, payload: bytes | bytearray) -> None:
        """In paho's thread, as a deploy arrives: subscribe to its file's chunks at once.

        In a fleet the first device to fetch starts the broadcast, and one not subscribed by then
        is repaired chunk by chunk; the agent's thread may reach the deploy much later (behind a
        backlog, or, in a simulated fleet, behind the other agents' turns at the GIL).  Nothing is
        trusted here: the agent's thread claims the subscription, or drops it, when it checks the
        deploy, and chunks wait in its queue until then.
        """
        if "/desired/" not in topic:
            return
        try:
            where = topics.parse(topic)
        except TopicError:
            return
        blob = _blob_of(payload) if self._is_for_me(where) else None
        if blob is None:
            return
        with self._early_lock:
            if blob in self._early_blobs or blob == self._blob_filter:
                return
            self._early_blobs.add(blob)
        self.link.subscribe([blob])

    def _on_deploy(self, deploy: Deploy, payload: bytes, live: bool = False) -> None:
        early = self._claim_early(deploy)
        self._push_offer = deploy.pushed if live and self.settings.transfer.accept_push else 0
        try:
            if deploy.rollout_id == self.state.rollout_id and payload == self.store.load_deploy():
                self.counters.inc("repeated_deploys")  # the retained deploy again, after a reconnect
                return
            self._accept_deploy(deploy, payload)
        finally:
            if early is not None and early != self._blob_filter:
                self.link.unsubscribe(early)  # this deploy did not lead to a download of that file
            self._early_blob = None
            self._push_offer = 0

    def _release_early(self, where: topics.Topic, payload: bytes) -> None:
        """Drop what ``_on_arrival`` subscribed for a desired message that turned out not a deploy."""
        blob = _blob_of(payload) if where.kind in ("desired_dev", "desired_grp") else None
        if blob is None:
            return
        with self._early_lock:
            if blob not in self._early_blobs:
                return
            self._early_blobs.discard(blob)
        if blob != self._blob_filter:
            self.link.unsubscribe(blob)

    def _claim_early(self, deploy: Deploy) -> str | None:
        """The chunk filter subscribed for this deploy as it arrived (subscribed now if it was not)."""
        blob = _blob_of_manifest(deploy.manifest)
        if blob is None:
            return None  # unreadable: the signature check refuses it
        with self._early_lock:
            subscribed = blob in self._early_blobs
            self._early_blobs.discard(blob)
        if blob == self._blob_filter:
            return None  # already downloading that file (a second SUBSCRIBE to it changes nothing)
        if not subscribed:
            self.link.subscribe([blob])  # it did not come through the link (a replayed event)
        self._early_blob = blob
        return blob

    def _accept_deploy(self, deploy: Deploy, payload: bytes) -> None:
        try:
            m = verify(deploy, self._pinned())
        except SignatureError as exc:
            self._error("bad_signatures", str(exc))
            return
        except DecodeError as exc:
            self._error("decode_errors", f"signed manifest: {exc}")
            return
        if m.rollout_id == self.state.rollout_id:
            self.counters.inc("repeated_deploys")  # the same rollout re-signed or re-encoded
            return
        if m.ts < self.state.manifest_ts:
            self.counters.inc("stale_deploys")  # an older group deploy next to a newer device one
            return
        if self.state.step in BEFORE_ACTIVATION:
            self._feed(Event.SUPERSEDED, f"superseded by rollout {m.rollout_id}")
        shadow.end(self)
        self.store.save_deploy(payload)
        self.manifest = m
        self._last_percent = -1
        self.state = replace(
            self.state,
            rollout_id=m.rollout_id,
            target=ModelRef(m.version, m.model_sha256),
            manifest_ts=m.ts,
            started_at=time.time(),
            reason=None,
            rolled_back=False,
        )
        self._feed(Event.DEPLOY)

    # --- transfer -----------------------------------------------------------------------------

    def _begin_fetch(self, m: Manifest) -> _Next:
        self._end_fetch()
        self._staging = self.store.open_staging(m.model_sha256, m.size, m.chunk_size, list(m.chunk_sha256))
        if self._staging.book.complete:
            return Event.COMPLETE, None
        self._blob_filter = topics.blob_filter(m.model_sha256)
        if self._blob_filter != self._early_blob:
            self.link.subscribe([self._blob_filter])
        self._pacer.window = self._window(m)
        self._pacer.start()
        self._last_percent = st_percent = self._staging.book.percent
        self._last_progress = now = time.monotonic()
        book, sha = self._staging.book, m.model_sha256
        self._pushed = {
            i
            for i in range(min(self._push_offer, book.count))
            if not book.has(i) and (sha, i) not in self._dropped_pushes
        }
        self._dropped_pushes.clear()
        if self._pushed:
            self.counters.inc("pushes_awaited")
            self._pacer.expect(now, len(self._pushed))  # the first window is already on its way
        else:
            self._send_fetch()
        if st_percent:
            self._report(percent=st_percent)  # a resumed download says how far it already is
        return None

    def _end_fetch(self) -> None:
        if self._staging is not None:
            if self._staging.book.complete and self.manifest is not None:
                self._digest = (self.manifest.model_sha256, self._staging.digest())
            self._staging.flush()
            self._staging.close()
            self._staging = None
        if self._blob_filter is not None:
            self.link.unsubscribe(self._blob_filter)
            self._blob_filter = None
        self._pushed.clear()
        self._pacer.stop()

    def _send_fetch(self) -> None:
        st = self._staging
        if st is None or self.manifest is None:
            return
        # No flush first: a bit the disk does not hold yet only makes the server skip a chunk that
        # a restarted agent then asks for again with the bitmap it persisted.
        window = self._window(self.manifest)
        bitmap = st.book.bitmap
        if self._pushed:
            claimed = bytearray(bitmap)
            for i in self._pushed:
                set_bit(claimed, i)
            bitmap = bytes(claimed)
        fetch = Fetch(
            device_id=self.device_id,
            seq=self._next_seq(),
            sha256=self.manifest.model_sha256,
            chunk_count=st.book.count,
            bitmap=bitmap,
            window=window,
        )
        self.link.publish(self._topic(topics.DeviceStream.FETCH), encode(fetch), qos=1)
        self.counters.inc("fetches")
        self._pacer.sent(time.monotonic())

    def _window(self, m: Manifest) -> int:
        """Chunks a fetch asks for: the configured window, within FETCH_WINDOW_BYTES."""
        return max(1, min(self.settings.transfer.window, FETCH_WINDOW_BYTES // m.chunk_size))

    def _on_chunk(self, chunk: Chunk) -> None:
        st = self._staging
        if st is None or self.manifest is None or chunk.sha256 != self.manifest.model_sha256:
            self.counters.inc("unexpected_chunks")
            return
        self.counters.inc("chunks_received")
        outcome = st.write(chunk.index, chunk.data)
        if outcome.rejected:
            self._error(f"chunks_{outcome.value}", f"chunk {chunk.index}: {outcome.value}")
            return
        if outcome is Outcome.DUPLICATE:
            self.counters.inc("duplicate_chunks")
            return
        self.counters.inc("chunks_stored")
        self._pushed.discard(chunk.index)
        crash_point(f"chunk:{st.book.held}")
        if st.book.complete:
            self._feed(Event.COMPLETE)
            return
        ask = self._pacer.stored(time.monotonic(), self._events.qsize())
        if ask and st.book.count - st.book.held > len(self._pushed):
            self._send_fetch()  # half the window is in and the inbox is read: ask for the next one
        self._report_progress()

    def _report_progress(self) -> None:
        st = self._staging
        if st is None:
            return
        pct = st.book.percent
        if pct // 10 > self._last_percent // 10:
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_percent, self._last_progress = pct, now
            self._report(percent=pct)

    # --- timers -------------------------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        step = self.state.step
        m = self.manifest
        if (
            step in (Step.QUEUED, Step.DOWNLOADING)
            and m
            and time.time() - self.state.started_at > m.timeout_s
        ):
            self._feed(Event.TIMEOUT, f"not complete after {m.timeout_s:g} s")
            return
        if self._staging is not None and self._pacer.tick(now, self._events.qsize()):
            self.counters.inc("fetch_retries")
            self._pushed.clear()  # a push is sent once, right after its deploy: silence means lost
            self._send_fetch()
        if now >= self._next_health:
            self._next_health = now + self.settings.health.interval_s
            if self.link.connected:
                self.link.publish(self._topic(topics.DeviceStream.HEALTH), encode(self.health()))
