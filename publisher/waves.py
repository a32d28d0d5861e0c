"""The wave planner: a rollout document and a fleet snapshot in, a plan of waves out. Pure.

The targets are ranked by ``sha256(seed, device id)`` (``publisher.document.rank``); devices that cannot
run the model are set aside as INCOMPATIBLE; the rest, the *eligible* devices, are cut into waves by the
waves' cumulative sizes (1 % of the eligible devices is at least one device).

Guarantees, tested in tests/publisher/test_waves.py:

* the same document, seed and fleet give the same plan, on any machine and in any process;
* a different seed gives a different order;
* adding a device never reorders the others, each wave's cumulative size grows by 0 or 1, and the
  set of existing devices reached by the end of each wave changes by at most one device (a device
  can cross one boundary; with empty waves in between that may skip wave indices).

Offline devices are not dropped: they keep their place in their wave and are marked *deferred*; the
controller notifies them when they come back online. Whether a device is online never changes which
wave it is in, so a plan made while half the fleet sleeps is the plan made when it is awake.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from publisher.document import RolloutDocument, resolve_targets, validate_document
from schemas.messages import Birth

INCOMPATIBLE = "INCOMPATIBLE"


@dataclass(frozen=True)
class KpiFigures:
    """A model's inference figures on one device: counts and a p95 latency (ms)."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs to know about one device, from its latest birth and health.

    ``ops`` is None when the device has not advertised its ops (an older agent): the op check is then
    skipped rather than guessed. ``ram_free_bytes`` 0 or None likewise means unknown. ``baseline`` is
    the active model's recent figures, the KPI gate's "before".
    """

    groups: frozenset[str] = frozenset()
    online: bool = True
    ops: frozenset[str] | None = None
    ram_free_bytes: int | None = None
    runtime: str | None = None
    model_version: str | None = None
    baseline: KpiFigures | None = None


@dataclass(frozen=True)
class ModelNeeds:
    """What the model asks of a device: the ops it uses and its tensor arena in bytes."""

    ops: frozenset[str] = frozenset()
    arena_bytes: int | None = None


@dataclass(frozen=True)
class Skipped:
    """A targeted device that will not be notified, and why."""

    device_id: str
    reason: str
    detail: str


@dataclass(frozen=True)
class PlannedWave:
    """One wave: its devices in seed order, and which of them are offline now (deferred)."""

    index: int
    label: str
    cumulative: int
    devices: tuple[str, ...]
    deferred: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Which devices go in which wave, and which are skipped; the controller starts from it."""

    rollout_id: str
    version: str
    seed: str
    targets: tuple[str, ...]
    waves: tuple[PlannedWave, ...]
    skipped: tuple[Skipped, ...]
    previous_versions: Mapping[str, str | None] = field(default_factory=dict)
    baselines: Mapping[str, KpiFigures] = field(default_factory=dict)

    @property
    def eligible(self) -> tuple[str, ...]:
        return tuple(d for w in self.waves for d in w.devices)

    @property
    def deferred(self) -> tuple[str, ...]:
        return tuple(d for w in self.waves for d in w.deferred)

    def wave_of(self, device_id: str) -> int | None:
        for wave in self.waves:
            if device_id in wave.devices:
                return wave.index
        return None

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready data, for ``rollout push --dry-run --json``."""
        return {
            "rollout_id": self.rollout_id,
            "version": self.version,
            "seed": self.seed,
            "targets": len(self.targets),
            "eligible": len(self.eligible),
            "waves": [
                {
                    "index": w.index,
                    "label": w.label,
                    "cumulative": w.cumulative,
                    "devices": list(w.devices),
                    "deferred": list(w.deferred),
                }
                for w in self.waves
            ],
            "skipped": [
                {"device_id": s.device_id, "reason": s.reason, "detail": s.detail} for s in self.skipped
            ],
        }


def device_info_from_birth(
    birth: Birth, *, online: bool = True, baseline: KpiFigures | None = None
) -> DeviceInfo:
    """What a device's latest ``birth`` tells the planner; an empty ops list means "not advertised"."""
    return DeviceInfo(
        groups=frozenset(birth.groups),
        online=online,
        ops=frozenset(birth.ops) if birth.ops else None,
        ram_free_bytes=birth.ram_free_bytes or None,
        runtime=f"{birth.runtime} {birth.runtime_version}",
        model_version=birth.model_version,
        baseline=baseline,
    )


def incompatibility(info: DeviceInfo, needs: ModelNeeds) -> str | None:
    """Why ``info``'s device cannot run a model with ``needs``, or None when it can (as far as known)."""
    if info.ops is not None and needs.ops:
        missing = sorted(needs.ops - info.ops)
        if missing:
            return f"runtime {info.runtime or '?'} lacks ops {', '.join(missing)}"
    if needs.arena_bytes is not None and info.ram_free_bytes and needs.arena_bytes > info.ram_free_bytes:
        return f"arena of {needs.arena_bytes} bytes exceeds {info.ram_free_bytes} bytes of free RAM"
    return None


def fleet_groups(fleet: Mapping[str, DeviceInfo]) -> dict[str, Collection[str]]:
    """Device id -> groups, the view ``publisher.document.check_document`` validates against."""
    return {device: info.groups for device, info in fleet.items()}


def plan_rollout(
    doc: RolloutDocument,
    fleet: Mapping[str, DeviceInfo],
    needs: ModelNeeds | None = None,
    *,
    check_file: bool = True,
) -> Plan:
    """Validate ``doc`` against ``fleet`` (``ConfigError`` listing every problem), then cut the waves."""
    validate_document(doc, fleet_groups(fleet), check_file=check_file)
    needs = needs or ModelNeeds()
    targets = resolve_targets(doc, fleet_groups(fleet))
    skipped: list[Skipped] = []
    eligible: list[str] = []
    for device in targets:
        reason = incompatibility(fleet[device], needs)
        if reason is None:
            eligible.append(device)
        else:
            skipped.append(Skipped(device, INCOMPATIBLE, reason))
    waves: list[PlannedWave] = []
    reached = 0
    for index, wave in enumerate(doc.waves):
        cumulative = max(reached, wave.size(len(eligible)))
        devices = tuple(eligible[reached:cumulative])
        deferred = tuple(d for d in devices if not fleet[d].online)
        waves.append(PlannedWave(index, wave.label, cumulative, devices, deferred))
        reached = cumulative
    return Plan(
        rollout_id=doc.rollout_id,
        version=doc.model.version,
        seed=doc.ranking_seed,
        targets=tuple(targets),
        waves=tuple(waves),
        skipped=tuple(skipped),
        previous_versions={d: fleet[d].model_version for d in eligible},
        baselines={d: b for d in eligible if (b := fleet[d].baseline) is not None},
    )


def render_plan(plan: Plan, *, max_ids: int = 12) -> str:
    """The ``--dry-run`` text: one block per wave, then the skipped devices with their reasons."""

    def ids(devices: tuple[str, ...] | list[str]) -> str:
        shown = ", ".join(devices[:max_ids])
        more = len(devices) - max_ids
        return f"{shown}, ... (+{more})" if more > 0 else shown

    lines = [
        f"rollout {plan.rollout_id}: version {plan.version}, seed {plan.seed!r}",
        f"  {len(plan.targets)} targeted, {len(plan.eligible)} eligible, {len(plan.skipped)} skipped, "
        f"{len(plan.deferred)} offline (deferred until they come back)",
    ]
    for wave in plan.waves:
        online = [d for d in wave.devices if d not in wave.deferred]
        lines.append(
            f"  wave {wave.index} ({wave.label}, {wave.cumulative} reached): {len(wave.devices)} devices"
            + (f", {len(wave.deferred)} deferred" if wave.deferred else "")
        )
        if online:
            lines.append(f"    notify:   {ids(online)}")
        if wave.deferred:
            lines.append(f"    deferred: {ids(list(wave.deferred))}")
    if plan.skipped:
        lines.append(f"  skipped ({len(plan.skipped)}):")
        lines.extend(f"    {s.device_id}: {s.reason} ({s.detail})" for s in plan.skipped)
    return "\n".join(lines)


def render_plan_json(plan: Plan) -> str:
    """``to_json`` as a JSON string with sorted keys, for scripts."""
    return json.dumps(plan.to_json(), sort_keys=True)
