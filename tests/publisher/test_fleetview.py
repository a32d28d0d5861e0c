"""publisher.fleetview: the pure shaping behind the API: device rows, groups, scopes and series."""

from __future__ import annotations

import json

from publisher.fleet import DeviceView, Rollup
from publisher.fleetview import (
    DEVICE_FIELDS,
    device_json,
    fleet_summary,
    group_rows,
    rollout_json,
    scope_devices,
    series_from_rollups,
)
from schemas.messages import ExecStatus
from tests.publisher.fakeview import running_rollout, sample_view


def test_a_fleet_device_view_becomes_plain_json() -> None:
    """A fleet.DeviceView serializes to exactly the DeviceRow fields, its status enum as a string."""
    view = DeviceView("d1", groups=("lab",), birth_bdseq=1, rollout_id="r1", rollout_status=ExecStatus.FAILED)
    row = device_json(view)
    assert tuple(row) == DEVICE_FIELDS
    assert row["rollout_status"] == "FAILED"
    assert row["groups"] == ["lab"]
    assert row["online"] is True
    json.dumps(row, allow_nan=False)


def test_non_finite_latency_is_sent_as_null() -> None:
    """A NaN p95 (a device that divided by zero) becomes null, so the JSON stays valid."""
    row = device_json(DeviceView("d1", latency_p95_ms=float("nan")))
    assert row["latency_p95_ms"] is None


def test_groups_count_a_device_in_every_group_it_names() -> None:
    """A device in two groups is a member of both; devices in none form the last, unnamed group."""
    devices = [
        DeviceView("a", groups=("x", "y"), birth_bdseq=1, model_version="2"),
        DeviceView("b", groups=("y",)),
        DeviceView("c"),
    ]
    rows = {g.name: g for g in group_rows(devices)}
    assert list(rows) == ["x", "y", None]
    assert rows["y"].device_ids == ("a", "b")
    assert rows["y"].online == 1
    assert rows["y"].versions == {"2": 1, "none": 1}
    assert rows[None].device_ids == ("c",)


def test_fleet_summary_of_the_sample() -> None:
    """The summary counts devices, online, versions and rollouts by state from the view alone."""
    summary = fleet_summary(sample_view())
    assert (summary["devices"], summary["online"]) == (10, 9)
    assert summary["rollouts"] == {"RUNNING": 1, "ROLLED_BACK": 1}


def test_rollout_json_drops_the_envelope() -> None:
    """A rollout is the RolloutStatus without kind and v, with ts renamed to updated."""
    out = rollout_json(running_rollout())
    assert "kind" not in out
    assert "v" not in out
    assert "updated" in out
    assert out["waves"][1]["shadow_agreement"] == 0.97


def test_scopes_resolve_to_device_sets() -> None:
    """fleet is everyone (None); group, device and rollout scopes name their devices; others nobody."""
    devices = sample_view().devices()
    assert scope_devices("fleet", devices) is None
    assert scope_devices("group:gateways", devices) == {"gw-01", "gw-02", "gw-03"}
    assert scope_devices("device:cam-01", devices) == {"cam-01"}
    assert scope_devices("rollout:r-110", devices) == {"cam-01", "cam-02", "cam-03"}
    assert scope_devices("planet:earth", devices) == frozenset()


def test_series_from_rollups_weights_p95_by_results_and_skips_empty_minutes() -> None:
    """latency_p95 is the results-weighted mean of device p95s; a minute with no inference gives no point."""
    rows = [
        {"device_id": "a", "minute": 60, "results": 30, "errors": 0, "latency_p95_ms": 10.0},
        {"device_id": "b", "minute": 60, "results": 10, "errors": 10, "latency_p95_ms": 2.0},
        {"device_id": "a", "minute": 120, "results": 0, "errors": 0, "latency_p95_ms": None},
        {"device_id": "c", "minute": 180, "results": 5, "errors": 5, "latency_p95_ms": 1.0},
    ]
    assert series_from_rollups(rows, "latency_p95", {"a", "b"}, 0) == [(60.0, 8.0)]
    assert series_from_rollups(rows, "error_rate", None, 0) == [(60.0, 0.2), (180.0, 0.5)]
    assert series_from_rollups(rows, "error_rate", None, 121) == [(180.0, 0.5)]


def test_series_from_rollups_reads_live_fleet_rollups_too() -> None:
    """The minute still being folded (fleet.Rollup objects) mixes with stored rows in one series."""
    live = Rollup("a", 240, results=9, errors=1, latencies=[1.0] * 19 + [7.0])
    stored = {"device_id": "a", "minute": 180, "results": 10, "errors": 0, "latency_p95_ms": 3.0}
    assert series_from_rollups([stored, live], "error_rate", None, 0) == [(180.0, 0.0), (240.0, 0.1)]
    assert series_from_rollups([stored, live], "latency_p95", {"a"}, 0) == [(180.0, 3.0), (240.0, 1.0)]
