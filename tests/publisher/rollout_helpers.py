"""Builders shared by the rollout document, planner and controller tests (pure, no network)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from publisher.controller import Controller, Effect, Notify, StatusUpdate
from publisher.document import ModelRef, RolloutDocument, Targets
from publisher.rollout_events import execution_id
from publisher.waves import DeviceInfo, Plan, plan_rollout
from schemas.messages import ExecStatus


def fleet(
    n: int, *, group: str = "g", offline: Iterable[str] = (), version: str = "1", prefix: str = "d"
) -> dict[str, DeviceInfo]:
    """``n`` devices named d00, d01, ... in one group, running model ``version``."""
    down = set(offline)
    return {
        f"{prefix}{i:02d}": DeviceInfo(
            groups=frozenset({group}), online=f"{prefix}{i:02d}" not in down, model_version=version
        )
        for i in range(n)
    }


def document(**fields: Any) -> RolloutDocument:
    """A document for model version 2 targeting group g; ``fields`` override any top-level field."""
    base: dict[str, Any] = {
        "id": "r1",
        "model": ModelRef(path="model.tflite", version="2"),
        "targets": Targets(groups=["g"]),
        "seed": "s",
    }
    base.update(fields)
    return RolloutDocument(**base)


def make_plan(doc: RolloutDocument, devices: dict[str, DeviceInfo]) -> Plan:
    return plan_rollout(doc, devices, check_file=False)


def controller(doc: RolloutDocument, devices: dict[str, DeviceInfo]) -> Controller:
    return Controller.from_plan(doc, make_plan(doc, devices))


def notified(effects: Iterable[Effect]) -> list[str]:
    """Device ids of the non-shadow Notify effects, in order."""
    return [e.device_id for e in effects if isinstance(e, Notify) and not e.shadow]


class Reporter:
    """Sends status updates as a real agent does: a growing version number, the current execution id."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.versions: dict[str, int] = {}

    def __call__(self, device: str, status: ExecStatus, now: float) -> list[Effect]:
        version = self.versions.get(device, 0) + 1
        self.versions[device] = version
        rec = self.ctl.state.devices.get(device)
        execution = execution_id(self.ctl.rollout_id, rec.attempt if rec else 1)
        return self.ctl.handle(StatusUpdate(now, device, status, version, rollout_id=execution))

    def all(self, devices: Iterable[str], status: ExecStatus, now: float) -> list[Effect]:
        out: list[Effect] = []
        for device in devices:
            out.extend(self(device, status, now))
        return out
