"""Prometheus ``/metrics`` for the fleet, built from a ``FleetView`` at scrape time.

Nothing is incremented here: a collector asks the view for its devices, rollouts and counters on each
scrape and turns them into metric families, so the numbers can never drift from what the API and the
dashboard show. Each ``render`` uses a registry of its own, never prometheus_client's global one, so
tests and several servers in one process do not see each other's metrics.

Exposed (``docs/telemetry.md`` has the list with examples):

* gauges ``fleetbus_devices``, ``fleetbus_devices_online``, ``fleetbus_group_devices{group}``,
  ``fleetbus_group_devices_online{group}``, ``fleetbus_model_devices{version}``,
  ``fleetbus_rollouts{state}``, ``fleetbus_rollout_executions{rollout,status}``;
* counters from ``FleetView.counters()``: the names in ``COUNTERS`` with their own metric name and
  help, any other name as ``fleetbus_events_total{event=NAME}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from publisher.fleetview import FleetView, group_rows

CONTENT_TYPE: str = CONTENT_TYPE_LATEST

# counter key in FleetView.counters() -> (metric name without _total, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "messages_ingested": ("fleetbus_messages_ingested", "Device messages decoded and folded into the fleet."),
    "decode_errors": (
        "fleetbus_decode_errors",
        "Payloads refused by the codec (bad msgpack, kind, version, size).",
    ),
    "denied_messages": ("fleetbus_denied_messages", "Publishes and subscriptions the broker's ACL denied."),
    "chunk_bytes_sent": (
        "fleetbus_chunk_bytes_sent",
        "Model chunk payload bytes published by the chunk server.",
    ),
    "chunks_sent": ("fleetbus_chunks_sent", "Model chunks published by the chunk server."),
    "anomalies": ("fleetbus_anomalies", "Reports for a rollout the device was never part of, and similar."),
    "store_writes": ("fleetbus_store_writes", "Rows written to the aggregator's store."),
}

#: Exposed even when the view does not report them (as 0), so alerts on them always have a series.
ALWAYS: tuple[str, ...] = ("messages_ingested", "decode_errors", "denied_messages", "chunk_bytes_sent")

_NAME_OK = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class FleetCollector:
    """A prometheus_client custom collector that reads ``view`` each time it is collected."""

    def __init__(self, view: FleetView) -> None:
        self._view = view

    def describe(self) -> list[Metric]:
        # An empty description stops the registry from calling collect() at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        view = self._view
        devices = view.devices()
        yield _gauge("fleetbus_devices", "Devices known to the aggregator, online or not.", len(devices))
        yield _gauge(
            "fleetbus_devices_online",
            "Devices whose latest birth is not followed by a death.",
            sum(d.online for d in devices),
        )
        groups = [g for g in group_rows(devices) if g.name is not None]
        total = GaugeMetricFamily("fleetbus_group_devices", "Devices per group.", labels=["group"])
        online = GaugeMetricFamily(
            "fleetbus_group_devices_online", "Online devices per group.", labels=["group"]
        )
        for g in groups:
            assert g.name is not None
            total.add_metric([g.name], len(g.device_ids))
            online.add_metric([g.name], g.online)
        yield total
        yield online

        versions = GaugeMetricFamily(
            "fleetbus_model_devices",
            "Devices per active model version ('none': no model).",
            labels=["version"],
        )
        counts: dict[str, int] = {}
        for d in devices:
            key = d.model_version or "none"
            counts[key] = counts.get(key, 0) + 1
        for version, n in sorted(counts.items()):
            versions.add_metric([version], n)
        yield versions

        rollouts = view.rollouts()
        by_state = GaugeMetricFamily("fleetbus_rollouts", "Rollouts per state.", labels=["state"])
        states: dict[str, int] = {}
        for r in rollouts:
            states[r.state] = states.get(r.state, 0) + 1
        for state, n in sorted(states.items()):
            by_state.add_metric([state], n)
        yield by_state
        executions = GaugeMetricFamily(
            "fleetbus_rollout_executions",
            "Device executions per rollout and status.",
            labels=["rollout", "status"],
        )
        for r in rollouts:
            for status, n in sorted(r.states.items()):
                executions.add_metric([r.rollout_id, status], n)
        yield executions

        events = CounterMetricFamily(
            "fleetbus_events", "Other aggregator counters, by name.", labels=["event"]
        )
        seen_other = False
        counters = {key: 0.0 for key in ALWAYS}
        counters.update(view.counters())
        for key, value in sorted(counters.items()):
            if not math.isfinite(value):
                continue
            if key in COUNTERS:
                name, help_text = COUNTERS[key]
                yield CounterMetricFamily(name, help_text, value=value)
            elif _NAME_OK.match(key):
                events.add_metric([key], value)
                seen_other = True
        if seen_other:
            yield events


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def registry_for(view: FleetView) -> CollectorRegistry:
    """A fresh registry holding only the fleet collector for ``view``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(view))
    return registry


def render(view: FleetView) -> bytes:
    """The Prometheus text exposition of ``view`` now."""
    return bytes(generate_latest(registry_for(view)))
