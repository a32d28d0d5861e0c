"""The rollout controller, driven directly by events with explicit timestamps (no network, no clock)."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher.controller import (
    TRANSITIONS,
    Aborted,
    Anomaly,
    CancelDevice,
    Canceled,
    Command,
    CommandRefused,
    Completed,
    Controller,
    DeviceOffline,
    DeviceOnline,
    Effect,
    KpiSample,
    MarkTimedOut,
    Notify,
    Paused,
    Resumed,
    Rollback,
    RolloutState,
    ShadowSample,
    Start,
    StatusUpdate,
    Tick,
    Trigger,
    WaveCompleted,
    WaveFailed,
    WaveStarted,
)
from publisher.document import (
    AbortCriterion,
    FailureType,
    MaintenanceWindow,
    RetryType,
    RolloutDocument,
    ShadowConfig,
    SuccessCondition,
    Wave,
)
from publisher.errors import RolloutError
from publisher.rollout_events import execution_id, kpi_sample_from_health, parse_execution_id
from publisher.waves import DeviceInfo, KpiFigures
from schemas import codec
from schemas.messages import ExecStatus, Health
from tests.publisher.rollout_helpers import Reporter, controller, document, fleet, make_plan, notified

S, F, R, T = ExecStatus.SUCCEEDED, ExecStatus.FAILED, ExecStatus.REJECTED, ExecStatus.TIMED_OUT
CANARY_THEN_ALL = [Wave(percent=10, min_soak_s=60), Wave(percent=100)]


def started(ctl: Controller, now: float = 0.0) -> list[str]:
    return notified(ctl.handle(Start(now)))


# --- waves ----------------------------------------------------------------------------------------


def test_start_notifies_only_the_first_wave() -> None:
    """Start announces wave 0 and notifies exactly its devices, in plan order."""
    doc = document(waves=CANARY_THEN_ALL)
    plan = make_plan(doc, fleet(20))
    ctl = Controller.from_plan(doc, plan)
    effects = ctl.handle(Start(0))
    assert effects[0] == WaveStarted(0, 2)
    assert notified(effects) == list(plan.waves[0].devices)
    assert all(e.attempt == 1 for e in effects if isinstance(e, Notify))
    assert ctl.rollout_state is RolloutState.RUNNING


def test_start_is_idempotent() -> None:
    """A second Start (a service replaying its log) notifies nobody again."""
    ctl = controller(document(), fleet(3))
    assert len(started(ctl)) == 3
    assert ctl.handle(Start(1)) == []


def test_next_wave_waits_for_soak_and_success() -> None:
    """Wave 1 starts only once wave 0 has soaked min_soak_s AND met its success share."""
    ctl = controller(document(waves=CANARY_THEN_ALL), fleet(20))
    report = Reporter(ctl)
    canary = started(ctl, 0)
    assert ctl.handle(Tick(100)) == []  # soaked but nothing succeeded yet
    effects = report.all(canary, S, 10)
    assert notified(effects) == []  # succeeded but not soaked
    assert ctl.handle(Tick(59.9)) == []
    effects = ctl.handle(Tick(60))
    assert effects[:2] == [WaveCompleted(0), WaveStarted(1, 18)]
    assert len(notified(effects)) == 18


def test_soak_counts_from_the_first_notification() -> None:
    """The soak clock starts when the wave's first device is notified, not when the wave is planned."""
    ctl = controller(
        document(waves=CANARY_THEN_ALL, maintenance=MaintenanceWindow(start="01:00", end="02:00")), fleet(20)
    )
    assert started(ctl, 0) == []  # 00:00 UTC is outside the window
    canary = notified(ctl.handle(Tick(3600)))
    assert len(canary) == 2
    Reporter(ctl).all(canary, S, 3601)
    assert ctl.handle(Tick(3600 + 59)) == []
    assert WaveCompleted(0) in ctl.handle(Tick(3660))


def test_rollout_completes_after_the_last_wave() -> None:
    """When the last wave passes the rollout is COMPLETED and says so once."""
    ctl = controller(document(), fleet(4))
    devices = started(ctl)
    effects = Reporter(ctl).all(devices, S, 5)
    assert effects.count(Completed()) == 1
    assert ctl.rollout_state is RolloutState.COMPLETED
    assert ctl.outstanding == 0


def test_wave_below_success_share_fails_when_settled() -> None:
    """A wave whose settled devices fall short of min_succeeded_pct fails and aborts (on_fail=abort)."""
    doc = document(
        waves=[Wave(percent=50, success=SuccessCondition(min_succeeded_pct=100)), Wave(percent=100)]
    )
    ctl = controller(doc, fleet(4))
    report = Reporter(ctl)
    first, second = started(ctl)
    assert report(first, S, 1) == []
    effects = report(second, F, 2)
    assert isinstance(effects[0], WaveFailed)
    assert isinstance(effects[-1], Aborted)
    assert ctl.rollout_state is RolloutState.ABORTED


# --- abort criteria -------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "aborted"), [(1, False), (2, True)])
def test_threshold_trips_at_exactly_the_configured_share(failures: int, aborted: bool) -> None:
    """10 % with 20 executed: 2 failures abort, 1 does not."""
    doc = document(
        abort=[AbortCriterion(failure_type=FailureType.ALL, threshold_pct=10, min_executed=20)],
        waves=[Wave(percent=100, success=SuccessCondition(min_succeeded_pct=0))],
    )
    ctl = controller(doc, fleet(20))
    report = Reporter(ctl)
    devices = started(ctl)
    effects = report.all(devices[:failures], F, 1) + report.all(devices[failures:], S, 2)
    assert any(isinstance(e, Aborted) for e in effects) is aborted
    assert ctl.rollout_state is (RolloutState.ABORTED if aborted else RolloutState.COMPLETED)


def test_min_executed_holds_the_criterion_back() -> None:
    """A first failure is 100 % of 1 executed, yet nothing trips until min_executed devices finished."""
    doc = document(
        abort=[AbortCriterion(threshold_pct=20, min_executed=5)],
        waves=[Wave(percent=100, success=SuccessCondition(min_succeeded_pct=0))],
    )
    ctl = controller(doc, fleet(10))
    report = Reporter(ctl)
    devices = started(ctl)
    assert report(devices[0], F, 1) == []
    assert report.all(devices[1:4], S, 2) == []  # 1 of 4 executed
    effects = report(devices[4], S, 3)  # 1 of 5 = 20 %
    assert isinstance(effects[-1], Aborted)
    assert "1 of 5" in effects[-1].reason


def test_criterion_counts_only_its_failure_type() -> None:
    """A REJECTED criterion ignores FAILED devices; ALL counts every failure type."""
    doc = document(
        abort=[AbortCriterion(failure_type=FailureType.REJECTED, threshold_pct=50, min_executed=2)],
        waves=[Wave(percent=100, success=SuccessCondition(min_succeeded_pct=0))],
    )
    ctl = controller(doc, fleet(4))
    report = Reporter(ctl)
    a, b, c, d = started(ctl)
    report.all([a, b], F, 1)
    assert ctl.rollout_state is RolloutState.RUNNING
    effects = report(c, R, 2) + report(d, R, 3)  # 2 rejected of 4 executed = 50 %
    assert isinstance(effects[-1], Aborted)


def test_abort_cancels_devices_in_flight_and_stops_notifying() -> None:
    """On abort every device still executing gets a CancelDevice and no later wave starts."""
    doc = document(waves=CANARY_THEN_ALL, abort=[AbortCriterion(threshold_pct=50, min_executed=1)])
    ctl = controller(doc, fleet(20))
    report = Reporter(ctl)
    first, second = started(ctl)
    effects = report(first, F, 1)
    assert CancelDevice(second, effects[-1].reason) in effects  # type: ignore[union-attr]
    assert ctl.rollout_state is RolloutState.ABORTED
    assert notified(ctl.handle(Tick(1000))) == []
    assert notified(ctl.handle(DeviceOnline(1001, second))) == []


# --- timeouts and retries -------------------------------------------------------------------------


def test_in_progress_timeout_marks_timed_out() -> None:
    """A device silent for in_progress_timeout_s after its notification is TIMED_OUT, once."""
    ctl = controller(document(in_progress_timeout_s=30), fleet(1))
    (device,) = started(ctl, 100)
    Reporter(ctl)(device, ExecStatus.IN_PROGRESS, 110)
    assert ctl.handle(Tick(129.9)) == []
    effects = ctl.handle(Tick(130))
    assert effects[0] == MarkTimedOut(device, 1)
    assert ctl.device_state(device) == "TIMED_OUT"
    assert not any(isinstance(e, MarkTimedOut) for e in ctl.handle(Tick(1000)))


def test_timeout_clock_stops_while_offline() -> None:
    """An offline device is not timed out; it gets a full timeout again when it comes back."""
    ctl = controller(document(in_progress_timeout_s=30), fleet(1))
    (device,) = started(ctl, 0)
    ctl.handle(DeviceOffline(5, device))
    assert ctl.handle(Tick(500)) == []
    ctl.handle(DeviceOnline(600, device))
    assert ctl.handle(Tick(629)) == []
    assert ctl.handle(Tick(630))[0] == MarkTimedOut(device, 1)


def test_retries_renotify_up_to_the_configured_count() -> None:
    """retries FAILED=2: two re-notifications (attempts 2 and 3), then the failure is final."""
    ctl = controller(document(retries={RetryType.FAILED: 2}), fleet(1))
    report = Reporter(ctl)
    (device,) = started(ctl)
    assert report(device, F, 1) == [Notify(device, 2, 0)]
    assert ctl.device_state(device) == "NOTIFIED"
    assert report(device, F, 2) == [Notify(device, 3, 0)]
    effects = report(device, F, 3)
    assert not any(isinstance(e, Notify) for e in effects)
    assert ctl.device_state(device) == "FAILED"
    assert ctl.state.devices[device].final


def test_a_retry_that_succeeds_counts_as_success() -> None:
    """A device that fails once and then succeeds is one success, never an executed failure."""
    doc = document(retries={"timed_out": 1}, abort=[AbortCriterion(threshold_pct=1, min_executed=1)])
    ctl = controller(doc, fleet(1))
    (device,) = started(ctl, 0)
    effects = ctl.handle(Tick(600))
    assert effects == [MarkTimedOut(device, 1), Notify(device, 2, 0)]
    assert Completed() in Reporter(ctl)(device, S, 601)


def test_failures_without_retries_are_final() -> None:
    """Retries are per failure type: FAILED retries do not apply to REJECTED."""
    ctl = controller(document(retries={"FAILED": 3}), fleet(1))
    (device,) = started(ctl)
    assert notified(Reporter(ctl)(device, R, 1)) == []
    assert ctl.state.devices[device].final


def test_retries_wait_while_paused() -> None:
    """A retry due while the rollout is paused is sent on resume, once."""
    ctl = controller(document(retries={"FAILED": 1}), fleet(2))
    a, _b = started(ctl)
    ctl.handle(Command(1, "pause"))
    assert notified(Reporter(ctl)(a, F, 2)) == []
    effects = ctl.handle(Command(3, "resume"))
    assert effects == [Resumed(None), Notify(a, 2, 0)]
    assert notified(ctl.handle(Tick(4))) == []


# --- status hygiene -------------------------------------------------------------------------------


def test_stale_and_replayed_statuses_are_ignored() -> None:
    """A version_number not above the last one seen changes nothing."""
    ctl = controller(document(), fleet(2))
    a, _ = started(ctl)
    ctl.handle(StatusUpdate(1, a, ExecStatus.IN_PROGRESS, 5))
    assert ctl.handle(StatusUpdate(2, a, F, 5)) == []
    assert ctl.handle(StatusUpdate(2, a, F, 4)) == []
    assert ctl.device_state(a) == "IN_PROGRESS"


def test_status_from_a_device_outside_the_rollout_is_an_anomaly() -> None:
    """Unknown devices, skipped devices and other rollouts' statuses become Anomaly records."""
    devices = fleet(3)
    devices["d02"] = DeviceInfo(groups=frozenset({"g"}), ops=frozenset({"ADD"}))
    doc = document()
    from publisher.waves import ModelNeeds, plan_rollout

    ctl = Controller.from_plan(
        doc, plan_rollout(doc, devices, ModelNeeds(ops=frozenset({"CONV_2D"})), check_file=False)
    )
    started(ctl)
    stranger = ctl.handle(StatusUpdate(1, "intruder", S, 1))
    skipped = ctl.handle(StatusUpdate(1, "d02", S, 1))
    other = ctl.handle(StatusUpdate(1, "d00", S, 1, rollout_id="someone-else"))
    assert stranger == [Anomaly("intruder", "not part of this rollout")]
    assert isinstance(skipped[0], Anomaly)
    assert "INCOMPATIBLE" in skipped[0].reason
    assert isinstance(other[0], Anomaly)
    assert ctl.state.anomaly_count == 3
    assert ctl.status(2).anomalies == 3


def test_device_reporting_incompatible_is_not_a_failure() -> None:
    """INCOMPATIBLE from a device leaves the success share and the abort criteria alone."""
    doc = document(abort=[AbortCriterion(threshold_pct=1, min_executed=1)])
    ctl = controller(doc, fleet(2))
    report = Reporter(ctl)
    a, b = started(ctl)
    report(a, ExecStatus.INCOMPATIBLE, 1)
    assert Completed() in report(b, S, 2)


# --- pause, resume, cancel ------------------------------------------------------------------------


def test_pause_holds_new_waves_and_resume_releases_them() -> None:
    """While paused no wave starts and nobody is notified; resume starts the due wave."""
    ctl = controller(document(waves=CANARY_THEN_ALL), fleet(20))
    report = Reporter(ctl)
    canary = started(ctl)
    assert ctl.handle(Command(1, "pause", by="ana")) == [Paused("paused by ana")]
    report.all(canary, S, 2)  # statuses are still taken in while paused
    assert ctl.handle(Tick(500)) == []
    assert ctl.state.wave == 0
    effects = ctl.handle(Command(501, "resume", by="ana"))
    assert effects[:3] == [Resumed("ana"), WaveCompleted(0), WaveStarted(1, 18)]
    assert len(notified(effects)) == 18


def test_commands_that_make_no_sense_are_refused() -> None:
    """Resume of a running rollout, pause of a paused one and cancel of a finished one are refused."""
    ctl = controller(document(), fleet(1))
    started(ctl)
    assert isinstance(ctl.handle(Command(1, "resume"))[0], CommandRefused)
    ctl.handle(Command(2, "pause"))
    assert isinstance(ctl.handle(Command(3, "pause"))[0], CommandRefused)
    ctl.handle(Command(4, "cancel"))
    assert isinstance(ctl.handle(Command(5, "cancel"))[0], CommandRefused)


def test_cancel_stops_the_rollout_and_cancels_devices_in_flight() -> None:
    """Cancel sends CancelDevice to executing devices, keeps finished ones, and notifies nobody after."""
    ctl = controller(document(), fleet(3, offline=["d01"]))
    report = Reporter(ctl)
    first, second = started(ctl)
    report(first, S, 1)
    effects = ctl.handle(Command(2, "cancel", reason="wrong model"))
    assert effects == [CancelDevice(second, "wrong model"), Canceled("wrong model")]
    assert ctl.rollout_state is RolloutState.CANCELED
    assert ctl.handle(DeviceOnline(3, "d01")) == []
    assert ctl.device_state("d01") == "CANCELED"


# --- rollback -------------------------------------------------------------------------------------


def test_abort_with_rollback_rolls_back_every_committed_device() -> None:
    """on_abort=rollback: each device that SUCCEEDED gets a Rollback to its previous version."""
    doc = document(
        waves=[Wave(percent=50), Wave(percent=100, success=SuccessCondition(min_succeeded_pct=0))],
        abort=[AbortCriterion(threshold_pct=25, min_executed=8)],
        on_abort="rollback",
    )
    ctl = controller(doc, fleet(10, version="1.4"))
    report = Reporter(ctl)
    wave0 = started(ctl)
    effects = report.all(wave0, S, 1)
    wave1 = notified(effects)
    assert len(wave1) == 5
    effects = report.all(wave1[:2], F, 2) + report(wave1[2], S, 3)  # 2 of 8 executed = 25 %
    rollbacks = [e for e in effects if isinstance(e, Rollback)]
    assert {r.device_id for r in rollbacks} == {*wave0, wave1[2]}
    assert {r.to_version for r in rollbacks} == {"1.4"}
    assert effects[-1] == Aborted(effects[-1].reason, rolled_back=6)  # type: ignore[union-attr]
    cancels = [e.device_id for e in effects if isinstance(e, CancelDevice)]
    assert cancels == wave1[3:]
    assert ctl.rollout_state is RolloutState.ROLLED_BACK
    # A canceled device that had committed before the cancel reached it is rolled back too.
    assert report(wave1[3], S, 4) == [Rollback(wave1[3], "1.4")]


def test_abort_with_stop_rolls_nothing_back() -> None:
    """on_abort=stop leaves committed devices on the new model."""
    doc = document(abort=[AbortCriterion(threshold_pct=50, min_executed=2)])
    ctl = controller(doc, fleet(2))
    report = Reporter(ctl)
    a, b = started(ctl)
    effects = report(a, S, 1) + report(b, F, 2)
    assert not any(isinstance(e, Rollback) for e in effects)
    assert ctl.rollout_state is RolloutState.ABORTED


# --- KPI gate -------------------------------------------------------------------------------------


OnFail = Literal["abort", "pause"]


def _kpi_doc(on_fail: OnFail = "abort") -> RolloutDocument:
    gate = SuccessCondition(
        max_p95_latency_ratio=1.2, max_error_rate_ratio=2.0, min_samples=100, on_fail=on_fail
    )
    return document(waves=[Wave(percent=50, success=gate), Wave(percent=100)])


def _run_wave0_with_latency(
    candidate_p95: float, candidate_errors: int = 0, on_fail: OnFail = "abort"
) -> tuple[Controller, list[Effect]]:
    doc = _kpi_doc(on_fail)
    ctl = controller(doc, fleet(4))
    report = Reporter(ctl)
    wave0 = started(ctl, 0)
    effects: list[Effect] = []
    for device in wave0:  # the previous model's figures, before the switch
        ctl.handle(KpiSample(1, device, "1", inferences=100, errors=1, p95_ms=10.0))
    effects += report.all(wave0, S, 2)
    for device in wave0:
        effects += ctl.handle(
            KpiSample(3, device, "2", inferences=100, errors=candidate_errors, p95_ms=candidate_p95)
        )
    return ctl, effects


def test_kpi_gate_stops_a_wave_whose_model_is_slower() -> None:
    """A candidate with 1.5x the previous p95 on the same devices fails the 1.2x gate and aborts."""
    ctl, effects = _run_wave0_with_latency(15.0)
    failed = [e for e in effects if isinstance(e, WaveFailed)]
    assert len(failed) == 1
    assert "p95 latency" in failed[0].reason
    assert "1.50x" in failed[0].reason
    assert ctl.rollout_state is RolloutState.ABORTED
    assert not any(isinstance(e, WaveStarted) and e.wave == 1 for e in effects)
    assert ctl.state.waves[0].kpis["p95_ratio"] == pytest.approx(1.5)


def test_kpi_gate_passes_a_model_as_fast_as_the_last() -> None:
    """A candidate within the ratios lets the next wave start."""
    ctl, effects = _run_wave0_with_latency(11.0)
    assert WaveStarted(1, 2) in effects
    assert ctl.state.waves[0].gate == "pass"


def test_kpi_gate_stops_a_wave_whose_error_rate_grew() -> None:
    """5 % errors against 1 % before is 5x, over the 2x limit."""
    ctl, effects = _run_wave0_with_latency(10.0, candidate_errors=5)
    failed = [e for e in effects if isinstance(e, WaveFailed)]
    assert failed
    assert "error rate" in failed[0].reason
    assert ctl.rollout_state is RolloutState.ABORTED


def test_kpi_gate_waits_for_min_samples() -> None:
    """Fewer than min_samples candidate inferences leave the wave undecided."""
    ctl = controller(_kpi_doc(), fleet(4))
    wave0 = started(ctl, 0)
    for device in wave0:
        ctl.handle(KpiSample(1, device, "1", inferences=100, p95_ms=10.0))
    Reporter(ctl).all(wave0, S, 2)
    effects = ctl.handle(KpiSample(3, wave0[0], "2", inferences=50, p95_ms=50.0))
    assert effects == []
    assert ctl.rollout_state is RolloutState.RUNNING


def test_kpi_gate_can_pause_and_resume_accepts_the_wave() -> None:
    """on_fail=pause: a failed gate pauses; the operator's resume is the sign-off that starts wave 1."""
    ctl, effects = _run_wave0_with_latency(15.0, on_fail="pause")
    assert any(isinstance(e, Paused) and e.by_gate for e in effects)
    assert ctl.rollout_state is RolloutState.PAUSED
    effects2 = ctl.handle(Command(10, "resume", by="ana"))
    assert WaveStarted(1, 2) in effects2


def test_kpi_gate_uses_baselines_from_the_plan() -> None:
    """Figures the planner knew before the rollout serve as the previous model's."""
    devices = {
        d: DeviceInfo(groups=frozenset({"g"}), model_version="1", baseline=KpiFigures(1000, 0, 10.0))
        for d in fleet(2)
    }
    doc = document(
        waves=[Wave(percent=100, success=SuccessCondition(max_p95_latency_ratio=1.1, min_samples=10))]
    )
    ctl = controller(doc, devices)
    devs = started(ctl)
    Reporter(ctl).all(devs, S, 1)
    effects = ctl.handle(KpiSample(2, devs[0], "2", inferences=10, p95_ms=20.0))
    assert isinstance(effects[0], WaveFailed)


# --- offline devices, maintenance window, shadow --------------------------------------------------


def test_offline_devices_are_notified_when_they_come_back() -> None:
    """A deferred device is notified on its birth, even after the rollout completed."""
    ctl = controller(document(), fleet(3, offline=["d02"]))
    report = Reporter(ctl)
    devices = started(ctl)
    assert "d02" not in devices
    assert ctl.device_state("d02") == "DEFERRED"
    assert Completed() in report.all(devices, S, 1)
    assert ctl.outstanding == 1
    assert ctl.handle(DeviceOnline(50, "d02")) == [Notify("d02", 1, 0)]
    report("d02", S, 51)
    assert ctl.outstanding == 0


def test_maintenance_window_holds_notifications() -> None:
    """Nothing is notified outside the daily window; the first tick inside it notifies."""
    window = MaintenanceWindow(start="22:00", end="02:00")
    ctl = controller(document(maintenance=window), fleet(2))
    noon, late = 12 * 3600.0, 23 * 3600.0
    assert started(ctl, noon) == []
    assert ctl.handle(Tick(noon + 60)) == []
    assert len(notified(ctl.handle(Tick(late)))) == 2


def test_shadow_phase_switches_only_on_agreement() -> None:
    """With shadow on, a wave runs the candidate beside the active model and switches when they agree."""
    ctl = controller(document(shadow=ShadowConfig(min_samples=100, min_agreement=0.95)), fleet(2))
    effects = ctl.handle(Start(0))
    shadows = [e for e in effects if isinstance(e, Notify)]
    assert all(e.shadow and e.attempt == 0 for e in shadows)
    assert len(shadows) == 2
    Reporter(ctl)(shadows[0].device_id, S, 1)  # the shadow run's own status is not a commit
    assert ctl.handle(ShadowSample(2, shadows[0].device_id, samples=60, agreed=59)) == []
    effects = ctl.handle(ShadowSample(3, shadows[1].device_id, samples=60, agreed=58))
    assert sorted(notified(effects)) == sorted(e.device_id for e in shadows)
    assert ctl.status(4).waves[0].shadow_agreement == pytest.approx(117 / 120)


def test_shadow_disagreement_fails_the_wave() -> None:
    """Agreement under min_agreement fails the wave before any device switches."""
    ctl = controller(document(shadow=ShadowConfig(min_samples=10, min_agreement=0.99)), fleet(1))
    ctl.handle(Start(0))
    effects = ctl.handle(ShadowSample(1, "d00", samples=10, agreed=5))
    assert isinstance(effects[0], WaveFailed)
    assert "shadow agreement" in effects[0].reason
    assert notified(effects) == []


# --- persistence ----------------------------------------------------------------------------------


def test_restart_mid_rollout_does_not_renotify_finished_devices() -> None:
    """Saved mid-wave through JSON and restored, the controller notifies only devices it never notified."""
    doc = document(waves=CANARY_THEN_ALL)
    ctl = controller(doc, fleet(20, offline=["d05"]))
    report = Reporter(ctl)
    canary = started(ctl, 0)
    report.all(canary, S, 1)
    wave1 = notified(ctl.handle(Tick(60)))
    report.all(wave1[:10], S, 61)
    report(wave1[10], ExecStatus.IN_PROGRESS, 62)
    saved = json.loads(json.dumps(ctl.to_dict()))

    restored = Controller.from_dict(saved)
    assert restored.to_dict() == saved
    assert notified(restored.handle(Tick(63))) == []
    assert restored.status(63) == ctl.status(63)
    report.ctl = restored
    report.all(wave1[10:], S, 64)
    assert restored.rollout_state is RolloutState.COMPLETED
    assert notified(restored.handle(DeviceOnline(65, "d05"))) == ["d05"]


def test_status_message_round_trips_the_codec() -> None:
    """status() is a valid rollout_status message with per-wave counts."""
    ctl = controller(document(waves=CANARY_THEN_ALL), fleet(20))
    Reporter(ctl).all(started(ctl), S, 1)
    message = ctl.status(2)
    assert codec.decode(codec.encode(message)) == message
    assert message.waves[0].states == {"SUCCEEDED": 2}
    assert message.waves[1].states == {"PENDING": 18}


# --- random event sequences -----------------------------------------------------------------------

_DEVICES = [f"d{i:02d}" for i in range(8)]
_STATUSES = list(ExecStatus)


@st.composite
def _documents(draw: st.DrawFn) -> object:
    gate = SuccessCondition(
        min_succeeded_pct=draw(st.sampled_from([0, 50, 100])),
        max_p95_latency_ratio=draw(st.sampled_from([None, 1.2])),
        min_samples=draw(st.sampled_from([1, 50])),
        on_fail=draw(st.sampled_from(["abort", "pause"])),
    )
    waves = draw(
        st.sampled_from(
            [
                [Wave(percent=100, success=gate)],
                [Wave(count=1, min_soak_s=5, success=gate), Wave(percent=50), Wave(percent=100)],
                [Wave(percent=10, success=gate), Wave(percent=100, min_soak_s=20)],
            ]
        )
    )
    return document(
        waves=waves,
        retries={k: draw(st.integers(0, 2)) for k in ("FAILED", "REJECTED", "TIMED_OUT")},
        abort=draw(st.sampled_from([[], [AbortCriterion(threshold_pct=30, min_executed=2)]])),
        on_abort=draw(st.sampled_from(["stop", "rollback"])),
        in_progress_timeout_s=draw(st.sampled_from([5.0, 50.0])),
        maintenance=draw(st.sampled_from([None, MaintenanceWindow(start="00:00", end="00:01")])),
        shadow=draw(st.sampled_from([None, ShadowConfig(min_samples=5, min_agreement=0.5)])),
    )


_device_ids = st.sampled_from([*_DEVICES, "stranger"])
_statuses = st.builds(
    lambda d, s, v, r: lambda now: StatusUpdate(now, d, s, v, rollout_id=r),
    _device_ids,
    st.sampled_from(_STATUSES),
    st.integers(0, 12),
    st.sampled_from([None, "r1", "r1:r2", "r1:r3", "r1:shadow", "other"]),
)
# Statuses and ticks are listed several times: they are most of what a real rollout sees.
_event_makers = st.one_of(
    st.builds(lambda: Start),
    _statuses,
    _statuses,
    _statuses,
    st.builds(lambda: Tick),
    st.builds(
        lambda d, v, n, e, p: lambda now: KpiSample(now, d, v, n, e, p),
        _device_ids,
        st.sampled_from([None, "1", "2"]),
        st.integers(-1, 200),
        st.integers(-1, 50),
        st.sampled_from([None, 1.0, 50.0, float("nan")]),
    ),
    st.builds(
        lambda d, n, a: lambda now: ShadowSample(now, d, n, a),
        _device_ids,
        st.integers(-1, 20),
        st.integers(-1, 20),
    ),
    st.builds(lambda d: lambda now: DeviceOnline(now, d), _device_ids),
    st.builds(lambda d: lambda now: DeviceOffline(now, d), _device_ids),
    st.builds(lambda: Tick),
    st.builds(lambda a: lambda now: Command(now, a), st.sampled_from(["pause", "resume", "cancel"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=_documents(),
    offline=st.sets(st.sampled_from(_DEVICES), max_size=3),
    steps=st.lists(st.tuples(_event_makers, st.floats(0, 40)), max_size=80),
    restart_at=st.integers(0, 60),
)
def test_random_event_sequences_keep_the_controller_sound(
    doc: object, offline: set[str], steps: list[tuple[object, float]], restart_at: int
) -> None:
    """Any event sequence: no crash, no device notified twice for one attempt, restart changes nothing."""
    ctl = controller(doc, fleet(8, offline=offline))  # type: ignore[arg-type]
    steps = [(Start, 0.0), *steps]
    twin: Controller | None = None
    notifications: set[tuple[str, int, bool]] = set()
    rolled_back: set[str] = set()
    now = 0.0
    for i, (make, gap) in enumerate(steps):
        if i == restart_at:
            twin = Controller.from_dict(json.loads(json.dumps(ctl.to_dict())))
        now += gap
        event = make(now)  # type: ignore[operator]
        stopped = ctl.rollout_state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK, RolloutState.CANCELED)
        before = {d: rec.attempt for d, rec in ctl.state.devices.items()}
        effects = ctl.handle(event)
        if twin is not None:
            assert twin.handle(event) == effects
        for effect in effects:
            if isinstance(effect, Notify):
                assert not stopped
                key = (effect.device_id, effect.attempt, effect.shadow)
                assert key not in notifications
                notifications.add(key)
                if not effect.shadow:
                    assert effect.attempt == before[effect.device_id] + 1
            if isinstance(effect, Rollback):
                assert effect.device_id not in rolled_back
                rolled_back.add(effect.device_id)
        ctl.status(now)
    retries = sum(doc.retries.values())  # type: ignore[attr-defined]
    assert all(rec.attempt <= 1 + retries for rec in ctl.state.devices.values())


def test_kpi_samples_are_differences_of_health_counters() -> None:
    """Cumulative health counters become per-interval samples; version changes and first sights give none."""
    h1 = Health(device_id="d00", inference_count=100, error_count=1, latency_p95_ms=5.0, model_version="1")
    h2 = Health(device_id="d00", inference_count=350, error_count=4, latency_p95_ms=6.0, model_version="1")
    h3 = Health(device_id="d00", inference_count=400, error_count=4, latency_p95_ms=9.0, model_version="2")
    restarted = Health(
        device_id="d00", inference_count=30, error_count=0, latency_p95_ms=9.0, model_version="2"
    )
    assert kpi_sample_from_health(None, h1, 1) is None
    assert kpi_sample_from_health(h1, h2, 2) == KpiSample(2, "d00", "1", 250, 3, 6.0)
    assert kpi_sample_from_health(h2, h3, 3) is None
    assert kpi_sample_from_health(h3, restarted, 4) == KpiSample(4, "d00", "2", 30, 0, 9.0)
    assert kpi_sample_from_health(h2, h2, 5) is None


def _controller_in(state: RolloutState) -> Controller:
    doc = document(abort=[AbortCriterion(threshold_pct=50, min_executed=1)], on_abort="stop")
    if state is RolloutState.ROLLED_BACK:
        doc = doc.model_copy(update={"on_abort": "rollback"})
    ctl = controller(doc, fleet(2))
    if state is RolloutState.PENDING:
        return ctl
    a, b = started(ctl)
    if state is RolloutState.PAUSED:
        ctl.handle(Command(1, "pause"))
    elif state is RolloutState.COMPLETED:
        Reporter(ctl).all([a, b], S, 1)
    elif state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
        Reporter(ctl)(a, F, 1)
    elif state is RolloutState.CANCELED:
        ctl.handle(Command(1, "cancel"))
    assert ctl.rollout_state is state
    return ctl


@pytest.mark.parametrize("state", list(RolloutState))
@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
def test_every_command_in_every_state_follows_the_transition_table(state: RolloutState, action: str) -> None:
    """A command moves the rollout exactly as TRANSITIONS says, or is refused and changes nothing."""
    ctl = _controller_in(state)
    before = ctl.to_dict()
    effects = ctl.handle(Command(2, action))  # type: ignore[arg-type]
    expected = TRANSITIONS.get((state, Trigger(action)))
    if expected is None:
        assert effects == [CommandRefused(action, effects[0].reason)]  # type: ignore[union-attr]
        after = ctl.to_dict()
        assert {**after, "updated_at": None} == {**before, "updated_at": None}
    else:
        assert ctl.rollout_state is expected
        assert not any(isinstance(e, CommandRefused) for e in effects)


def test_unreadable_saved_state_is_refused_clearly() -> None:
    """Corrupt or newer saved state raises RolloutError saying why, not a pydantic traceback."""
    saved = controller(document(), fleet(2)).to_dict()
    with pytest.raises(RolloutError, match="newer than this fleetbus"):
        Controller.from_dict({**saved, "format": 99})
    with pytest.raises(RolloutError, match="unreadable"):
        Controller.from_dict({**saved, "devices": {"d00": {"wave": "x"}}})


@pytest.mark.parametrize(
    ("attempt", "shadow", "expected"),
    [(1, False, "r1"), (2, False, "r1:r2"), (11, False, "r1:r11"), (0, True, "r1:shadow")],
)
def test_execution_ids_name_each_attempt_and_parse_back(attempt: int, shadow: bool, expected: str) -> None:
    """Retries and shadow runs get ids of their own (a device ignores an id it handled); they parse back."""
    assert execution_id("r1", attempt, shadow) == expected
    assert parse_execution_id(expected) == ("r1", attempt, shadow)
    assert parse_execution_id("plain.id-2") == ("plain.id-2", 1, False)


def test_reports_from_an_attempt_that_is_over_are_ignored() -> None:
    """After a retry a late FAILED from attempt 1 changes nothing; an unsent attempt's report is anomalous."""
    ctl = controller(document(retries={"FAILED": 1}), fleet(1))
    report = Reporter(ctl)
    (device,) = started(ctl)
    assert report(device, F, 1) == [Notify(device, 2, 0)]
    assert ctl.handle(StatusUpdate(2, device, F, 50, rollout_id="r1")) == []
    assert ctl.device_state(device) == "NOTIFIED"
    effects = ctl.handle(StatusUpdate(3, device, S, 51, rollout_id="r1:r3"))
    assert effects == [Anomaly(device, "reported attempt 3 of which only 2 were sent")]
    assert Completed() in ctl.handle(StatusUpdate(4, device, S, 52, rollout_id="r1:r2"))


def test_restart_from_a_save_older_than_the_last_notify_repeats_the_same_notify() -> None:
    """Crash after notifying, before saving: the restored controller sends the very same Notify again."""
    before_start = controller(document(), fleet(2)).to_dict()
    ctl = Controller.from_dict(before_start)
    first = ctl.handle(Start(0))
    assert Controller.from_dict(before_start).handle(Start(5)) == first


def test_status_from_a_device_of_a_started_wave_counts_even_if_its_notify_was_not_saved() -> None:
    """A replayed SUCCEEDED from a device the saved state had not yet notified counts as its first attempt."""
    ctl = controller(document(maintenance=MaintenanceWindow(start="01:00", end="02:00")), fleet(2))
    assert started(ctl, 0) == []  # wave 0 started, notifications held by the window
    restored = Controller.from_dict(ctl.to_dict())
    assert restored.handle(StatusUpdate(2, "d00", S, 7, rollout_id="r1")) == []
    assert restored.device_state("d00") == "SUCCEEDED"
    assert notified(restored.handle(Tick(3600))) == ["d01"]


def test_next_deadline_names_the_next_moment_a_tick_matters() -> None:
    """next_deadline gives the window's opening, then the earliest timeout or soak end."""
    doc = document(
        waves=CANARY_THEN_ALL,
        maintenance=MaintenanceWindow(start="01:00", end="02:00"),
        in_progress_timeout_s=30,
    )
    ctl = controller(doc, fleet(20))
    started(ctl, 0)
    assert ctl.next_deadline(0) == 3600
    ctl.handle(Tick(3600))
    assert ctl.next_deadline(3600) == 3630  # the canary's timeouts come before its 60 s soak
    assert MaintenanceWindow(start="01:00", end="02:00").next_open(7200) == 86400 + 3600
