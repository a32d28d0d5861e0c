"""What the rollout controller takes in (events) and gives out (effects): plain frozen dataclasses.

Every event carries ``now``, the Unix time the service saw it, because the controller never reads a
clock. Effects are instructions for ``fleetbus serve``, returned in the order they must be carried out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from schemas.messages import ExecStatus, Health

# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the rollout: the first wave starts. Idempotent."""

    now: float


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A device's execution status, from its ``state`` message."""

    now: float
    device_id: str
    status: ExecStatus
    version_number: int
    rollout_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class KpiSample:
    """Inference figures from a device's ``health``: counts since the last sample and a p95 (ms)."""

    now: float
    device_id: str
    model_version: str | None
    inferences: int
    errors: int = 0
    p95_ms: float | None = None


_EXECUTION_SUFFIX = re.compile(r"^(?P<base>[^:]+):(?:r(?P<attempt>[1-9][0-9]?)|(?P<shadow>shadow))$")


def execution_id(rollout_id: str, attempt: int, shadow: bool = False) -> str:
    """The rollout id to put in the manifest of one Notify.

    A device ignores a deploy whose rollout id it has already handled, so a retry and the real deploy
    after a shadow run need ids of their own: attempt 1 is the rollout id itself, attempt n > 1 is
    ``{id}:r{n}`` and the shadow run is ``{id}:shadow``. Devices echo it in their ``state``; the
    controller maps it back and ignores reports from attempts that are over.
    """
    if shadow:
        return f"{rollout_id}:shadow"
    return rollout_id if attempt <= 1 else f"{rollout_id}:r{attempt}"


def parse_execution_id(value: str) -> tuple[str, int, bool]:
    """``(rollout id, attempt, shadow)`` from an id made by ``execution_id`` (attempt 0 for shadow)."""
    match = _EXECUTION_SUFFIX.match(value)
    if match is None:
        return value, 1, False
    if match["shadow"]:
        return match["base"], 0, True
    return match["base"], int(match["attempt"]), False


def kpi_sample_from_health(previous: Health | None, current: Health, now: float) -> KpiSample | None:
    """The KpiSample between two health messages of one device, or None when there is no clean one.

    ``health`` carries cumulative counters; the sample is their difference. The first health seen
    only sets the base, and an interval in which the active model changed is dropped, so that no
    figure is credited to the wrong version. Counters that went down mean the agent restarted: the
    new counts are the interval's.
    """
    if previous is None or previous.model_version != current.model_version:
        return None
    inferences = current.inference_count - previous.inference_count
    errors = current.error_count - previous.error_count
    if inferences < 0 or errors < 0:
        inferences, errors = current.inference_count, current.error_count
    if inferences <= 0:
        return None
    return KpiSample(
        now, current.device_id, current.model_version, inferences, errors, current.latency_p95_ms
    )


@dataclass(frozen=True, slots=True)
class ShadowSample:
    """A device's candidate/active agreement since its last ``shadow`` message."""

    now: float
    device_id: str
    samples: int
    agreed: int


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """A device's birth."""

    now: float
    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """A device's (non-stale) death."""

    now: float
    device_id: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; timeouts, soaks and the maintenance window are judged at ``now``."""

    now: float


@dataclass(frozen=True, slots=True)
class Command:
    """An operator's pause, resume or cancel (``RolloutControl``)."""

    now: float
    action: Literal["pause", "resume", "cancel"]
    by: str | None = None
    reason: str | None = None


Event = Start | StatusUpdate | KpiSample | ShadowSample | DeviceOnline | DeviceOffline | Tick | Command


# --- effects --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notify:
    """Publish the rollout's deploy to the device (``attempt`` > 1 is a retry; shadow: run beside)."""

    device_id: str
    attempt: int
    wave: int
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class CancelDevice:
    """Send the device a ``cancel`` for this rollout and clear its retained deploy."""

    device_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class MarkTimedOut:
    """The controller timed the device's attempt out; record TIMED_OUT for it."""

    device_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Rollback:
    """Publish a signed rollback deploy to ``to_version`` (the model the device ran before)."""

    device_id: str
    to_version: str | None


@dataclass(frozen=True, slots=True)
class WaveStarted:
    """A wave began (its online devices are notified in the same effect list)."""

    wave: int
    devices: int


@dataclass(frozen=True, slots=True)
class WaveCompleted:
    """A wave met its conditions."""

    wave: int


@dataclass(frozen=True, slots=True)
class WaveFailed:
    """A wave's KPI gate failed or its success share became unreachable."""

    wave: int
    reason: str


@dataclass(frozen=True, slots=True)
class Paused:
    """The rollout stopped notifying; ``by_gate`` when a failed wave paused it."""

    reason: str
    by_gate: bool = False


@dataclass(frozen=True, slots=True)
class Resumed:
    """The rollout notifies again."""

    by: str | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """Every wave passed."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """An abort criterion tripped or a wave failed; ``rolled_back`` devices got a Rollback."""

    reason: str
    rolled_back: int = 0


@dataclass(frozen=True, slots=True)
class Canceled:
    """The operator canceled the rollout."""

    reason: str


@dataclass(frozen=True, slots=True)
class CommandRefused:
    """An operator command that makes no sense in the rollout's state."""

    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something a device reported that the rollout cannot account for."""

    device_id: str
    reason: str


Effect = (
    Notify
    | CancelDevice
    | MarkTimedOut
    | Rollback
    | WaveStarted
    | WaveCompleted
    | WaveFailed
    | Paused
    | Resumed
    | Completed
    | Aborted
    | Canceled
    | CommandRefused
    | Anomaly
)
