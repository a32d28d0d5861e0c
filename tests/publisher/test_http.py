"""publisher.http: the JSON API over real HTTP on 127.0.0.1, its errors, and the rollout controls."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from publisher.errors import RolloutError
from publisher.fleetview import DEVICE_FIELDS
from publisher.http import (
    HttpHandle,
    fetch_json,
    post_control,
    start_http,
)
from schemas.messages import RolloutStatus
from tests.publisher.fakeview import (
    CAMS,
    GATEWAYS,
    LONER,
    NEW,
    OFFLINE,
    OLD,
    MemoryView,
    RecordingControls,
    sample_view,
)


class Client:
    """A plain http.client over one connection per request, returning (status, headers, body)."""

    def __init__(self, handle: HttpHandle) -> None:
        self.port = handle.port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        raw = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})} if method == "POST" else headers
        status, got_headers, data = self.request(method, path, raw, hdrs)
        assert got_headers["content-type"] == "application/json"
        return status, json.loads(data)

    def get(self, path: str) -> Any:
        status, payload = self.json("GET", path)
        assert status == 200, payload
        return payload


@pytest.fixture
def view() -> MemoryView:
    return sample_view()


@pytest.fixture
def controls(view: MemoryView) -> RecordingControls:
    return RecordingControls(view)


@pytest.fixture
def server(view: MemoryView, controls: RecordingControls) -> Iterator[HttpHandle]:
    handle = start_http(view, "127.0.0.1", 0, controls)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(server: HttpHandle) -> Client:
    return Client(server)


# --- reads ---------------------------------------------------------------------------------------------


def test_port_zero_binds_a_free_loopback_port_that_answers(server: HttpHandle) -> None:
    """start_http with port 0 reports the port it really bound, on 127.0.0.1."""
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass


def test_fleet_summary_counts_devices_versions_rollouts_and_counters(client: Client) -> None:
    """/api/fleet gives device and online counts, versions, rollouts by state and the view's counters."""
    fleet = client.get("/api/fleet")
    assert fleet["devices"] == 10
    assert fleet["online"] == 9
    assert fleet["versions"] == {OLD: 8, NEW: 2}
    assert fleet["rollouts"] == {"RUNNING": 1, "ROLLED_BACK": 1}
    assert fleet["counters"]["messages_ingested"] == 12345
    assert fleet["counters"]["denied_messages"] == 2
    assert [g["name"] for g in fleet["groups"]] == ["cams", "gateways", None]


def test_devices_list_every_device_with_exactly_the_documented_fields(client: Client) -> None:
    """/api/devices returns one row per device, sorted by id, with the DeviceRow fields only."""
    devices = client.get("/api/devices")["devices"]
    assert [d["device_id"] for d in devices] == sorted([*CAMS, *GATEWAYS, LONER])
    for d in devices:
        assert tuple(d) == DEVICE_FIELDS
    offline = next(d for d in devices if d["device_id"] == OFFLINE)
    assert offline["online"] is False


def test_devices_filter_by_group(client: Client) -> None:
    """/api/devices?group=G keeps only that group's members."""
    devices = client.get("/api/devices?group=gateways")["devices"]
    assert [d["device_id"] for d in devices] == GATEWAYS


def test_one_device_shows_model_health_and_rollout_status(client: Client) -> None:
    """/api/devices/{id} shows the version, p95, counters and the rollout status as a plain string."""
    device = client.get("/api/devices/cam-01")["device"]
    assert device["model_version"] == NEW
    assert device["groups"] == ["cams"]
    assert device["latency_p95_ms"] == pytest.approx(4.0)
    assert device["inference_count"] == 1000
    assert device["rollout_id"] == "r-110"
    assert device["rollout_status"] == "SUCCEEDED"
    assert device["runtime"] == "litert 2.3.0"


def test_groups_list_members_online_counts_and_versions(client: Client) -> None:
    """/api/groups gives each group's members, online count and versions, ungrouped devices last."""
    groups = client.get("/api/groups")["groups"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["cams"]["device_ids"] == CAMS
    assert by_name["cams"]["versions"] == {NEW: 2, OLD: 4}
    assert by_name["gateways"]["online"] == 2
    assert by_name[None]["device_ids"] == [LONER]
    assert groups[-1]["name"] is None


def test_rollouts_list_carries_waves_with_their_progress(client: Client) -> None:
    """/api/rollouts lists each rollout's state and every wave's counts, agreement and gate."""
    rollouts = client.get("/api/rollouts")["rollouts"]
    assert [r["rollout_id"] for r in rollouts] == ["r-110", "r-109"]
    running = rollouts[0]
    assert running["state"] == "RUNNING"
    assert [w["state"] for w in running["waves"]] == ["PASSED", "ACTIVE", "WAITING"]
    assert running["waves"][1]["states"] == {"SUCCEEDED": 1, "IN_PROGRESS": 1}
    assert running["waves"][1]["shadow_agreement"] == pytest.approx(0.97)
    assert running["waves"][0]["gate"].startswith("p95")
    assert "kind" not in running
    assert "updated" in running


def test_one_rollout_round_trips_into_a_rollout_status(client: Client) -> None:
    """/api/rollouts/{id} is the wire RolloutStatus minus its envelope, so it validates back into one."""
    rollout = client.get("/api/rollouts/r-109")["rollout"]
    assert rollout["reason"].startswith("FAILED")
    status = RolloutStatus.model_validate({**rollout, "ts": rollout.pop("updated")})
    assert status.waves[0].states == {"FAILED": 2, "SUCCEEDED": 1}


def test_series_returns_one_line_per_scope_from_the_rollups(client: Client) -> None:
    """/api/series gives per-minute points for each requested scope, oldest first."""
    payload = client.get(
        f"/api/series?metric=error_rate&scope=fleet&scope=group:cams&since={time.time() - 3600}"
    )
    assert payload["metric"] == "error_rate"
    lines = {s["scope"]: s["points"] for s in payload["series"]}
    assert list(lines) == ["fleet", "group:cams"]
    assert len(lines["fleet"]) == 30
    assert [p[0] for p in lines["fleet"]] == sorted(p[0] for p in lines["fleet"])
    assert all(v == 0 for _, v in lines["group:cams"])  # only gateways make errors
    assert any(v > 0 for _, v in lines["fleet"])


def test_series_relative_since_and_default_scope(client: Client) -> None:
    """since=-N means the last N seconds, and no scope means the whole fleet."""
    payload = client.get("/api/series?metric=latency_p95&since=-600")
    assert [s["scope"] for s in payload["series"]] == ["fleet"]
    assert 9 <= len(payload["series"][0]["points"]) <= 11


def test_series_of_a_device_and_of_an_unknown_group() -> None:
    """A device scope averages only that device; a group nobody is in gives an empty line, not an error."""
    view = sample_view()
    with start_http(view) as handle:
        payload = Client(handle).get("/api/series?metric=latency_p95&scope=device:gw-01&scope=group:nobody")
    lines = {s["scope"]: s["points"] for s in payload["series"]}
    assert lines["group:nobody"] == []
    assert all(v >= 5.5 for _, v in lines["device:gw-01"])  # gateways run 1.5 ms slower in the sample


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/api/devices/no-such-device", "no device"),
        ("/api/rollouts/no-such-rollout", "no rollout"),
        ("/api/nothing", "no such path"),
        ("/nothing", "no such path"),
        ("/static/../pyproject.toml", "no such"),
        ("/static/missing.js", "no such file"),
    ],
)
def test_unknown_paths_and_ids_are_json_404s(client: Client, path: str, fragment: str) -> None:
    """Unknown routes, ids and static files answer 404 with a JSON error that says what was missing."""
    status, payload = client.json("GET", path)
    assert status == 404
    assert payload["error"]["status"] == 404
    assert fragment in payload["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/api/devices", "GET, HEAD"),
        ("DELETE", "/api/fleet", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/api/rollouts/r-110/pause", "POST"),
    ],
)
def test_wrong_methods_are_json_405s_with_allow(client: Client, method: str, path: str, allow: str) -> None:
    """A known route called with the wrong method answers 405 and names the right one in Allow."""
    status, headers, body = client.request(method, path, b"{}" if method != "GET" else None,
                                           {"Content-Type": "application/json"})  # fmt: skip
    assert status == 405
    assert headers["allow"] == allow
    assert json.loads(body)["error"]["status"] == 405


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("metric=cpu", "metric must be one of"),
        ("", "metric must be one of"),
        ("metric=error_rate&scope=planet:earth", "scope must be"),
        ("metric=error_rate&scope=group:", "scope must be"),
        ("metric=error_rate&since=yesterday", "since must be"),
        ("metric=error_rate&since=nan", "finite"),
        ("metric=error_rate&metric=latency_p95", "give metric once"),
        ("metric=error_rate&" + "&".join(f"scope=device:d{i}" for i in range(17)), "at most 16"),
    ],
)
def test_bad_series_queries_are_json_400s(client: Client, query: str, fragment: str) -> None:
    """A series query with a bad metric, scope or since answers 400 saying what to fix."""
    status, payload = client.json("GET", f"/api/series?{query}")
    assert status == 400
    assert fragment in payload["error"]["message"]


def test_a_failing_view_answers_500_and_the_server_keeps_serving() -> None:
    """An exception inside the view becomes a JSON 500; the next request is served normally."""

    class Flaky(MemoryView):
        fail = True

        def rollouts(self) -> list[RolloutStatus]:
            if self.fail:
                self.fail = False
                raise RuntimeError("store locked")
            return list(self.rollout_list)

    flaky = Flaky(
        **{k: getattr(sample_view(), k) for k in ("fleet", "rollout_list", "rollups", "counter_values")}
    )
    with start_http(flaky) as handle:
        client = Client(handle)
        status, payload = client.json("GET", "/api/rollouts")
        assert status == 500
        assert "RuntimeError" in payload["error"]["message"]
        assert len(client.get("/api/rollouts")["rollouts"]) == 2


def test_head_returns_headers_without_a_body(client: Client) -> None:
    """HEAD on a GET route gives the status and Content-Length but no body."""
    status, headers, body = client.request("HEAD", "/api/fleet")
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


def test_concurrent_requests_are_all_answered(server: HttpHandle) -> None:
    """The threading server answers many clients at once (the dashboard polls five routes together)."""
    results: list[int] = []
    lock = threading.Lock()

    def fetch() -> None:
        for _ in range(5):
            status, _, _ = Client(server).request("GET", "/api/devices")
            with lock:
                results.append(status)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 40


def test_keep_alive_serves_several_requests_and_an_unread_body_closes_the_connection(
    server: HttpHandle,
) -> None:
    """One connection carries several GETs; a refused request whose body was not read closes it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for path in ("/api/fleet", "/api/devices", "/metrics"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert response.getheader("Connection") != "close"
        conn.request("DELETE", "/api/fleet", body=b'{"x": 1}', headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 405
        assert response.getheader("Connection") == "close"
    finally:
        conn.close()
    assert Client(server).request("GET", "/api/fleet")[0] == 200


def test_stop_closes_the_port() -> None:
    """After stop() nothing listens on the port, and a second stop() is harmless."""
    handle = start_http(sample_view())
    port = handle.port
    handle.stop()
    handle.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


# --- controls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "state"), [("pause", "PAUSED"), ("resume", "RUNNING"), ("cancel", "CANCELED")]
)
def test_post_control_calls_the_callback_and_echoes_the_new_status(
    client: Client, controls: RecordingControls, action: str, state: str
) -> None:
    """POST /api/rollouts/{id}/{action} hands a RolloutControl to the callback and returns its status."""
    status, payload = client.json("POST", f"/api/rollouts/r-110/{action}", {"by": "ops", "reason": "night"})
    assert status == 200, payload
    assert payload["ok"] is True
    assert payload["rollout"]["state"] == state
    [command] = controls.calls
    assert (command.rollout_id, command.action, command.by, command.reason) == (
        "r-110",
        action,
        "ops",
        "night",
    )
    assert client.get("/api/rollouts/r-110")["rollout"]["state"] == state


def test_post_control_with_an_empty_body_is_accepted(client: Client, controls: RecordingControls) -> None:
    """The body is optional: a bare POST with the JSON content type pauses."""
    status, _ = client.json("POST", "/api/rollouts/r-110/pause")
    assert status == 200
    assert controls.calls[0].by is None


def test_post_control_for_an_unknown_rollout_is_404_and_never_calls_back(
    client: Client, controls: RecordingControls
) -> None:
    """A control for a rollout the view does not know is refused with 404 before the callback runs."""
    status, payload = client.json("POST", "/api/rollouts/r-999/pause", {})
    assert status == 404
    assert "r-999" in payload["error"]["message"]
    assert controls.calls == []


def test_a_refused_control_is_a_409_with_the_controllers_reason(
    client: Client, controls: RecordingControls
) -> None:
    """When the controller refuses (resume of a running rollout) the answer is 409 with its words."""
    controls.refuse = RolloutError("rollout r-110 is RUNNING, not PAUSED: nothing to resume")
    status, payload = client.json("POST", "/api/rollouts/r-110/resume", {})
    assert status == 409
    assert "nothing to resume" in payload["error"]["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "fragment"),
    [
        (b"{}", "text/plain", 415, "application/json"),
        (b"{}", None, 415, "application/json"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (json.dumps({"reason": "x" * 300}).encode(), "application/json", 400, "reason"),
        (b"x" * (17 * 1024), "application/json", 413, "body over"),
    ],
)
def test_bad_control_bodies_are_refused_before_the_callback(
    client: Client,
    controls: RecordingControls,
    body: bytes,
    content_type: str | None,
    status: int,
    fragment: str,
) -> None:
    """A control must be JSON (a CSRF form post is not) of a sane size with valid fields; else 4xx."""
    headers = {"Content-Type": content_type} if content_type else {}
    got, _, raw = client.request("POST", "/api/rollouts/r-110/pause", body, headers)
    assert got == status
    assert fragment in json.loads(raw)["error"]["message"]
    assert controls.calls == []


def test_controls_without_a_callback_answer_501() -> None:
    """A server started without controls refuses POSTs with 501 rather than pretending."""
    with start_http(sample_view()) as handle:
        status, payload = Client(handle).json("POST", "/api/rollouts/r-110/pause", {})
    assert status == 501
    assert "without rollout controls" in payload["error"]["message"]


def test_a_token_guards_the_controls_but_not_the_reads() -> None:
    """With a token, POSTs need 'Authorization: Bearer TOKEN'; GETs stay open."""
    view = sample_view()
    controls = RecordingControls(view)
    with start_http(view, controls=controls, token="s3cret") as handle:  # noqa: S106 - a test token
        client = Client(handle)
        status, _ = client.json("POST", "/api/rollouts/r-110/pause", {})
        assert status == 401
        status, _ = client.json("POST", "/api/rollouts/r-110/pause", {}, {"Authorization": "Bearer wrong"})
        assert status == 401
        assert controls.calls == []
        status, _ = client.json("POST", "/api/rollouts/r-110/pause", {}, {"Authorization": "Bearer s3cret"})
        assert status == 200
        assert client.get("/api/fleet")["devices"] == 10


# --- the page ----------------------------------------------------------------------------------------


def test_dashboard_and_its_assets_are_served_with_a_self_only_csp(client: Client) -> None:
    """/ serves the dashboard HTML, /static/ its JS and CSS, all under a CSP that allows only this origin."""
    status, headers, body = client.request("GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    html = body.decode()
    assert "/static/dashboard.js" in html
    for asset, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, body = client.request("GET", f"/static/{asset}")
        assert status == 200
        assert headers["content-type"].startswith(ctype)
        assert body


def test_page_and_assets_name_no_other_host(client: Client) -> None:
    """Nothing in the dashboard refers to another host, so it works with no internet at all."""
    for path in ("/", "/static/dashboard.js", "/static/dashboard.css"):
        text = client.request("GET", path)[2].decode()
        for marker in ("http://", "https://", "//cdn", "@import"):
            hits = [
                line for line in text.splitlines() if marker in line and "www.w3.org/2000/svg" not in line
            ]
            assert hits == [], (path, hits)


# --- the client helpers the CLI uses --------------------------------------------------------------


def test_post_control_client_pauses_through_the_server(
    server: HttpHandle, controls: RecordingControls
) -> None:
    """post_control() sends the command over HTTP and returns the server's answer with the new state."""
    answer = post_control(server.url, "r-110", "pause", by="cli", reason="freeze")
    assert answer["rollout"]["state"] == "PAUSED"
    assert (controls.calls[0].by, controls.calls[0].reason) == ("cli", "freeze")
    assert fetch_json(server.url, "/api/rollouts/r-110")["rollout"]["state"] == "PAUSED"


def test_post_control_client_raises_the_servers_refusal(
    server: HttpHandle, controls: RecordingControls
) -> None:
    """A refused or unknown control raises RolloutError carrying the status and the server's words."""
    controls.refuse = RolloutError("nothing to resume")
    with pytest.raises(RolloutError, match="409 nothing to resume"):
        post_control(server.url, "r-110", "resume")
    with pytest.raises(RolloutError, match="404 no rollout 'r-404'"):
        post_control(server.url, "r-404", "cancel")


def test_client_helpers_refuse_other_schemes_and_report_unreachable_servers() -> None:
    """A file: URL is refused before any I/O, and a closed port is a RolloutError, not a traceback."""
    with pytest.raises(RolloutError, match="not an http"):
        fetch_json("file:///etc", "/passwd")
    handle = start_http(sample_view())
    url = handle.url
    handle.stop()
    with pytest.raises(RolloutError, match="cannot reach"):
        post_control(url, "r-110", "pause")


def test_ipv6_loopback_is_served() -> None:
    """start_http binds an IPv6 address such as ::1 and says so in its URL."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        handle = start_http(sample_view(), "::1", 0)
    except OSError as exc:
        pytest.skip(f"::1 not available here: {exc}")
    with handle:
        assert handle.url.startswith("http://[::1]:")
        assert fetch_json(handle.url, "/api/fleet")["devices"] == 10
