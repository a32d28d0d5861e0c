"""Following one rollout: which devices it targets, where each one is, and when it is over.

Pure: ``apply_birth`` / ``apply_death`` / ``apply_state`` take decoded messages, and the shell asks
``done()``.  Explicit device targets are always expected.  A group target expects every member whose
latest birth lists the group and which is online; once expected, a device stays expected, so a member
that dies mid-rollout shows up as unfinished rather than vanishing from the count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from schemas import topics
from schemas.messages import Birth, Death, ExecStatus, State


@dataclass(frozen=True)
class Targets:
    """Device ids and group names a rollout is addressed to."""

    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: tuple[str, ...] | list[str], groups: tuple[str, ...] | list[str] = ()) -> Targets:
        """``--to`` values are device ids, or ``group:NAME``; ``--group`` values are group names."""
        devices: list[str] = []
        named_groups: list[str] = list(groups)
        for value in values:
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item.startswith("group:"):
                    named_groups.append(item.removeprefix("group:"))
                else:
                    devices.append(item)
        for d in devices:
            topics.validate_id(d)
        for g in named_groups:
            topics.validate_id(g, "group")
        return cls(tuple(dict.fromkeys(devices)), tuple(dict.fromkeys(named_groups)))

    def __bool__(self) -> bool:
        return bool(self.devices or self.groups)

    def desired_topics(self) -> list[str]:
        return [topics.device_desired(d) for d in self.devices] + [
            topics.group_desired(g) for g in self.groups
        ]

    def __str__(self) -> str:
        return ", ".join([*self.devices, *(f"group:{g}" for g in self.groups)])


@dataclass
class DeviceOutcome:
    """Where one device is in the rollout."""

    device: str
    status: ExecStatus | None = None
    version_number: int = -1
    step: str | None = None
    percent: float = 0.0
    reason: str | None = None
    model_version: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status is not None and self.status.terminal

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "status": self.status.value if self.status else "NO_REPORT",
            "step": self.step,
            "percent": round(self.percent, 1),
            "reason": self.reason,
            "model_version": self.model_version,
        }


@dataclass
class _Member:
    groups: tuple[str, ...] = ()
    birth_bdseq: int = -1
    death_bdseq: int = -1

    @property
    def online(self) -> bool:
        return self.birth_bdseq > self.death_bdseq


@dataclass
class RolloutProgress:
    """The fold of births, deaths and states for one rollout id."""

    rollout_id: str
    targets: Targets
    outcomes: dict[str, DeviceOutcome] = field(default_factory=dict)
    strays: int = 0  # states for this rollout from devices it never targeted
    _members: dict[str, _Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for device in self.targets.devices:
            self.outcomes.setdefault(device, DeviceOutcome(device))

    def apply_birth(self, birth: Birth) -> None:
        member = self._members.setdefault(birth.device_id, _Member())
        if birth.bdseq >= member.birth_bdseq:
            member.birth_bdseq = birth.bdseq
            member.groups = tuple(birth.groups)
        self._enrol(birth.device_id)

    def apply_death(self, death: Death) -> None:
        member = self._members.setdefault(death.device_id, _Member())
        member.death_bdseq = max(member.death_bdseq, death.bdseq)

    def _in_target_group(self, device: str) -> bool:
        member = self._members.get(device)
        return member is not None and bool(set(member.groups) & set(self.targets.groups))

    def _enrol(self, device: str) -> None:
        member = self._members.get(device)
        if member is not None and member.online and self._in_target_group(device):
            self.outcomes.setdefault(device, DeviceOutcome(device))

    def apply_state(self, state: State) -> bool:
        """Fold a state report; True when it changed what we know."""
        if state.rollout_id != self.rollout_id:
            return False
        device = state.device_id
        outcome = self.outcomes.get(device)
        if outcome is None:
            if device not in self.targets.devices and not self._in_target_group(device):
                # A group member whose birth we have not seen yet is still a legitimate reporter.
                self.strays += 1
            outcome = self.outcomes.setdefault(device, DeviceOutcome(device))
        if state.version_number <= outcome.version_number:
            return False
        outcome.version_number = state.version_number
        outcome.status = state.status
        outcome.step = state.details.get("step", outcome.step)
        outcome.reason = state.reason
        outcome.model_version = state.model_version or outcome.model_version
        with contextlib.suppress(ValueError):
            outcome.percent = float(state.details.get("percent", outcome.percent))
        if state.status is ExecStatus.SUCCEEDED:
            outcome.percent = 100.0
        return True

    def note_chunks(self, device: str, held: int, total: int) -> None:
        """Chunk-server progress: a floor under the device's own download percent."""
        outcome = self.outcomes.get(device)
        if outcome is not None and total and not outcome.terminal:
            outcome.percent = max(outcome.percent, 100.0 * held / total)

    def done(self) -> bool:
        return bool(self.outcomes) and all(o.terminal for o in self.outcomes.values())

    @property
    def succeeded(self) -> list[str]:
        return sorted(d for d, o in self.outcomes.items() if o.status is ExecStatus.SUCCEEDED)

    @property
    def failed(self) -> list[str]:
        return sorted(
            d for d, o in self.outcomes.items() if o.terminal and o.status is not ExecStatus.SUCCEEDED
        )

    @property
    def unfinished(self) -> list[str]:
        return sorted(d for d, o in self.outcomes.items() if not o.terminal)
