"""The rollout controller: a pure state machine that turns events into effects.

``fleetbus serve`` feeds it events, each stamped with an explicit ``now`` (device status updates, KPI
samples, shadow agreement, online/offline, ticks, operator commands) and carries out the effects it
returns (notify a device, cancel, roll back, announce a wave). It never reads a clock, a socket or a
file, so every behaviour below is a unit test.

Rollout states (``RolloutState``); ``TRANSITIONS`` is the table, this is its picture::

    PENDING --Start--> RUNNING <--pause/resume--> PAUSED
    RUNNING --a wave fails with on_fail = "pause"--> PAUSED   (resume accepts the wave)
    RUNNING --last wave passes--------------------> COMPLETED
    RUNNING|PAUSED --abort criterion / wave fails--> ABORTED      (on_abort = "stop")
                                                  \\-> ROLLED_BACK (on_abort = "rollback")
    PENDING|RUNNING|PAUSED|COMPLETED --cancel-----> CANCELED

Semantics (docs/rollouts.md has the long form):

* A wave's devices are notified when the wave starts. Offline devices are *deferred*: notified when
  they come back online, even after later waves started or the rollout completed.
* Wave N+1 starts when wave N has soaked ``min_soak_s`` since its first notification AND the share of
  its notified devices that SUCCEEDED reaches ``min_succeeded_pct`` AND its KPI gate passed. A wave
  fails when its KPI gate fails or when every notified device is settled below the share; it then
  aborts or pauses (``success.on_fail``). Resuming after such a pause accepts the wave. The last
  wave also waits for all its notified devices to finish, so COMPLETED leaves no execution open.
* Abort criteria are judged after every final outcome, over the whole rollout's executed devices
  (final SUCCEEDED, FAILED, REJECTED or TIMED_OUT), only once ``min_executed`` of them exist.
* A device that does not finish within ``in_progress_timeout_s`` of its notification is TIMED_OUT. A
  failure of a type with retries left re-notifies the device (a new ``attempt``) instead of counting.
  The timeout clock stops while a device is offline and restarts in full when it returns.
* Nothing is notified while PAUSED or outside the maintenance window; status updates, timeouts and
  abort criteria still apply. Rollbacks and cancels ignore the window: they stop harm.
* Status updates whose ``version_number`` is not above the last one seen are stale and ignored. A
  status from a device that is not part of the rollout is an ``Anomaly``.
* ``to_dict``/``from_dict`` round-trip the whole state; a restored controller never re-notifies a
  device it already notified (deploys are retained, so the device still has it).
"""

from __future__ import annotations

import enum
import math
from typing import Any

from pydantic import ValidationError

from publisher.document import RetryType, RolloutDocument
from publisher.errors import RolloutError
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
    KpiSample,
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
    parse_execution_id,
)
from publisher.rollout_state import (
    STATE_FORMAT,
    AnomalyRecord,
    ControllerState,
    DeviceRecord,
    KpiTotals,
    RolloutState,
    WaveRecord,
    WaveState,
)
from publisher.waves import KpiFigures, Plan
from schemas.messages import ExecStatus, RolloutStatus, WaveProgress

__all__ = [
    "TRANSITIONS",
    "Aborted",
    "Anomaly",
    "CancelDevice",
    "Canceled",
    "Command",
    "CommandRefused",
    "Completed",
    "Controller",
    "ControllerBug",
    "ControllerState",
    "DeviceOffline",
    "DeviceOnline",
    "DeviceRecord",
    "Effect",
    "Event",
    "KpiSample",
    "KpiTotals",
    "MarkTimedOut",
    "Notify",
    "Paused",
    "Resumed",
    "Rollback",
    "RolloutState",
    "ShadowSample",
    "Start",
    "StatusUpdate",
    "Tick",
    "Trigger",
    "WaveCompleted",
    "WaveFailed",
    "WaveRecord",
    "WaveStarted",
    "WaveState",
]

MAX_ANOMALIES_KEPT = 200


class Trigger(str, enum.Enum):
    """What moves the rollout from one state to another: operator commands and the machine's own verdicts."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    WAVE_PAUSE = "wave_pause"  # a wave failed with on_fail = "pause"
    COMPLETE = "complete"
    ABORT = "abort"  # on_abort = "stop"
    ABORT_ROLLBACK = "abort_rollback"  # on_abort = "rollback"


_R = RolloutState
#: The whole rollout-level machine, one row per allowed (state, trigger). A command whose pair is not
#: here is refused with CommandRefused; an internal trigger not here is a bug (ControllerBug).
TRANSITIONS: dict[tuple[RolloutState, Trigger], RolloutState] = {
    (_R.PENDING, Trigger.START): _R.RUNNING,
    (_R.PENDING, Trigger.CANCEL): _R.CANCELED,
    (_R.RUNNING, Trigger.PAUSE): _R.PAUSED,
    (_R.RUNNING, Trigger.WAVE_PAUSE): _R.PAUSED,
    (_R.RUNNING, Trigger.COMPLETE): _R.COMPLETED,
    (_R.RUNNING, Trigger.ABORT): _R.ABORTED,
    (_R.RUNNING, Trigger.ABORT_ROLLBACK): _R.ROLLED_BACK,
    (_R.RUNNING, Trigger.CANCEL): _R.CANCELED,
    (_R.PAUSED, Trigger.RESUME): _R.RUNNING,
    (_R.PAUSED, Trigger.ABORT): _R.ABORTED,
    (_R.PAUSED, Trigger.ABORT_ROLLBACK): _R.ROLLED_BACK,
    (_R.PAUSED, Trigger.CANCEL): _R.CANCELED,
    (_R.COMPLETED, Trigger.CANCEL): _R.CANCELED,
}


class ControllerBug(RolloutError):
    """The controller tried a transition its table does not have: a bug in this module, never input."""


_FAILURES = {
    ExecStatus.FAILED: RetryType.FAILED,
    ExecStatus.REJECTED: RetryType.REJECTED,
    ExecStatus.TIMED_OUT: RetryType.TIMED_OUT,
}
_EXECUTED = frozenset({ExecStatus.SUCCEEDED, ExecStatus.FAILED, ExecStatus.REJECTED, ExecStatus.TIMED_OUT})


def _totals(figures: KpiFigures | None) -> KpiTotals:
    totals = KpiTotals()
    if figures is not None:
        totals.add(figures.inferences, figures.errors, figures.p95_ms)
    return totals


# --- the controller -------------------------------------------------------------------------------


class Controller:
    """Drive one rollout: ``handle(event)`` returns the effects the service must carry out, in order."""

    def __init__(self, state: ControllerState) -> None:
        self._s = state
        self._due: set[str] = set()
        self._in_flight: set[str] = set()
        # True: judging the abort criteria is idempotent, so a restored controller judges them once.
        self._final_changed = True
        self._reindex()

    @classmethod
    def from_plan(cls, document: RolloutDocument, plan: Plan) -> Controller:
        """A PENDING controller for ``plan`` (made by ``publisher.waves.plan_rollout`` from ``document``)."""
        deferred = set(plan.deferred)
        devices: dict[str, DeviceRecord] = {}
        position = 0
        for wave in plan.waves:
            for device in wave.devices:
                devices[device] = DeviceRecord(
                    wave=wave.index,
                    position=position,
                    online=device not in deferred,
                    previous_version=plan.previous_versions.get(device),
                    baseline=_totals(plan.baselines.get(device)),
                )
                position += 1
        state = ControllerState(
            document=document,
            rollout_id=plan.rollout_id,
            waves=[WaveRecord(index=w.index, devices=list(w.devices)) for w in plan.waves],
            devices=devices,
            skipped={s.device_id: f"{s.reason}: {s.detail}" for s in plan.skipped},
        )
        return cls(state)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Controller:
        """Restore a controller saved with ``to_dict``; ``RolloutError`` when the data is not one."""
        found = data.get("format")
        if isinstance(found, int) and found > STATE_FORMAT:
            raise RolloutError(
                f"saved rollout state has format {found}, newer than this fleetbus ({STATE_FORMAT}); "
                "upgrade fleetbus"
            )
        try:
            return cls(ControllerState.model_validate(data))
        except ValidationError as exc:
            raise RolloutError(
                f"saved rollout state is unreadable ({exc.error_count()} problems): {exc}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-ready data; save it after carrying out each batch of effects."""
        return self._s.model_dump(mode="json")

    # --- read side --------------------------------------------------------------------------------

    @property
    def state(self) -> ControllerState:
        """The live state, for reading (mutating it bypasses the machine)."""
        return self._s

    @property
    def rollout_id(self) -> str:
        return self._s.rollout_id

    @property
    def rollout_state(self) -> RolloutState:
        return self._s.state

    @property
    def outstanding(self) -> int:
        """Devices still owed a notification or still executing; 0 means nothing more will happen."""
        if self._s.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK, RolloutState.CANCELED):
            return 0
        return len(self._due) + len(self._in_flight)

    def device_state(self, device_id: str) -> str:
        """A device's state in words: an ExecStatus, or PENDING / DEFERRED / NOTIFIED / RETRYING."""
        rec = self._s.devices[device_id]
        if rec.due and rec.attempt > 0:
            return "RETRYING"
        if rec.status is not None:
            return rec.status.value
        if rec.attempt > 0:
            return "NOTIFIED"
        if rec.canceled:
            return ExecStatus.CANCELED.value
        if rec.due and not rec.online:
            return "DEFERRED"
        return "PENDING"

    def next_deadline(self, now: float) -> float | None:
        """The earliest time a Tick could change something: a timeout, a soak's end, the window opening."""
        window = self._doc.maintenance
        if window is not None and self._due and not window.contains(now):
            opening = [window.next_open(now)]
        else:
            opening = []
        times = opening + [
            rec.deadline
            for d in self._in_flight
            if (rec := self._s.devices[d]).deadline is not None and rec.online
        ]
        if self._s.state is RolloutState.RUNNING and self._s.wave < len(self._s.waves):
            wave = self._s.waves[self._s.wave]
            if wave.started_at is not None:
                times.append(wave.started_at + self._doc.waves[wave.index].min_soak_s)
        return min(times) if times else None

    def status(self, now: float) -> RolloutStatus:
        """The ``rollout_status`` message for this rollout as it stands."""
        s = self._s
        overall: dict[str, int] = {}
        waves: list[WaveProgress] = []
        for wave in s.waves:
            counts: dict[str, int] = {}
            for device in wave.devices:
                key = self.device_state(device)
                counts[key] = counts.get(key, 0) + 1
                overall[key] = overall.get(key, 0) + 1
            considered = self._considered(wave)
            succeeded = sum(1 for d in considered if s.devices[d].status is ExecStatus.SUCCEEDED)
            samples = sum(s.devices[d].shadow_samples for d in wave.devices)
            agreed = sum(s.devices[d].shadow_agreed for d in wave.devices)
            waves.append(
                WaveProgress(
                    index=wave.index,
                    state=wave.state.value,
                    devices=len(wave.devices),
                    notified=sum(1 for d in wave.devices if s.devices[d].attempt > 0),
                    states=counts,
                    succeeded_pct=100.0 * succeeded / len(considered) if considered else 0.0,
                    started_at=wave.started_at,
                    kpis=dict(wave.kpis),
                    gate=wave.gate,
                    shadow_agreement=agreed / samples if samples else None,
                )
            )
        return RolloutStatus(
            ts=now,
            rollout_id=s.rollout_id,
            version=self._doc.model.version,
            state=s.state.value,
            reason=s.reason,
            wave=min(s.wave, max(0, len(s.waves) - 1)),
            waves=waves,
            states=overall,
            devices=len(s.devices),
            skipped=len(s.skipped),
            deferred=sum(1 for d in self._due if not s.devices[d].online),
            anomalies=s.anomaly_count,
        )

    # --- write side -------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event at ``event.now``; return the effects to carry out, in order."""
        out: list[Effect] = []
        self._s.updated_at = event.now
        if isinstance(event, Start):
            self._on_start(event, out)
        elif isinstance(event, StatusUpdate):
            self._on_status(event, out)
        elif isinstance(event, KpiSample):
            self._on_kpi(event)
        elif isinstance(event, ShadowSample):
            self._on_shadow(event)
        elif isinstance(event, DeviceOnline):
            self._on_online(event)
        elif isinstance(event, DeviceOffline):
            rec = self._s.devices.get(event.device_id)
            if rec is not None:
                rec.online = False
        elif isinstance(event, Command):
            self._on_command(event, out)
        self._progress(event.now, out)
        return out

    @property
    def _doc(self) -> RolloutDocument:
        return self._s.document

    def _reindex(self) -> None:
        self._due = {d for d, rec in self._s.devices.items() if rec.due}
        self._in_flight = {d for d, rec in self._s.devices.items() if rec.in_flight}

    def _anomaly(self, now: float, device_id: str, reason: str, out: list[Effect]) -> None:
        s = self._s
        s.anomaly_count += 1
        s.anomalies.append(AnomalyRecord(ts=now, device_id=device_id, reason=reason))
        del s.anomalies[:-MAX_ANOMALIES_KEPT]
        out.append(Anomaly(device_id, reason))

    def _move(self, trigger: Trigger) -> None:
        """Take the table's transition for ``trigger`` from the current state."""
        target = TRANSITIONS.get((self._s.state, trigger))
        if target is None:
            raise ControllerBug(f"no transition from {self._s.state.value} on {trigger.value}")
        self._s.state = target

    # events

    def _on_start(self, event: Start, out: list[Effect]) -> None:
        if (self._s.state, Trigger.START) in TRANSITIONS:  # a repeated Start is harmless, not refused
            self._move(Trigger.START)
            self._s.started_at = event.now

    def _on_command(self, event: Command, out: list[Effect]) -> None:
        s = self._s
        trigger = Trigger(event.action)
        if (s.state, trigger) not in TRANSITIONS:
            allowed = sorted(state.value for state, t in TRANSITIONS if t is trigger)
            why = f"the rollout is {s.state.value}; {event.action} applies to {' or '.join(allowed)}"
            out.append(CommandRefused(event.action, why))
            return
        if trigger is Trigger.PAUSE:
            self._move(trigger)
            s.pause_by_gate, s.reason = False, event.reason or f"paused by {event.by or 'operator'}"
            out.append(Paused(s.reason))
        elif trigger is Trigger.RESUME:
            if s.pause_by_gate and s.wave < len(s.waves):
                # Resuming over a failed wave is the operator's sign-off on it (hawkBit's PAUSE action).
                s.waves[s.wave].accepted = True
            self._move(trigger)
            s.pause_by_gate, s.reason = False, None
            out.append(Resumed(event.by))
        else:
            reason = event.reason or f"canceled by {event.by or 'operator'}"
            self._stop(event.now, Trigger.CANCEL, reason, out)
            out.append(Canceled(reason))

    def _on_status(self, event: StatusUpdate, out: list[Effect]) -> None:
        s = self._s
        explicit = bool(event.rollout_id)
        base, attempt, shadow = (
            parse_execution_id(event.rollout_id) if event.rollout_id else (s.rollout_id, 0, False)
        )
        if base != s.rollout_id:
            self._anomaly(event.now, event.device_id, f"status for rollout {event.rollout_id!r}", out)
            return
        rec = s.devices.get(event.device_id)
        if rec is None:
            why = s.skipped.get(event.device_id)
            reason = (
                f"skipped ({why}) but reported {event.status.value}" if why else "not part of this rollout"
            )
            self._anomaly(event.now, event.device_id, reason, out)
            return
        if event.version_number <= rec.version_number:
            return  # stale or replayed (retained state topics replay on resubscribe)
        rec.version_number = event.version_number
        wave = s.waves[rec.wave]
        if shadow or wave.state is WaveState.SHADOW or (rec.attempt == 0 and rec.shadow_notified):
            return  # the shadow run's own progress; only agreement counts in that phase
        if explicit and attempt > max(rec.attempt, 1):
            reason = f"reported attempt {attempt} of which only {rec.attempt} were sent"
            self._anomaly(event.now, event.device_id, reason, out)
            return
        if explicit and attempt < rec.attempt and event.status is not ExecStatus.SUCCEEDED:
            return  # a report from an attempt that is over; a success still means it runs the model
        if rec.canceled or rec.final:
            if event.status is ExecStatus.SUCCEEDED and not rec.committed:
                rec.committed = True  # committed before our cancel or timeout reached it
                self._rollback_if_needed(event.device_id, rec, out)
            return
        if rec.attempt == 0:
            if wave.state is WaveState.WAITING or s.state is RolloutState.PENDING:
                # Its wave has not started: it must not have our deploy; it gets one in turn.
                reason = f"reported {event.status.value} before its wave started"
                self._anomaly(event.now, event.device_id, reason, out)
                return
            # Its wave is on, so it has the deploy after all: a notify carried out by a service that
            # crashed before saving the state that recorded it. Count it as the first attempt.
            self._mark_notified(rec, event.device_id, event.now)
        if event.status is ExecStatus.SUCCEEDED:
            rec.status, rec.committed = ExecStatus.SUCCEEDED, True
            self._settle(event.device_id, rec)
        elif event.status in _FAILURES:
            if not rec.due:  # a failure while awaiting its retry is the same failure again
                self._fail(event.device_id, rec, _FAILURES[event.status])
        elif event.status in (ExecStatus.INCOMPATIBLE, ExecStatus.CANCELED):
            rec.status = event.status
            self._settle(event.device_id, rec)
        elif not rec.due:
            rec.status = event.status  # QUEUED / IN_PROGRESS

    def _on_kpi(self, event: KpiSample) -> None:
        rec = self._s.devices.get(event.device_id)
        if rec is None or event.inferences <= 0:
            return
        if event.model_version == self._doc.model.version:
            rec.candidate.add(event.inferences, event.errors, event.p95_ms)
        elif not rec.committed:
            # The "before" figures: only what the device did before it switched to the candidate.
            rec.baseline.add(event.inferences, event.errors, event.p95_ms)

    def _on_shadow(self, event: ShadowSample) -> None:
        rec = self._s.devices.get(event.device_id)
        if rec is None or event.samples <= 0:
            return
        rec.shadow_samples += event.samples
        rec.shadow_agreed += max(0, min(event.agreed, event.samples))

    def _on_online(self, event: DeviceOnline) -> None:
        rec = self._s.devices.get(event.device_id)
        if rec is None:
            return
        rec.online = True
        if rec.in_flight and rec.deadline is not None:
            rec.deadline = max(rec.deadline, event.now + self._doc.in_progress_timeout_s)

    # device bookkeeping

    def _mark_notified(self, rec: DeviceRecord, device_id: str, now: float) -> None:
        rec.attempt += 1
        rec.status = None
        rec.notified_at = now
        rec.deadline = now + self._doc.in_progress_timeout_s
        rec.due = False
        self._due.discard(device_id)
        self._in_flight.add(device_id)
        wave = self._s.waves[rec.wave]
        if wave.started_at is None and wave.state is WaveState.ACTIVE:
            wave.started_at = now

    def _settle(self, device_id: str, rec: DeviceRecord) -> None:
        rec.final, rec.due = True, False
        self._due.discard(device_id)
        self._in_flight.discard(device_id)
        self._final_changed = True

    def _fail(self, device_id: str, rec: DeviceRecord, failure: RetryType) -> None:
        rec.status = ExecStatus(failure.value)
        used = rec.retries_used.get(failure.value, 0)
        retrying = self._s.state in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED)
        if retrying and used < self._doc.retries_for(failure):
            rec.retries_used[failure.value] = used + 1
            rec.due = True
            self._due.add(device_id)
            self._in_flight.discard(device_id)
        else:
            self._settle(device_id, rec)

    def _rollback_if_needed(self, device_id: str, rec: DeviceRecord, out: list[Effect]) -> None:
        if self._s.state is RolloutState.ROLLED_BACK and rec.committed and not rec.rolled_back:
            rec.rolled_back = True
            out.append(Rollback(device_id, rec.previous_version))

    # the clock-driven part

    def _progress(self, now: float, out: list[Effect]) -> None:
        s = self._s
        if s.state in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED):
            self._check_timeouts(now, out)
        if s.state in (RolloutState.RUNNING, RolloutState.PAUSED) and self._final_changed:
            self._final_changed = False
            self._check_abort(now, out)
        if s.state is RolloutState.RUNNING:
            self._check_waves(now, out)
        if s.state in (RolloutState.RUNNING, RolloutState.COMPLETED):
            self._dispatch(now, out)

    def _check_timeouts(self, now: float, out: list[Effect]) -> None:
        expired = [
            d
            for d in self._in_flight
            if (rec := self._s.devices[d]).online and rec.deadline is not None and now >= rec.deadline
        ]
        for device in sorted(expired, key=lambda d: self._s.devices[d].position):
            rec = self._s.devices[device]
            out.append(MarkTimedOut(device, rec.attempt))
            self._fail(device, rec, RetryType.TIMED_OUT)

    def _check_abort(self, now: float, out: list[Effect]) -> None:
        executed = 0
        failures = dict.fromkeys(_FAILURES, 0)
        for rec in self._s.devices.values():
            if rec.final and rec.status in _EXECUTED:
                executed += 1
                if rec.status in failures:
                    failures[rec.status] += 1
        for criterion in self._doc.abort:
            kind = criterion.failure_type.value
            count = sum(failures.values()) if kind == "ALL" else failures[ExecStatus(kind)]
            if criterion.tripped(count, executed):
                reason = (
                    f"{count} of {executed} executed devices ended {kind} "
                    f"({100 * count / executed:.1f}% >= {criterion.threshold_pct:g}%)"
                )
                self._abort(now, reason, out)
                return

    def _abort(self, now: float, reason: str, out: list[Effect]) -> None:
        rollback = self._doc.on_abort == "rollback"
        self._stop(now, Trigger.ABORT_ROLLBACK if rollback else Trigger.ABORT, reason, out)
        rolled_back = 0
        for device in sorted(self._s.devices, key=lambda d: self._s.devices[d].position):
            rec = self._s.devices[device]
            if rec.committed and not rec.rolled_back and rollback:
                self._rollback_if_needed(device, rec, out)
                rolled_back += 1
        out.append(Aborted(reason, rolled_back))

    def _stop(self, now: float, trigger: Trigger, reason: str, out: list[Effect]) -> None:
        s = self._s
        self._move(trigger)
        s.reason, s.finished_at, s.pause_by_gate = reason, now, False
        for device in sorted(self._in_flight, key=lambda d: s.devices[d].position):
            rec = s.devices[device]
            rec.canceled = True
            out.append(CancelDevice(device, reason))
        for device in self._due:
            rec = s.devices[device]
            rec.due, rec.canceled = False, True
        self._due.clear()
        self._in_flight.clear()

    def _check_waves(self, now: float, out: list[Effect]) -> None:
        s = self._s
        while s.state is RolloutState.RUNNING and s.wave < len(s.waves):
            wave = s.waves[s.wave]
            if wave.state is WaveState.WAITING:
                self._activate(wave, now, out)
            verdict = self._judge(wave, now)
            if verdict is None:
                return
            if verdict != "pass":
                self._wave_failed(wave, now, verdict, out)
                return
            wave.state, wave.ended_at = WaveState.PASSED, now
            out.append(WaveCompleted(wave.index))
            if s.wave + 1 == len(s.waves):
                self._move(Trigger.COMPLETE)
                s.finished_at, s.reason = now, None
                out.append(Completed())
                return
            s.wave += 1

    def _activate(self, wave: WaveRecord, now: float, out: list[Effect]) -> None:
        wave.state = WaveState.SHADOW if self._doc.shadow is not None else WaveState.ACTIVE
        wave.activated_at = now
        if wave.state is WaveState.ACTIVE and any(self._s.devices[d].attempt > 0 for d in wave.devices):
            wave.started_at = now  # some devices reported before their wave; soak from here
        for device in wave.devices:
            rec = self._s.devices[device]
            if rec.attempt == 0 and not rec.final and not rec.canceled:
                rec.due = True
                self._due.add(device)
        out.append(WaveStarted(wave.index, len(wave.devices)))

    def _considered(self, wave: WaveRecord) -> list[str]:
        """The wave's devices its success share is judged on: notified and not out of scope."""
        out_of_scope = (ExecStatus.INCOMPATIBLE, ExecStatus.CANCELED)
        return [
            d for d in wave.devices if (r := self._s.devices[d]).attempt > 0 and r.status not in out_of_scope
        ]

    def _judge(self, wave: WaveRecord, now: float) -> str | None:
        """'pass', a failure reason, or None while the wave must keep going."""
        if wave.accepted or not wave.devices:
            return "pass"
        if wave.state is WaveState.SHADOW:
            return self._judge_shadow(wave)
        condition = self._doc.waves[wave.index].success
        considered = self._considered(wave)
        if not considered:
            waiting = any(
                self._s.devices[d].attempt == 0 and not self._s.devices[d].canceled for d in wave.devices
            )
            return None if waiting else "pass"
        succeeded = sum(1 for d in considered if self._s.devices[d].status is ExecStatus.SUCCEEDED)
        share_met = succeeded * 100 >= condition.min_succeeded_pct * len(considered)
        settled = all(self._s.devices[d].final for d in considered)
        gate = self._kpi_gate(wave)
        if gate is not None and gate != "pass":
            return gate
        if not share_met:
            if settled:
                return (
                    f"only {succeeded} of {len(considered)} notified devices succeeded "
                    f"(< {condition.min_succeeded_pct:g}%)"
                )
            return None
        if wave.index == len(self._s.waves) - 1 and not settled:
            return None  # the rollout completes only when its notified devices have all finished
        if any(self._s.devices[d].online for d in wave.devices if d in self._due):
            return None  # held by the window: judge the wave once everyone reachable has it
        soaked = (
            wave.started_at is not None and now >= wave.started_at + self._doc.waves[wave.index].min_soak_s
        )
        return "pass" if soaked and gate == "pass" else None

    def _judge_shadow(self, wave: WaveRecord) -> str | None:
        shadow = self._doc.shadow
        assert shadow is not None
        samples = sum(self._s.devices[d].shadow_samples for d in wave.devices)
        agreed = sum(self._s.devices[d].shadow_agreed for d in wave.devices)
        if samples < shadow.min_samples:
            return None
        rate = agreed / samples
        wave.kpis["shadow_agreement"] = rate
        if rate < shadow.min_agreement:
            return f"shadow agreement {rate:.3f} < {shadow.min_agreement:g} over {samples} samples"
        # Agreement is good enough: switch the wave's devices to the candidate for real.
        wave.state, wave.started_at = WaveState.ACTIVE, None
        for device in wave.devices:
            rec = self._s.devices[device]
            if rec.attempt == 0 and not rec.final and not rec.canceled:
                rec.due = True
                self._due.add(device)
        return None

    def _kpi_gate(self, wave: WaveRecord) -> str | None:
        """'pass', None while undecided, or why the candidate's KPIs are worse than allowed."""
        condition = self._doc.waves[wave.index].success
        if not condition.has_kpi_gate:
            return "pass"
        recs = [self._s.devices[d] for d in wave.devices]
        committed = [r for r in recs if r.committed]
        paired = [r for r in committed if r.baseline.inferences > 0]
        base = KpiTotals().merged(r.baseline for r in paired)
        cand = KpiTotals().merged(r.candidate for r in paired)
        wave.kpis.update(
            {k: v for k, v in self._figures(base, cand).items() if v is not None}  # shown while soaking
        )
        if base.inferences < condition.min_samples:
            # The "before" cannot grow once every device has switched or settled: judge without it.
            if all(r.committed or r.final or r.canceled for r in recs if r.attempt > 0) and all(
                r.attempt > 0 for r in recs
            ):
                all_cand = KpiTotals().merged(r.candidate for r in committed)
                if all_cand.inferences >= condition.min_samples:
                    wave.gate, wave.gate_detail = "no_baseline", "too few figures from the previous model"
                    return "pass"
            return None
        if cand.inferences < condition.min_samples:
            return None
        figures = self._figures(base, cand)
        problems = []
        ratio = figures["p95_ratio"]
        limit = condition.max_p95_latency_ratio
        if limit is not None and ratio is not None and ratio > limit:
            problems.append(
                f"p95 latency {figures['candidate_p95_ms']:.3f} ms is {ratio:.2f}x the previous model's "
                f"{figures['baseline_p95_ms']:.3f} ms (max {condition.max_p95_latency_ratio:g}x)"
            )
        if condition.max_error_rate_ratio is not None:
            floor = condition.error_rate_floor
            cand_rate = max(cand.error_rate or 0.0, floor)
            base_rate = max(base.error_rate or 0.0, floor)
            ratio = cand_rate / base_rate if base_rate > 0 else (math.inf if cand_rate > 0 else 1.0)
            if ratio > condition.max_error_rate_ratio:
                problems.append(
                    f"error rate {cand.error_rate or 0.0:.4f} is {ratio:.2f}x the previous model's "
                    f"{base.error_rate or 0.0:.4f} (max {condition.max_error_rate_ratio:g}x)"
                )
        wave.gate = "fail" if problems else "pass"
        wave.gate_detail = "; ".join(problems) or None
        return f"KPI gate: {wave.gate_detail}" if problems else "pass"

    @staticmethod
    def _figures(base: KpiTotals, cand: KpiTotals) -> dict[str, float | None]:
        base_p95, cand_p95 = base.p95_ms, cand.p95_ms
        return {
            "baseline_p95_ms": base_p95,
            "candidate_p95_ms": cand_p95,
            "p95_ratio": cand_p95 / base_p95 if base_p95 and cand_p95 is not None else None,
            "baseline_error_rate": base.error_rate,
            "candidate_error_rate": cand.error_rate,
            "baseline_samples": float(base.inferences),
            "candidate_samples": float(cand.inferences),
        }

    def _wave_failed(self, wave: WaveRecord, now: float, reason: str, out: list[Effect]) -> None:
        out.append(WaveFailed(wave.index, reason))
        if self._doc.waves[wave.index].success.on_fail == "pause":
            s = self._s
            self._move(Trigger.WAVE_PAUSE)
            s.pause_by_gate, s.reason = True, f"wave {wave.index} failed: {reason}"
            out.append(Paused(s.reason, by_gate=True))
            return
        wave.state, wave.ended_at = WaveState.FAILED, now
        self._abort(now, f"wave {wave.index} failed: {reason}", out)

    def _dispatch(self, now: float, out: list[Effect]) -> None:
        window = self._doc.maintenance
        if not self._due or (window is not None and not window.contains(now)):
            return
        s = self._s
        ready = [d for d in self._due if s.devices[d].online]
        for device in sorted(ready, key=lambda d: s.devices[d].position):
            rec = s.devices[device]
            wave = s.waves[rec.wave]
            if wave.state is WaveState.SHADOW:
                if not rec.shadow_notified:
                    rec.shadow_notified, rec.due = True, False
                    self._due.discard(device)
                    out.append(Notify(device, 0, rec.wave, shadow=True))
                    if wave.started_at is None:
                        wave.started_at = now
                continue
            self._mark_notified(rec, device, now)
            out.append(Notify(device, rec.attempt, rec.wave))
