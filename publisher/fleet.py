"""Telemetry folded into per-device fleet state, and the views made from it (pure, no I/O).

``Fleet.apply(message, now)`` takes any decoded device message; receive time ``now`` is what "last
seen" means (device clocks drift).  Liveness follows Sparkplug's bdseq rule: a device is online when
its latest birth is newer than its latest death, and a death whose ``bdseq`` is older than the latest
birth's is stale (a Will that overtook a rebirth) and ignored.

``aggregates()`` rolls the fleet up per fleet, group and rollout for backends, ``take_rollups()``
drains per-minute inference summaries for the store, and ``render_table()`` draws the fleet for people.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from schemas import topics
from schemas.messages import Aggregate, Birth, Death, ExecStatus, Health, Message, Results, Shadow, State

if TYPE_CHECKING:
    from rich.table import Table

# Latency samples kept per device-minute for the p95; results batches are ~1/s, so this is ample.
_MAX_SAMPLES = 2000


@dataclass
class DeviceView:
    """What the aggregator knows about one device."""

    device_id: str
    groups: tuple[str, ...] = ()
    birth_bdseq: int = -1
    death_bdseq: int = -1
    agent_version: str | None = None
    runtime: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    rollout_id: str | None = None
    rollout_status: ExecStatus | None = None
    rollout_step: str | None = None
    rollout_reason: str | None = None
    state_version: int = -1
    state_ts: float = 0.0
    inference_count: int = 0
    error_count: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    rss_bytes: int = 0
    uptime_s: float = 0.0
    results_batches: int = 0
    results_outputs: int = 0
    results_errors: int = 0
    last_results_at: float | None = None
    results_model_version: str | None = None
    shadow_samples: int = 0
    shadow_agreed: int = 0

    @property
    def online(self) -> bool:
        return self.birth_bdseq >= 0 and self.birth_bdseq > self.death_bdseq

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        out["online"] = self.online
        out["rollout_status"] = self.rollout_status.value if self.rollout_status else None
        return out


@dataclass
class Rollup:
    """Inference summary of one device over one minute."""

    device_id: str
    minute: int  # Unix seconds at the start of the minute
    results: int = 0
    errors: int = 0
    batches: int = 0
    latencies: list[float] = field(default_factory=list)
    model_version: str | None = None

    @property
    def latency_p95_ms(self) -> float | None:
        return percentile(self.latencies, 95)


def base_rollout_id(execution: str) -> str:
    """The rollout an execution id belongs to: ``r1`` for ``r1``, ``r1:r2``, ``r1:shadow`` and ``r1:rb``."""
    from publisher.rollout_events import parse_execution_id

    return parse_execution_id(execution.removesuffix(":rb"))[0]


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Fleet:
    """Every device's view, plus counters of what was ignored and why."""

    devices: dict[str, DeviceView] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    rollouts: set[str] = field(default_factory=set)
    _rollups: dict[tuple[str, int], Rollup] = field(default_factory=dict)

    def device(self, device_id: str, now: float) -> DeviceView:
        view = self.devices.get(device_id)
        if view is None:
            view = self.devices[device_id] = DeviceView(device_id, first_seen=now)
        return view

    def note_rollout(self, rollout_id: str) -> None:
        """A rollout id seen on a manifest: states for it are expected, not anomalies."""
        self.rollouts.add(rollout_id)

    def apply(self, message: Message, now: float) -> bool:
        """Fold one device message in; True when a device's view changed."""
        self.counters["messages"] += 1
        # The steady stream first: health and results are nearly every message a fleet sends.
        if isinstance(message, Health):
            return self._health(message, now)
        if isinstance(message, Results):
            return self._results(message, now)
        if isinstance(message, Birth):
            return self._birth(message, now)
        if isinstance(message, Death):
            return self._death(message, now)
        if isinstance(message, State):
            return self._state(message, now)
        if isinstance(message, Shadow):
            view = self.device(message.device_id, now)
            view.shadow_samples, view.shadow_agreed = message.samples, message.agreed
            return True
        self.counters["ignored_kind"] += 1
        return False

    def _birth(self, m: Birth, now: float) -> bool:
        view = self.device(m.device_id, now)
        if m.bdseq < view.birth_bdseq:
            self.counters["stale_births"] += 1
            return False
        view.birth_bdseq = m.bdseq
        view.groups = tuple(m.groups)
        view.agent_version = m.agent_version
        view.runtime = f"{m.runtime} {m.runtime_version}"
        view.model_version = m.model_version
        view.model_sha256 = m.model_sha256
        view.last_seen = now
        return True

    def _death(self, m: Death, now: float) -> bool:
        view = self.device(m.device_id, now)
        if m.bdseq < view.birth_bdseq or m.bdseq <= view.death_bdseq:
            # Sparkplug's trap: a Will that ends an older session must not take a reborn device offline.
            self.counters["stale_deaths"] += 1
            return False
        view.death_bdseq = m.bdseq
        return True

    def _state(self, m: State, now: float) -> bool:
        view = self.device(m.device_id, now)
        view.last_seen = now
        if m.rollout_id == view.rollout_id:
            if m.version_number <= view.state_version:
                self.counters["stale_states"] += 1
                return False
        elif m.ts < view.state_ts:
            self.counters["stale_states"] += 1
            return False
        if self.rollouts and base_rollout_id(m.rollout_id) not in self.rollouts:
            self.counters["anomalies"] += 1
        view.rollout_id = m.rollout_id
        view.rollout_status = m.status
        view.rollout_step = m.details.get("step")
        view.rollout_reason = m.reason
        view.state_version = m.version_number
        view.state_ts = m.ts
        if m.status is ExecStatus.SUCCEEDED and m.model_version:
            view.model_version = m.model_version
        return True

    def _health(self, m: Health, now: float) -> bool:
        view = self.device(m.device_id, now)
        view.last_seen = now
        view.inference_count = m.inference_count
        view.error_count = m.error_count
        view.latency_p50_ms = m.latency_p50_ms
        view.latency_p95_ms = m.latency_p95_ms
        view.rss_bytes = m.rss_bytes
        view.uptime_s = m.uptime_s
        if m.model_version:
            view.model_version = m.model_version
        return True

    def _results(self, m: Results, now: float) -> bool:
        view = self.device(m.device_id, now)
        view.last_seen = now
        view.results_batches += 1
        view.results_outputs += len(m.outputs)
        view.results_errors += m.errors
        view.last_results_at = now
        view.results_model_version = m.model_version
        minute = int(now // 60) * 60
        rollup = self._rollups.get((m.device_id, minute))
        if rollup is None:
            rollup = self._rollups[(m.device_id, minute)] = Rollup(m.device_id, minute)
        rollup.results += len(m.outputs)
        rollup.errors += m.errors
        rollup.batches += 1
        rollup.model_version = m.model_version
        room = _MAX_SAMPLES - len(rollup.latencies)
        if room > 0:
            rollup.latencies.extend(m.latency_ms[:room])
        return True

    def take_rollups(self, before: float | None = None) -> list[Rollup]:
        """Remove and return the rollups of minutes that started before ``before`` (all if None)."""
        done = [k for k in self._rollups if before is None or k[1] + 60 <= before]
        return [self._rollups.pop(k) for k in sorted(done, key=lambda k: (k[1], k[0]))]

    def peek_rollups(self) -> list[Rollup]:
        return list(self._rollups.values())

    # --- views ------------------------------------------------------------------------------------

    def groups(self) -> list[str]:
        return sorted({g for v in self.devices.values() for g in v.groups})

    def aggregates(self) -> list[tuple[str, Aggregate]]:
        """(topic, message) for the fleet, each group and each rollout a device reports on."""
        out = [
            (topics.aggregate(topics.AggregateScope.FLEET), _aggregate("fleet", None, self.devices.values()))
        ]
        for group in self.groups():
            members = [v for v in self.devices.values() if group in v.groups]
            out.append(
                (topics.aggregate(topics.AggregateScope.GROUP, group), _aggregate("group", group, members))
            )
        for rollout in sorted({v.rollout_id for v in self.devices.values() if v.rollout_id}):
            members = [v for v in self.devices.values() if v.rollout_id == rollout]
            out.append(
                (
                    topics.aggregate(topics.AggregateScope.ROLLOUT, rollout),
                    _aggregate("rollout", rollout, members),
                )
            )
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return [self.devices[d].as_dict() for d in sorted(self.devices)]


def _aggregate(scope: str, name: str | None, views: Any) -> Aggregate:
    members: list[DeviceView] = list(views)
    p95s = [v.latency_p95_ms for v in members if v.latency_p95_ms is not None]
    inferences = sum(v.inference_count for v in members)
    errors = sum(v.error_count for v in members)
    kpis: dict[str, float] = {"inferences": float(inferences), "errors": float(errors)}
    if inferences:
        kpis["error_rate"] = errors / inferences
    if p95s:
        kpis["latency_p95_ms_max"] = max(p95s)
        kpis["latency_p95_ms_mean"] = sum(p95s) / len(p95s)
    return Aggregate(
        scope=scope,  # type: ignore[arg-type]
        name=name,
        devices=len(members),
        online=sum(1 for v in members if v.online),
        versions=dict(Counter(v.model_version or "none" for v in members)),
        states=dict(Counter(v.rollout_status.value for v in members if v.rollout_status)),
        kpis=kpis,
    )


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def render_table(fleet: Fleet, now: float, title: str = "fleet") -> Table:
    """The fleet as a rich table: one row per device."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("device", "left"),
        ("online", "center"),
        ("groups", "left"),
        ("model", "left"),
        ("rollout", "left"),
        ("status", "left"),
        ("seen", "right"),
        ("inferences", "right"),
        ("p95 ms", "right"),
        ("results", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for device_id in sorted(fleet.devices):
        v = fleet.devices[device_id]
        status = v.rollout_status.value if v.rollout_status else "-"
        if v.rollout_step and v.rollout_status is ExecStatus.IN_PROGRESS:
            status = f"{status} ({v.rollout_step})"
        elif v.rollout_reason and v.rollout_status not in (None, ExecStatus.SUCCEEDED):
            status = f"{status}: {v.rollout_reason[:40]}"
        table.add_row(
            device_id,
            "[green]yes[/]" if v.online else "[red]no[/]",
            ",".join(v.groups) or "-",
            v.model_version or "-",
            v.rollout_id or "-",
            status,
            _ago(now, v.last_seen),
            str(v.inference_count),
            f"{v.latency_p95_ms:.2f}" if v.latency_p95_ms is not None else "-",
            str(v.results_outputs),
        )
    return table
