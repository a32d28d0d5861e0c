"""``fleetbus serve``: the aggregator's MQTT shell around the pure fleet fold.

Telemetry arrives on paho's network thread, is decoded and folded into ``Fleet`` under a lock (cheap),
and the devices it touched are marked dirty.  The service's own loop then, on its own clock:

* writes dirty devices, execution changes and finished minute rollups to the store in one
  transaction per ``flush_s``;
* publishes retained ``Aggregate`` messages (fleet, each group, each rollout) every ``aggregate_s``;
* prints the fleet table every ``table_s`` and whenever SIGUSR1 arrives;
* is the ``FleetView`` that ``publisher/http.py`` serves (JSON API, dashboard, ``/metrics``) when
  ``serve --http`` is given.

Malformed telemetry is logged, counted (``fleet.counters["decode_errors"]``) and skipped.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import structlog

from publisher.bus import Bus
from publisher.errors import BusError
from publisher.fleet import DeviceView, Fleet, Rollup, render_table
from publisher.store import Batch, ExecutionRow, Store
from schemas import topics
from schemas.codec import decode, encode
from schemas.errors import DecodeError, TopicError
from schemas.messages import ExecStatus, Manifest, Message, RolloutControl, RolloutStatus, State

if TYPE_CHECKING:
    from publisher.fleetview import Metric
    from publisher.http import HttpHandle

log = structlog.get_logger("publisher.serve")

TELEMETRY_STREAMS = (
    topics.DeviceStream.BIRTH,
    topics.DeviceStream.DEATH,
    topics.DeviceStream.STATE,
    topics.DeviceStream.HEALTH,
    topics.DeviceStream.RESULTS,
    topics.DeviceStream.SHADOW,
)


@dataclass(frozen=True)
class ServeOptions:
    """How often the aggregator writes, publishes and prints."""

    flush_s: float = 1.0
    aggregate_s: float = 5.0
    table_s: float = 0.0  # 0: only on SIGUSR1 or HTTP
    share: str | None = None
    retention_days: float = 7.0


def telemetry_filters(share: str | None = None) -> list[str]:
    filters = [topics.device_stream_filter(s) for s in TELEMETRY_STREAMS]
    filters.append(topics.manifest_filter())
    if share:
        filters = [topics.shared(share, f) for f in filters]
    return filters


@functools.lru_cache(maxsize=65536)
def _parse_topic(topic: str) -> topics.Topic:
    # Parsing validates every level; telemetry topics repeat, so each is parsed once (errors are not cached).
    return topics.parse(topic)


def view_from_dict(raw: dict[str, Any]) -> DeviceView:
    """Rebuild a device view saved by the store (unknown keys from newer versions are dropped)."""
    known = {f.name for f in fields(DeviceView)}
    data = {k: v for k, v in raw.items() if k in known}
    data["groups"] = tuple(data.get("groups") or ())
    status = data.get("rollout_status")
    data["rollout_status"] = ExecStatus(status) if status else None
    return DeviceView(**data)


class Aggregator:
    """Folds telemetry, stores it, and publishes aggregates; ``run()`` until ``stop()``."""

    def __init__(
        self, bus: Bus, store: Store, options: ServeOptions | None = None, printer: Any = None
    ) -> None:
        self.bus = bus
        self.store = store
        self.options = options or ServeOptions()
        self.fleet = Fleet()
        self._printer = printer
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._executions: list[ExecutionRow] = []
        self._stop = threading.Event()
        self._print_now = threading.Event()
        self.aggregates_published = 0
        self._http: HttpHandle | None = None
        # Hooks for the rollout driver (publisher/driver.py) when `serve` drives waves.
        self.rollout_source: Callable[[], Sequence[RolloutStatus]] | None = None
        self.controls: Callable[[RolloutControl], object] | None = None
        self.intake: Any = None  # publisher.http.Intake: model uploads and rollout submissions
        #: Counters of other parts (the rollout driver) shown in /api/fleet and /metrics.
        self.extra_counters: Callable[[], Mapping[str, float]] | None = None
        #: Called on paho's thread with (message, receive time, whether it changed the fleet view).
        self.telemetry_hooks: list[Callable[[Message, float, bool], None]] = []

    # --- lifecycle --------------------------------------------------------------------------------

    def restore(self) -> int:
        """Reload device views saved by an earlier run, so a restart keeps the fleet it knew."""
        loaded = 0
        for raw in self.store.load_devices():
            try:
                view = view_from_dict(raw)
            except (TypeError, ValueError) as exc:
                log.warning("stored device view unreadable, skipped", error=str(exc))
                continue
            self.fleet.devices[view.device_id] = view
            loaded += 1
        return loaded

    def start(self) -> None:
        filters = telemetry_filters(self.options.share)
        for f in filters:
            self.bus.on(f, self._on_message)
        self.bus.subscribe(filters)
        log.info("aggregator subscribed", filters=len(filters), share=self.options.share)

    def stop(self) -> None:
        self._stop.set()

    def request_table(self) -> None:
        """Print the fleet table at the next turn of the loop (SIGUSR1 calls this)."""
        self._print_now.set()

    def run(self) -> None:
        """Flush, publish and print on schedule until ``stop()``; flushes once more on the way out."""
        opts = self.options
        next_flush = next_agg = time.monotonic()
        next_table = time.monotonic() + opts.table_s if opts.table_s > 0 else float("inf")
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_flush:
                    self.flush()
                    next_flush = now + opts.flush_s
                if now >= next_agg:
                    self.publish_aggregates()
                    next_agg = now + opts.aggregate_s
                if self._print_now.is_set() or now >= next_table:
                    self._print_now.clear()
                    self.print_table()
                    if opts.table_s > 0:
                        next_table = now + opts.table_s
                wake = min(next_flush, next_agg, next_table) - time.monotonic()
                self._stop.wait(max(0.01, min(wake, 0.2)))
        finally:
            self.flush(final=True)
            self.stop_http()

    # --- the network thread -----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.time()
        try:
            parsed = _parse_topic(topic)
            message = decode(payload)
        except (DecodeError, TopicError) as exc:
            with self._lock:
                self.fleet.counters["decode_errors"] += 1
            log.warning("malformed telemetry skipped", topic=topic, error=str(exc))
            return
        if isinstance(message, Manifest):
            with self._lock:
                self.fleet.note_rollout(message.rollout_id)
            return
        device = getattr(message, "device_id", None)
        if parsed.kind != "dev" or device != parsed.device:
            with self._lock:
                self.fleet.counters["misaddressed"] += 1
            log.warning("message does not belong on its topic, skipped", topic=topic, kind=message.kind)
            return
        with self._lock:
            changed = self.fleet.apply(message, now)
            self._record(message, device, changed, now)
        for hook in self.telemetry_hooks:
            hook(message, now, changed)

    def _record(self, message: Message, device: str | None, changed: bool, now: float) -> None:
        """Mark what a folded message changed for the next flush (caller holds the lock)."""
        if not changed or device is None:
            return
        self._dirty.add(device)
        if isinstance(message, State):
            self._executions.append(
                ExecutionRow(
                    message.rollout_id,
                    message.device_id,
                    message.status.value,
                    message.version_number,
                    message.details.get("step"),
                    message.reason,
                    now,
                )
            )

    # --- periodic work ----------------------------------------------------------------------------

    def flush(self, final: bool = False) -> Batch:
        """Write what changed since the last flush in one transaction."""
        now = time.time()
        with self._lock:
            devices = [self.fleet.devices[d] for d in sorted(self._dirty)]
            batch = Batch(
                devices=[DeviceView(**vars(v)) for v in devices],
                executions=list(self._executions),
                rollups=self.fleet.take_rollups(None if final else now),
            )
            self._dirty.clear()
            self._executions.clear()
        try:
            self.store.write(batch)
        except Exception as exc:  # the store's own errors and anything sqlite lets through
            log.error("store write failed; will retry with the next batch", error=str(exc))
            with self._lock:
                self._dirty.update(v.device_id for v in batch.devices)
                self._executions[:0] = batch.executions
        return batch

    def publish_aggregates(self) -> int:
        with self._lock:
            aggregates = self.fleet.aggregates()
        published = 0
        for topic, message in aggregates:
            try:
                self.bus.publish(topic, encode(message), qos=1, retain=True)
            except BusError as exc:
                # The next period publishes a fresher view anyway; ingestion must not stop for this.
                log.warning("aggregate not published", topic=topic, error=str(exc))
                continue
            published += 1
        self.aggregates_published += published
        return published

    def print_table(self) -> None:
        from rich.console import Console

        console = self._printer or Console(width=None if sys.stdout.isatty() else 160)
        with self._lock:
            table = render_table(self.fleet, time.time(), title=f"fleet ({len(self.fleet.devices)} devices)")
        console.print(table)

    def table_text(self, width: int = 140) -> str:
        from rich.console import Console

        console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
        with self._lock:
            console.print(render_table(self.fleet, time.time()))
        return console.export_text()

    # --- the FleetView the HTTP layer (publisher/http.py) reads; called from its worker threads ----

    def devices(self) -> Sequence[DeviceView]:
        with self._lock:
            return [replace(self.fleet.devices[d]) for d in sorted(self.fleet.devices)]

    def is_online(self, device_id: str) -> bool:
        """Whether the device's latest birth is newer than its latest death (False when unknown)."""
        with self._lock:
            view = self.fleet.devices.get(device_id)
            return view is not None and view.online

    def rollouts(self) -> Sequence[RolloutStatus]:
        return list(self.rollout_source()) if self.rollout_source is not None else []

    def series(self, metric: Metric, scope: str, since: float) -> Sequence[tuple[float, float]]:
        from publisher.fleetview import scope_devices, series_from_rollups

        members = scope_devices(scope, self.devices())
        rows = self.store.rollups(since=since)
        with self._lock:
            # The current minute is still in memory: show it too, so a chart is live.
            rows += [_rollup_row(r) for r in self.fleet.peek_rollups()]
        return series_from_rollups(rows, metric, members, since)

    def counters(self) -> Mapping[str, float]:
        with self._lock:
            c = dict(self.fleet.counters)
        out: dict[str, float] = {k: float(v) for k, v in c.items() if k != "messages"}
        out["messages_ingested"] = float(c.get("messages", 0))
        out.setdefault("decode_errors", 0.0)
        out["store_writes"] = float(getattr(self.store, "rows_written", 0))
        out["aggregates_published"] = float(self.aggregates_published)
        if self.extra_counters is not None:
            out.update(self.extra_counters())
        return out

    def serve_http(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> HttpHandle:
        """Serve the JSON API, dashboard and /metrics (publisher/http.py) from a thread."""
        from publisher.http import start_http

        self._http = start_http(self, host, port, self.controls, token=token, intake=self.intake)
        return self._http

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    def executions_json(self, rollout_id: str) -> dict[str, Any]:
        rows = [vars(r) for r in self.store.executions(rollout_id)]
        return {"rollout_id": rollout_id, "executions": rows}


def _rollup_row(r: Rollup) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "minute": r.minute,
        "results": r.results,
        "errors": r.errors,
        "batches": r.batches,
        "latency_p95_ms": r.latency_p95_ms,
        "model_version": r.model_version,
    }
