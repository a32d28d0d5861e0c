"""publisher.metrics: /metrics over real HTTP, parsed by prometheus_client's own parser, matches the view."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from publisher.http import HttpHandle, start_http
from publisher.metrics import CONTENT_TYPE, render
from schemas.messages import Death
from tests.publisher.fakeview import MemoryView, sample_view

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(handle: HttpHandle) -> tuple[str, Samples, dict[str, str]]:
    """GET /metrics; returns the content type, every sample keyed by (name, sorted labels), and types."""
    with urllib.request.urlopen(f"{handle.url}/metrics", timeout=10) as response:  # noqa: S310 - http://127.0.0.1
        ctype = response.headers["Content-Type"]
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, samples, types


@pytest.fixture
def view() -> MemoryView:
    return sample_view()


@pytest.fixture
def server(view: MemoryView) -> Iterator[HttpHandle]:
    with start_http(view) as handle:
        yield handle


def test_metrics_are_prometheus_text_that_the_official_parser_reads(server: HttpHandle) -> None:
    """/metrics is served as Prometheus text exposition and parses with prometheus_client's parser."""
    ctype, samples, types = scrape(server)
    assert ctype == CONTENT_TYPE
    assert ctype.startswith("text/plain")
    assert samples
    assert types["fleetbus_devices_online"] == "gauge"
    assert types["fleetbus_messages_ingested"] == "counter"


def test_device_gauges_match_the_view(server: HttpHandle, view: MemoryView) -> None:
    """Devices, devices online, per-group and per-version gauges equal what the view holds."""
    _, samples, _ = scrape(server)
    devices = view.devices()
    assert samples[("fleetbus_devices", ())] == len(devices)
    assert samples[("fleetbus_devices_online", ())] == sum(d.online for d in devices) == 9
    assert samples[("fleetbus_group_devices", (("group", "cams"),))] == 6
    assert samples[("fleetbus_group_devices_online", (("group", "gateways"),))] == 2
    assert samples[("fleetbus_model_devices", (("version", "1.1.0"),))] == 2
    assert samples[("fleetbus_model_devices", (("version", "1.0.0"),))] == 8


def test_rollouts_by_state_and_executions_match_the_view(server: HttpHandle) -> None:
    """fleetbus_rollouts{state} counts rollouts; fleetbus_rollout_executions splits devices by status."""
    _, samples, _ = scrape(server)
    assert samples[("fleetbus_rollouts", (("state", "RUNNING"),))] == 1
    assert samples[("fleetbus_rollouts", (("state", "ROLLED_BACK"),))] == 1
    assert samples[("fleetbus_rollout_executions", (("rollout", "r-110"), ("status", "SUCCEEDED")))] == 2
    assert samples[("fleetbus_rollout_executions", (("rollout", "r-109"), ("status", "FAILED")))] == 2


def test_counters_match_the_view_including_the_brokers_denials(server: HttpHandle) -> None:
    """Messages ingested, decode errors, denied messages and chunk bytes are the view's counters."""
    _, samples, _ = scrape(server)
    assert samples[("fleetbus_messages_ingested_total", ())] == 12345
    assert samples[("fleetbus_decode_errors_total", ())] == 3
    assert samples[("fleetbus_denied_messages_total", ())] == 2
    assert samples[("fleetbus_chunk_bytes_sent_total", ())] == 1048576
    assert samples[("fleetbus_events_total", (("event", "stale_deaths"),))] == 1


def test_core_counters_are_present_as_zero_when_the_view_has_none() -> None:
    """An aggregator that has counted nothing yet still exposes the core counters, at 0."""
    text = render(MemoryView()).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ("messages_ingested", "decode_errors", "denied_messages", "chunk_bytes_sent"):
        assert samples[f"fleetbus_{name}_total"] == 0
    assert samples["fleetbus_devices"] == 0


def test_each_scrape_reads_the_view_afresh(server: HttpHandle, view: MemoryView) -> None:
    """A device going offline and a new decode error show on the next scrape, with nothing to refresh."""
    with view.lock:
        view.fleet.apply(Death(device_id="cam-01", bdseq=1), time.time())
        view.counter_values["decode_errors"] = 4
    _, samples, _ = scrape(server)
    assert samples[("fleetbus_devices_online", ())] == 8
    assert samples[("fleetbus_group_devices_online", (("group", "cams"),))] == 5
    assert samples[("fleetbus_decode_errors_total", ())] == 4


def test_metrics_stay_out_of_the_global_registry(server: HttpHandle) -> None:
    """Rendering uses a registry of its own: prometheus_client's global REGISTRY never sees fleetbus_*."""
    scrape(server)
    assert not [m for m in REGISTRY.collect() if m.name.startswith("fleetbus_")]


def test_odd_counter_names_and_non_finite_values_are_dropped_not_fatal() -> None:
    """A counter name Prometheus cannot carry or a NaN value is skipped; the rest still renders."""
    view = sample_view()
    view.counter_values.update({"bad name!": 1.0, "weird": float("nan")})
    text = render(view).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "fleetbus_devices" in names
    assert "bad name!" not in text
    assert 'event="weird"' not in text
