"""The rollout controller's persisted state: pydantic records that ``to_dict``/``from_dict`` round-trip.

Only ``publisher.controller`` changes them; everyone else reads them (the HTTP API, the store, tests).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from publisher.document import RolloutDocument
from schemas.messages import ExecStatus

STATE_FORMAT = 1


class RolloutState(str, enum.Enum):
    """Where the rollout as a whole stands."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in (
            RolloutState.COMPLETED,
            RolloutState.ABORTED,
            RolloutState.ROLLED_BACK,
            RolloutState.CANCELED,
        )


class WaveState(str, enum.Enum):
    """Where one wave stands; SHADOW only exists when the document asks for shadow evaluation."""

    WAITING = "WAITING"
    SHADOW = "SHADOW"
    ACTIVE = "ACTIVE"
    PASSED = "PASSED"
    FAILED = "FAILED"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KpiTotals(_Record):
    """Inference counts and an inference-weighted p95 (an approximation of the pooled p95)."""

    inferences: int = 0
    errors: int = 0
    p95_weighted_sum: float = 0.0
    p95_weight: int = 0

    def add(self, inferences: int, errors: int, p95_ms: float | None) -> None:
        inferences = max(0, inferences)
        self.inferences += inferences
        self.errors += max(0, min(errors, inferences))
        if p95_ms is not None and math.isfinite(p95_ms) and p95_ms >= 0 and inferences > 0:
            self.p95_weighted_sum += p95_ms * inferences
            self.p95_weight += inferences

    def merged(self, others: Iterable[KpiTotals]) -> KpiTotals:
        total = self.model_copy()
        for other in others:
            total.inferences += other.inferences
            total.errors += other.errors
            total.p95_weighted_sum += other.p95_weighted_sum
            total.p95_weight += other.p95_weight
        return total

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    @property
    def p95_ms(self) -> float | None:
        return self.p95_weighted_sum / self.p95_weight if self.p95_weight else None


class DeviceRecord(_Record):
    """One device's execution of this rollout."""

    wave: int
    position: int
    online: bool = True
    previous_version: str | None = None
    status: ExecStatus | None = None
    attempt: int = 0
    notified_at: float | None = None
    deadline: float | None = None
    version_number: int = -1
    retries_used: dict[str, int] = Field(default_factory=dict)
    due: bool = False
    final: bool = False
    committed: bool = False
    canceled: bool = False
    rolled_back: bool = False
    shadow_notified: bool = False
    shadow_samples: int = 0
    shadow_agreed: int = 0
    baseline: KpiTotals = Field(default_factory=KpiTotals)
    candidate: KpiTotals = Field(default_factory=KpiTotals)

    @property
    def in_flight(self) -> bool:
        return self.attempt > 0 and not self.final and not self.due and not self.canceled


class WaveRecord(_Record):
    """One wave's progress; ``accepted`` when an operator resumed over its failure."""

    index: int
    devices: list[str]
    state: WaveState = WaveState.WAITING
    activated_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    gate: str | None = None
    gate_detail: str | None = None
    kpis: dict[str, float] = Field(default_factory=dict)
    accepted: bool = False


class AnomalyRecord(_Record):
    ts: float
    device_id: str
    reason: str


class ControllerState(_Record):
    """Everything the controller knows; ``to_dict`` is its JSON form."""

    format: int = STATE_FORMAT
    document: RolloutDocument
    rollout_id: str
    state: RolloutState = RolloutState.PENDING
    reason: str | None = None
    pause_by_gate: bool = False
    wave: int = 0
    waves: list[WaveRecord]
    devices: dict[str, DeviceRecord]
    skipped: dict[str, str] = Field(default_factory=dict)
    anomalies: list[AnomalyRecord] = Field(default_factory=list)
    anomaly_count: int = 0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
