"""The read side of the fleet that the HTTP API, the dashboard and ``/metrics`` show.

``FleetView`` is the narrow, read-only interface ``publisher.http`` serves: whatever holds the fleet
(``Fleet`` folded from telemetry, the store, the rollout controllers) answers four questions. The rest
of this module is pure shaping of the answers into JSON-able data, and the helpers an implementation
needs for series (``scope_devices``, ``series_from_rollups``), so an adapter stays a few lines.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

from schemas.messages import RolloutStatus

Metric = Literal["latency_p95", "error_rate"]
METRICS: tuple[str, ...] = get_args(Metric)


class DeviceRow(Protocol):
    """One device as the fleet view shows it (read-only; ``publisher.fleet.DeviceView`` fits as is).

    ``last_seen`` is Unix seconds of its latest message; ``latency_p95_ms``, ``error_count`` and
    ``inference_count`` come from its latest health; ``rollout_*`` from its latest execution state.
    """

    @property
    def device_id(self) -> str: ...
    @property
    def online(self) -> bool: ...
    @property
    def groups(self) -> Sequence[str]: ...
    @property
    def model_version(self) -> str | None: ...
    @property
    def model_sha256(self) -> str | None: ...
    @property
    def last_seen(self) -> float | None: ...
    @property
    def latency_p95_ms(self) -> float | None: ...
    @property
    def error_count(self) -> int: ...
    @property
    def inference_count(self) -> int: ...
    @property
    def runtime(self) -> str | None: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def rollout_id(self) -> str | None: ...
    @property
    def rollout_status(self) -> str | None: ...


DEVICE_FIELDS: tuple[str, ...] = tuple(
    name for name, value in vars(DeviceRow).items() if isinstance(value, property)
)


def device_json(device: DeviceRow) -> dict[str, Any]:
    """A device as the API shows it: exactly the ``DeviceRow`` fields, enums as their values."""
    out: dict[str, Any] = {}
    for name in DEVICE_FIELDS:
        value = getattr(device, name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif name == "groups":
            value = list(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name] = value
    return out


@dataclass(frozen=True)
class GroupRow:
    """One group and its members (``name`` is None for devices that belong to no group)."""

    name: str | None
    device_ids: tuple[str, ...] = ()
    online: int = 0
    versions: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": len(self.device_ids),
            "online": self.online,
            "versions": dict(self.versions),
            "device_ids": list(self.device_ids),
        }


class FleetView(Protocol):
    """What the HTTP layer reads. Every method is called per request, from worker threads.

    * ``devices()`` — every known device, online or not.
    * ``rollouts()`` — every rollout the service knows (newest first is nicest for the dashboard),
      as the same ``RolloutStatus`` that ``fleetbus serve`` publishes retained.
    * ``series(metric, scope, since)`` — per-minute points ``(minute_start_unix_s, value)``, oldest
      first, for ``metric`` ``"latency_p95"`` (milliseconds) or ``"error_rate"`` (errors per
      inference, 0..1) over ``scope`` ``"fleet"``, ``"device:ID"``, ``"group:NAME"`` or
      ``"rollout:ID"``; an unknown scope gives an empty list, not an error.
    * ``counters()`` — monotonic process counters by name. ``publisher.metrics.COUNTERS`` lists the
      names it exposes with help text (``messages_ingested``, ``decode_errors``, ``denied_messages``,
      ``chunk_bytes_sent``, ...); other names are exposed too, as ``fleetbus_events_total{event=...}``.
    """

    def devices(self) -> Sequence[DeviceRow]: ...

    def rollouts(self) -> Sequence[RolloutStatus]: ...

    def series(self, metric: Metric, scope: str, since: float) -> Sequence[tuple[float, float]]: ...

    def counters(self) -> Mapping[str, float]: ...


# --- shaping (pure: view in, JSON-able data out) ---------------------------------------------------


def group_rows(devices: Sequence[DeviceRow]) -> list[GroupRow]:
    """The fleet by group, sorted by name with the ungrouped last; a device can be in several."""
    members: dict[str | None, list[DeviceRow]] = {}
    for device in devices:
        for name in device.groups or (None,):
            members.setdefault(name, []).append(device)
    rows = []
    for name in sorted(members, key=lambda n: (n is None, n or "")):
        group = sorted(members[name], key=lambda d: d.device_id)
        versions: dict[str, int] = {}
        for d in group:
            key = d.model_version or "none"
            versions[key] = versions.get(key, 0) + 1
        rows.append(GroupRow(name, tuple(d.device_id for d in group), sum(d.online for d in group), versions))
    return rows


def rollout_json(status: RolloutStatus) -> dict[str, Any]:
    """A rollout as the API shows it: the wire ``RolloutStatus`` without its envelope fields."""
    out = status.model_dump(mode="json", exclude={"kind", "v"})
    out["updated"] = out.pop("ts")
    return out


def fleet_summary(view: FleetView) -> dict[str, Any]:
    """``/api/fleet``: the counts a person or a script checks first."""
    devices = view.devices()
    versions: dict[str, int] = {}
    for d in devices:
        key = d.model_version or "none"
        versions[key] = versions.get(key, 0) + 1
    rollout_states: dict[str, int] = {}
    for r in view.rollouts():
        rollout_states[r.state] = rollout_states.get(r.state, 0) + 1
    return {
        "ts": time.time(),
        "devices": len(devices),
        "online": sum(d.online for d in devices),
        "versions": versions,
        "groups": [g.as_json() for g in group_rows(devices)],
        "rollouts": rollout_states,
        "counters": dict(view.counters()),
    }


def scope_devices(scope: str, devices: Sequence[DeviceRow]) -> frozenset[str] | None:
    """The device ids a series scope covers; None means the whole fleet.

    ``rollout:ID`` covers the devices whose latest execution is in that rollout, which is what a
    view folded from telemetry knows; a store with the rollout's target list can do better.
    """
    if scope == "fleet":
        return None
    kind, _, name = scope.partition(":")
    if kind == "device":
        return frozenset({name})
    if kind == "group":
        return frozenset(d.device_id for d in devices if name in d.groups)
    if kind == "rollout":
        return frozenset(d.device_id for d in devices if d.rollout_id == name)
    return frozenset()


def series_from_rollups(
    rows: Iterable[Mapping[str, Any] | object], metric: Metric, devices: Collection[str] | None, since: float
) -> list[tuple[float, float]]:
    """Per-minute points from per-device minute rollups, oldest first.

    A row is a store ``rollups()`` dict or an object with the same attributes (``fleet.Rollup``, for
    the minute still being folded): ``device_id``, ``minute`` (Unix seconds), ``results``, ``errors``
    and ``latency_p95_ms``. ``error_rate`` is errors / (results + errors) over the scope's devices in
    that minute. A fleet-wide p95 cannot be rebuilt from per-device p95s, so ``latency_p95`` is their
    mean weighted by each device's results, which follows the typical device and is not thrown by one
    outlier. Minutes with nothing to average give no point rather than a zero.
    """
    totals: dict[int, list[float]] = {}  # minute -> [results, errors, p95 * weight, weight]
    for row in rows:
        minute = int(_field(row, "minute") or 0)
        if minute + 60 <= since or (devices is not None and _field(row, "device_id") not in devices):
            continue
        bucket = totals.setdefault(minute, [0.0, 0.0, 0.0, 0.0])
        results, errors = float(_field(row, "results") or 0), float(_field(row, "errors") or 0)
        bucket[0] += results
        bucket[1] += errors
        p95 = _field(row, "latency_p95_ms")
        if p95 is not None and math.isfinite(p95):
            weight = max(results, 1.0)
            bucket[2] += float(p95) * weight
            bucket[3] += weight
    points: list[tuple[float, float]] = []
    for minute in sorted(totals):
        results, errors, weighted, weight = totals[minute]
        if metric == "error_rate" and results + errors > 0:
            points.append((float(minute), errors / (results + errors)))
        elif metric == "latency_p95" and weight > 0:
            points.append((float(minute), weighted / weight))
    return points


def _field(row: Mapping[str, Any] | object, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)
