"""An in-memory ``FleetView`` for the HTTP, metrics and dashboard tests.

Devices are folded by the real ``publisher.fleet.Fleet`` from real Birth / Death / State / Health
messages; rollouts are ``RolloutStatus`` messages as the controller makes them; series come from
store-shaped rollup rows through ``series_from_rollups``. Only the wiring is a stand-in for
``fleetbus serve``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from publisher.fleet import DeviceView, Fleet
from publisher.fleetview import DeviceRow, Metric, scope_devices, series_from_rollups
from schemas.messages import (
    Birth,
    Death,
    ExecStatus,
    Health,
    RolloutControl,
    RolloutStatus,
    State,
    WaveProgress,
)

MINUTES = 30  # the rollups cover the last 30 minutes before the view is made


def first_minute(now: float) -> int:
    """The start of the first rolled-up minute of a sample view made at ``now``."""
    return int(now // 60) * 60 - MINUTES * 60


@dataclass
class MemoryView:
    """A thread-safe FleetView over a Fleet, a list of rollouts, rollup rows and counters."""

    fleet: Fleet = field(default_factory=Fleet)
    rollout_list: list[RolloutStatus] = field(default_factory=list)
    rollups: list[dict[str, Any]] = field(default_factory=list)
    counter_values: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def devices(self) -> Sequence[DeviceRow]:
        with self.lock:
            return [self.fleet.devices[d] for d in sorted(self.fleet.devices)]

    def rollouts(self) -> Sequence[RolloutStatus]:
        with self.lock:
            return list(self.rollout_list)

    def series(self, metric: Metric, scope: str, since: float) -> Sequence[tuple[float, float]]:
        members = scope_devices(scope, self.devices())
        with self.lock:
            rows = list(self.rollups)
        return series_from_rollups(rows, metric, members, since)

    def counters(self) -> Mapping[str, float]:
        with self.lock:
            return dict(self.counter_values)


@dataclass
class RecordingControls:
    """A controls callback that records each command and answers like a controller would."""

    view: MemoryView
    calls: list[RolloutControl] = field(default_factory=list)
    refuse: Exception | None = None

    def __call__(self, command: RolloutControl) -> object:
        self.calls.append(command)
        if self.refuse is not None:
            raise self.refuse
        new_state = {"pause": "PAUSED", "resume": "RUNNING", "cancel": "CANCELED"}[command.action]
        with self.view.lock:
            for i, r in enumerate(self.view.rollout_list):
                if r.rollout_id == command.rollout_id:
                    self.view.rollout_list[i] = r.model_copy(update={"state": new_state})
                    return self.view.rollout_list[i]
        raise LookupError(command.rollout_id)


CAMS = [f"cam-{i:02d}" for i in range(1, 7)]
GATEWAYS = ["gw-01", "gw-02", "gw-03"]
LONER = "lab-01"
OFFLINE = "gw-03"
UPGRADED = ["cam-01", "cam-02", "cam-03"]  # waves 1 and 2 of the running rollout
OLD, NEW = "1.0.0", "1.1.0"


def _birth(device: str, groups: list[str], bdseq: int = 1) -> Birth:
    return Birth(
        device_id=device,
        bdseq=bdseq,
        groups=groups,
        agent_version="0.1.0",
        runtime="litert",
        runtime_version="2.3.0",
        model_version=OLD,
        model_sha256="a" * 64,
    )


def running_rollout() -> RolloutStatus:
    """A three-wave rollout with the canary passed and the second wave under way."""
    canary = WaveProgress(
        index=0,
        state="PASSED",
        devices=1,
        notified=1,
        states={"SUCCEEDED": 1},
        succeeded_pct=100.0,
        kpis={"p95_ms": 4.2, "error_rate": 0.0},
        gate="p95 4.2 ms <= 1.2 x 4.0 ms",
    )
    second = WaveProgress(
        index=1,
        state="ACTIVE",
        devices=2,
        notified=2,
        states={"SUCCEEDED": 1, "IN_PROGRESS": 1},
        succeeded_pct=50.0,
        shadow_agreement=0.97,
    )
    rest = WaveProgress(index=2, state="WAITING", devices=3, states={"PENDING": 3})
    return RolloutStatus(
        rollout_id="r-110",
        version=NEW,
        state="RUNNING",
        wave=1,
        devices=6,
        states={"SUCCEEDED": 2, "IN_PROGRESS": 1, "PENDING": 3},
        waves=[canary, second, rest],
    )


def aborted_rollout() -> RolloutStatus:
    """An earlier rollout that tripped its abort criterion."""
    states = {"FAILED": 2, "SUCCEEDED": 1}
    return RolloutStatus(
        rollout_id="r-109",
        version="1.0.9",
        state="ROLLED_BACK",
        reason="FAILED 34% >= 25% of 3 executed",
        devices=3,
        states=states,
        waves=[
            WaveProgress(index=0, state="FAILED", devices=3, notified=3, states=states, succeeded_pct=33.3)
        ],
    )


def sample_view(now: float | None = None) -> MemoryView:
    """Ten devices in two groups and none, one offline, three upgraded; two rollouts; 30 min of rollups."""
    # Made at call time, not import time: a long test session must not push the data out of the charts.
    now = time.time() if now is None else now
    fleet = Fleet()
    fleet.note_rollout("r-110")
    fleet.note_rollout("r-109")
    for device in CAMS:
        fleet.apply(_birth(device, ["cams"]), now - 120)
    for device in GATEWAYS:
        fleet.apply(_birth(device, ["gateways"]), now - 120)
    fleet.apply(_birth(LONER, []), now - 120)
    fleet.apply(Death(device_id=OFFLINE, bdseq=1), now - 90)
    for n, device in enumerate(UPGRADED):
        status = ExecStatus.IN_PROGRESS if device == "cam-03" else ExecStatus.SUCCEEDED
        fleet.apply(
            State(device_id=device, rollout_id="r-110", status=status, version_number=3, model_version=NEW),
            now - 30 + n,
        )
    for k, device in enumerate(sorted(fleet.devices)):
        if device == OFFLINE:
            continue
        upgraded = device in UPGRADED[:2]
        fleet.apply(
            Health(
                device_id=device,
                inference_count=1000 + 10 * k,
                error_count=k % 3,
                latency_p50_ms=2.0,
                latency_p95_ms=4.0 + k * 0.25,
                model_version=NEW if upgraded else OLD,
            ),
            now - 5,
        )
    rollups: list[dict[str, Any]] = []
    for m in range(MINUTES):
        minute = first_minute(now) + 60 * m
        for k, device in enumerate(sorted(fleet.devices)):
            rollups.append(
                {
                    "device_id": device,
                    "minute": minute,
                    "results": 60,
                    "errors": (m + k) % 4 if device.startswith("gw") else 0,
                    "batches": 60,
                    "latency_p95_ms": 4.0 + (m % 7) * 0.3 + (1.5 if device.startswith("gw") else 0.0),
                    "model_version": OLD,
                }
            )
    counters = {
        "messages_ingested": 12345.0,
        "decode_errors": 3.0,
        "denied_messages": 2.0,
        "chunk_bytes_sent": 1048576.0,
        "stale_deaths": 1.0,
    }
    return MemoryView(fleet, [running_rollout(), aborted_rollout()], rollups, counters)


def device_view(view: MemoryView, device_id: str) -> DeviceView:
    return view.fleet.devices[device_id]
