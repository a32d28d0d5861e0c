"""Following staged rollouts from the CLI: the retained ``rollout_status`` messages, shown to people.

``StatusWatch`` subscribes to one rollout's status topic (or all of them) and keeps the latest
``RolloutStatus`` of each; ``WaveBars`` draws a rich progress bar per wave from it; ``status_table``
is the one-shot view of ``fleetbus rollout status``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from publisher.bus import Bus
from schemas import topics
from schemas.codec import decode_as
from schemas.errors import DecodeError
from schemas.messages import ExecStatus, RolloutStatus, WaveProgress

if TYPE_CHECKING:
    from rich.table import Table

#: Rollout states after which nothing more happens (a COMPLETED rollout still reaches late devices).
FINAL_STATES = frozenset({"COMPLETED", "ABORTED", "ROLLED_BACK", "CANCELED"})
_SETTLED = frozenset(s.value for s in ExecStatus if s.terminal)
_FAILED = frozenset({"FAILED", "REJECTED", "TIMED_OUT"})


class StatusWatch:
    """The latest retained ``RolloutStatus`` of one rollout (or of every rollout), as it changes."""

    def __init__(self, bus: Bus, rollout_id: str | None = None) -> None:
        self.bus = bus
        self.topic = topics.rollout_status(rollout_id) if rollout_id else topics.rollout_filter("status")
        self.latest: dict[str, RolloutStatus] = {}
        self.undecodable = 0
        self._cond = threading.Condition()
        self._changes = 0

    def start(self) -> StatusWatch:
        self.bus.on(self.topic, self._on_status)
        self.bus.subscribe([self.topic])
        return self

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        try:
            status = decode_as(payload, RolloutStatus)
        except DecodeError:
            self.undecodable += 1
            return
        with self._cond:
            self.latest[status.rollout_id] = status
            self._changes += 1
            self._cond.notify_all()

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block until more than ``seen`` updates arrived or ``timeout`` passed; the new count."""
        with self._cond:
            self._cond.wait_for(lambda: self._changes > seen, timeout)
            return self._changes

    def get(self, rollout_id: str, timeout: float = 0.0) -> RolloutStatus | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while rollout_id not in self.latest:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.latest[rollout_id]

    def snapshot(self) -> list[RolloutStatus]:
        with self._cond:
            return [self.latest[r] for r in sorted(self.latest)]


def settled(wave: WaveProgress) -> int:
    """Devices of the wave whose execution is over (in any terminal state)."""
    return sum(n for state, n in wave.states.items() if state in _SETTLED)


def wave_line(wave: WaveProgress) -> str:
    """The words next to a wave's bar: its state, outcomes, KPI gate and shadow agreement."""
    ok = wave.states.get("SUCCEEDED", 0)
    failed = sum(wave.states.get(s, 0) for s in _FAILED)
    parts = [wave.state, f"{ok} ok"]
    if failed:
        parts.append(f"{failed} failed")
    pending = wave.states.get("DEFERRED", 0)
    if pending:
        parts.append(f"{pending} offline")
    if wave.gate:
        parts.append(f"gate {wave.gate}")
    if wave.shadow_agreement is not None:
        parts.append(f"agreement {wave.shadow_agreement:.3f}")
    return ", ".join(parts)


class WaveBars:
    """One rich progress bar per wave: settled devices out of the wave's devices."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._tasks: dict[int, Any] = {}
        self._header: Any = None

    def update(self, status: RolloutStatus) -> None:
        head = f"{status.rollout_id} {status.version}: {status.state}" + (
            f" ({status.reason})" if status.reason else ""
        )
        if self._header is None:
            self._header = self.progress.add_task("rollout", total=None, line=head)
        self.progress.update(self._header, line=head)
        for wave in status.waves:
            task = self._tasks.get(wave.index)
            if task is None:
                task = self._tasks[wave.index] = self.progress.add_task(
                    f"wave {wave.index}", total=max(1, wave.devices), line=""
                )
            self.progress.update(task, completed=settled(wave), line=wave_line(wave))


def status_table(status: RolloutStatus) -> Table:
    """A rollout's status as a rich table, one row per wave."""
    from rich.table import Table

    title = f"rollout {status.rollout_id} ({status.version}): {status.state}"
    if status.reason:
        title += f" - {status.reason}"
    table = Table(title=title, title_justify="left")
    for column in ("wave", "state", "devices", "notified", "succeeded %", "states", "gate", "kpis"):
        table.add_column(column)
    for wave in status.waves:
        kpis = ", ".join(f"{k}={v:.3g}" for k, v in sorted(wave.kpis.items()))
        table.add_row(
            str(wave.index),
            wave.state,
            str(wave.devices),
            str(wave.notified),
            f"{wave.succeeded_pct:.1f}",
            " ".join(f"{k}:{v}" for k, v in sorted(wave.states.items())),
            wave.gate or "-",
            kpis or "-",
        )
    table.caption = (
        f"{status.devices} devices, {status.skipped} skipped, {status.deferred} deferred, "
        f"{status.anomalies} anomalies; " + " ".join(f"{k}:{v}" for k, v in sorted(status.states.items()))
    )
    return table
