"""The dashboard page, rendered by real headless Chromium against a real server on 127.0.0.1."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from publisher.fleet import Fleet
from publisher.http import start_http
from schemas.messages import Birth, Death, RolloutStatus
from tests.publisher.chromium import Element, load_dom, require_chromium, screenshot
from tests.publisher.fakeview import (
    CAMS,
    GATEWAYS,
    LONER,
    NEW,
    OFFLINE,
    OLD,
    UPGRADED,
    MemoryView,
    sample_view,
)


@pytest.fixture(scope="module")
def dom() -> Iterator[Element]:
    require_chromium()
    with start_http(sample_view()) as handle:
        yield load_dom(f"{handle.url}/")


def test_every_device_is_listed_with_its_model_version(dom: Element) -> None:
    """Each device has a row showing its id and the model version it runs."""
    rows = {r.attrs["data-device"]: r for r in dom.find_all("tr", cls="device")}
    assert set(rows) == {*CAMS, *GATEWAYS, LONER}
    for device, row in rows.items():
        version = NEW if device in UPGRADED[:2] else OLD
        assert row.attrs["data-version"] == version
        assert device in row.text
        assert version in row.text


def test_devices_are_grouped_and_show_health(dom: Element) -> None:
    """Devices sit in a card per group (ungrouped last), with online state, p95 latency and errors."""
    groups = [g.attrs["data-group"] for g in dom.find_all("div", cls="group")]
    assert groups == ["cams", "gateways", ""]
    cams = dom.find_all("div", cls="group", data_group="cams")[0]
    assert {r.attrs["data-device"] for r in cams.find_all("tr", cls="device")} == set(CAMS)
    offline = dom.find_all("tr", data_device=OFFLINE)[0]
    assert offline.attrs["data-online"] == "false"
    assert "offline" in offline.text
    cam1 = dom.find_all("tr", data_device="cam-01")[0]
    assert "online" in cam1.text
    assert "4.00 ms" in cam1.text
    assert "SUCCEEDED" in cam1.text
    assert "ago" in cam1.text


def test_rollout_progress_is_shown_per_wave(dom: Element) -> None:
    """Each rollout shows its state, and every wave its state, succeeded count and a progress bar."""
    card = dom.find_all("div", cls="rollout", data_rollout="r-110")[0]
    assert card.attrs["data-state"] == "RUNNING"
    waves = card.find_all("tr", cls="wave")
    assert [w.attrs["data-state"] for w in waves] == ["PASSED", "ACTIVE", "WAITING"]
    assert [(w.attrs["data-succeeded"], w.attrs["data-devices"]) for w in waves] == [
        ("1", "1"),
        ("1", "2"),
        ("0", "3"),
    ]
    assert "1/2 ok" in waves[1].text
    assert "97%" in waves[1].text  # shadow agreement
    bars = waves[1].find_all("div", cls="bar")[0]
    assert [span.attrs["class"] for span in bars.find_all("span")] == ["succeeded", "in_progress"]
    aborted = dom.find_all("div", cls="rollout", data_rollout="r-109")[0]
    assert "FAILED 34%" in aborted.text


def test_charts_have_a_line_with_data_points_per_scope(dom: Element) -> None:
    """Both charts draw a line for the fleet, the running rollout and each group, a point per minute."""
    for chart_id in ("chart-latency", "chart-errors"):
        svg = dom.by_id(chart_id).find_all("svg")[0]
        assert int(svg.attrs["data-count"]) == 120
        lines = {p.attrs["data-scope"]: int(p.attrs["data-count"]) for p in svg.find_all("path", cls="line")}
        assert lines == {"fleet": 30, "rollout:r-110": 30, "group:cams": 30, "group:gateways": 30}
        assert len(svg.find_all("circle")) == 120
    legend = dom.by_id("legend").text
    assert "rollout r-110" in legend
    assert "group gateways" in legend


def test_header_tiles_show_the_fleet_counts(dom: Element) -> None:
    """The header shows devices, online, active rollouts and the ingest, decode-error and denial counters."""
    tiles = {t.attrs["data-key"]: t.attrs["data-value"] for t in dom.find_all("div", cls="tile")}
    assert tiles["devices"] == "10"
    assert tiles["online"] == "9"
    assert tiles["active_rollouts"] == "1"
    assert tiles["decode_errors"] == "3"
    assert tiles["denied_messages"] == "2"
    assert dom.find_all("body")[0].attrs.get("data-loaded") == "true"


class _CountingView(MemoryView):
    """Counts /api/fleet polls in messages_ingested, so the page shows how often it polled."""

    polls = 0

    def counters(self) -> Mapping[str, float]:
        self.polls += 1
        return {"messages_ingested": float(self.polls)}


def test_the_page_polls_the_api_repeatedly() -> None:
    """With 5 s of virtual time the page has fetched the API more than once (it polls every 2 s)."""
    require_chromium()
    view = _CountingView()
    with start_http(view) as handle:
        dom = load_dom(f"{handle.url}/", budget_ms=5000)
    assert view.polls >= 2
    tile = dom.find_all("div", cls="tile", data_key="messages_ingested")[0]
    assert int(tile.attrs["data-value"]) >= 2


def test_an_empty_fleet_says_so() -> None:
    """With no devices, rollouts or data the page says so instead of drawing empty tables and charts."""
    require_chromium()
    with start_http(MemoryView()) as handle:
        dom = load_dom(f"{handle.url}/")
    assert "No devices yet." in dom.by_id("groups").text
    assert "No rollouts yet." in dom.by_id("rollouts").text
    assert "no data yet" in dom.by_id("chart-latency").text
    assert dom.by_id("chart-latency").find_all("svg")[0].attrs["data-count"] == "0"


class _BrokenView(MemoryView):
    def rollouts(self) -> Sequence[RolloutStatus]:
        raise RuntimeError("store is gone")


def test_an_api_failure_shows_as_disconnected() -> None:
    """When the API answers 500 the header says disconnected and why, rather than showing stale data."""
    require_chromium()
    with start_http(_BrokenView()) as handle:
        dom = load_dom(f"{handle.url}/")
    status = dom.by_id("status")
    assert "down" in status.classes
    assert "disconnected" in status.text
    assert "HTTP 500" in status.text


def test_screenshot_is_a_full_size_png(tmp_path: Path) -> None:
    """Chromium renders the dashboard to a 1280x900 PNG (looked at by a person during development)."""
    require_chromium()
    with start_http(sample_view()) as handle:
        png = screenshot(f"{handle.url}/", tmp_path / "dash.png", size=(1280, 900))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000  # a blank page compresses to a few KB


def test_a_large_group_shows_offline_devices_first_and_says_how_many_are_hidden() -> None:
    """Past 200 rows a group lists offline devices first and names how many more the API has."""
    require_chromium()
    fleet = Fleet()
    now = time.time()
    for i in range(250):
        fleet.apply(Birth(device_id=f"d-{i:03d}", bdseq=1, groups=["big"], agent_version="0.1.0",
                          runtime="litert", runtime_version="2.3.0"), now)  # fmt: skip
    fleet.apply(Death(device_id="d-249", bdseq=1), now)
    with start_http(MemoryView(fleet)) as handle:
        dom = load_dom(f"{handle.url}/")
    big = dom.find_all("div", cls="group", data_group="big")[0]
    rows = big.find_all("tr", cls="device")
    assert len(rows) == 200
    assert rows[0].attrs["data-device"] == "d-249"
    assert "50 more not shown" in big.text
