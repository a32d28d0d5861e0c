"""The fleet over HTTP: a JSON API, the dashboard page and Prometheus ``/metrics``.

A small stdlib ``ThreadingHTTPServer`` (no web framework to install on a gateway) in front of a
read-only ``publisher.fleetview.FleetView``: whatever holds the fleet state (the store, the folded
telemetry, the rollout controllers) answers a handful of questions, and this module only turns the
answers into JSON, HTML and Prometheus text. Each request asks the view afresh, so nothing here
caches or goes stale.

Routes (``docs/telemetry.md`` has the shapes)::

    GET  /                          the dashboard (publisher/static/dashboard.html)
    GET  /static/{file}             its script and style sheet
    GET  /api/fleet                 counts: devices, online, versions, rollouts by state, counters
    GET  /api/devices[?group=G]     one row per device
    GET  /api/devices/{id}          one device
    GET  /api/groups                the fleet by group
    GET  /api/rollouts              every rollout with its waves
    GET  /api/rollouts/{id}         one rollout
    GET  /api/series?metric=M&scope=S[&scope=S2...][&since=T]
                                    per-minute latency_p95 or error_rate for fleet / device:ID /
                                    group:NAME / rollout:ID
    POST /api/rollouts              a signed rollout document (``publisher/submission.py``): plan, start
    PUT  /api/blobs/{sha256}        upload a model file (raw bytes); GET/HEAD: is it stored?
    POST /api/rollouts/{id}/pause|resume|cancel
                                    hands a ``RolloutControl`` to the ``controls`` callback
    GET  /metrics                   Prometheus text exposition (publisher/metrics.py)

``post_control`` and ``fetch_json`` at the bottom are the client side, for the CLI and scripts.

The view is called from the server's worker threads, concurrently with ingestion: it must be safe
for that (a lock around in-memory state, or its own read connection to the store).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args
from urllib.parse import parse_qs, quote, unquote, urlsplit

import structlog
from pydantic import ValidationError

from publisher.errors import ConfigError, RolloutError
from publisher.fleetview import (
    METRICS,
    FleetView,
    Metric,
    device_json,
    fleet_summary,
    group_rows,
    rollout_json,
)
from publisher.submission import SignedSubmission
from schemas.errors import TopicError
from schemas.messages import RolloutControl, RolloutStatus
from schemas.signing import SignatureError

if TYPE_CHECKING:
    from publisher.driver import ByteReader

log = structlog.get_logger("publisher.http")

Action = Literal["pause", "resume", "cancel"]
ACTIONS: tuple[str, ...] = get_args(Action)

#: How far back ``/api/series`` looks when the request names no ``since``.
DEFAULT_SERIES_WINDOW_S = 3600.0
#: A series request may name this many scopes at most (one line each on a chart).
MAX_SCOPES = 16
#: POST bodies are a few optional words (``by``, ``reason``); anything larger is refused unread.
MAX_BODY_BYTES = 16 * 1024

_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page loads nothing but itself: no CDN, no font service, no analytics, even if someone edits it.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


#: ``controls(command)`` applies a pause/resume/cancel to the rollout's controller. It raises
#: ``LookupError`` for a rollout it does not know and ``RolloutError`` for a command the rollout's
#: state refuses (resume of a running rollout); what it returns (a ``RolloutStatus``, a dict, None) is
#: echoed in the response when it can be turned into JSON.
Controls = Callable[[RolloutControl], object]

#: A model upload may be this large (the blob is streamed to disk, never held in memory).
MAX_BLOB_BYTES = 4 << 30
#: A signed rollout document: a long device list is still far below this.
MAX_SUBMISSION_BYTES = 4 << 20


class Intake(Protocol):
    """Where ``POST /api/rollouts`` and ``/api/blobs`` go: the rollout driver (``publisher/driver.py``).

    ``submit`` raises ``SignatureError`` (403), ``ConfigError`` (422: the document or its plan is
    refused, nothing was published) or ``RolloutError`` (409: the id is taken).
    """

    def has_blob(self, sha256: str) -> int | None: ...

    def put_blob(self, sha256: str, length: int, stream: ByteReader, max_bytes: int) -> int: ...

    def submit(self, signed: SignedSubmission) -> RolloutStatus: ...


def _finite(points: Sequence[tuple[float, float]]) -> list[list[float]]:
    # JSON has no NaN/Infinity; a bucket without a value is dropped rather than sent as invalid JSON.
    return [[float(t), float(v)] for t, v in points if math.isfinite(t) and math.isfinite(v)]


# --- HTTP -------------------------------------------------------------------------------------------


class HttpError(Exception):
    """A request this server refuses; becomes a JSON ``{"error": {...}}`` with that status."""

    def __init__(self, status: HTTPStatus, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting ``fleetbus serve`` must not wait out TIME_WAIT on its own port.
    allow_reuse_address = True
    # socketserver's backlog of 5 drops SYNs when a few dashboards poll at once (a 1 s retransmit each).
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        view: FleetView,
        controls: Controls | None,
        token: str | None,
        intake: Intake | None = None,
    ) -> None:
        self.view = view
        self.controls = controls
        self.intake = intake
        self.token = token
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "fleetbus"
    # Headers and body leave in one segment, so a keep-alive client never waits on delayed ACKs.
    disable_nagle_algorithm = True
    _body_pending = False

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        # A body this handler never reads would be parsed as the next request on a kept-alive
        # connection; until it is read, answering closes the connection instead.
        self._body_pending = bool(self.headers.get("Content-Length", "0").strip("0 ")) or bool(
            self.headers.get("Transfer-Encoding")
        )
        try:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query, keep_blank_values=True)
            self._route(method, parts, query)
        except HttpError as exc:
            self._send_error_json(exc.status, exc.message, exc.allow)
        except Exception as exc:
            # A bug or a failing view must answer 500 and leave the server serving.
            log.exception("http_handler_failed", path=self.path, method=method)
            self._send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        view = self.server.view
        if parts in ([], ["index.html"]):
            self._only(method, "GET")
            self._send_static("dashboard.html")
        elif parts[0] == "static" and len(parts) == 2:
            self._only(method, "GET")
            self._send_static(parts[1])
        elif parts == ["metrics"]:
            self._only(method, "GET")
            from publisher.metrics import CONTENT_TYPE, render

            self._send(HTTPStatus.OK, render(view), CONTENT_TYPE)
        elif parts[0] != "api" or len(parts) < 2:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such path: {self.path}")
        elif parts[1:] == ["fleet"]:
            self._only(method, "GET")
            self._send_json(fleet_summary(view))
        elif parts[1] == "devices" and len(parts) <= 3:
            self._only(method, "GET")
            self._devices(parts[2] if len(parts) == 3 else None, query)
        elif parts[1:] == ["groups"]:
            self._only(method, "GET")
            self._send_json({"groups": [g.as_json() for g in group_rows(view.devices())]})
        elif parts[1:] == ["rollouts"] and method == "POST":
            self._submit()
        elif parts[1] == "blobs" and len(parts) == 3:
            self._blob(method, parts[2])
        elif parts[1] == "rollouts" and len(parts) <= 3:
            self._only(method, "GET")
            self._rollouts(parts[2] if len(parts) == 3 else None)
        elif parts[1] == "rollouts" and len(parts) == 4 and parts[3] in ACTIONS:
            self._only(method, "POST")
            self._control(parts[2], parts[3])
        elif parts[1:] == ["series"]:
            self._only(method, "GET")
            self._series(query)
        else:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such path: {self.path}")

    def _only(self, method: str, allowed: str) -> None:
        if method == "HEAD" and allowed == "GET":
            return
        if method != allowed:
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}", allow
            )

    # -- routes

    def _devices(self, device_id: str | None, query: dict[str, list[str]]) -> None:
        devices = self.server.view.devices()
        if device_id is not None:
            for d in devices:
                if d.device_id == device_id:
                    self._send_json({"device": device_json(d)})
                    return
            raise HttpError(HTTPStatus.NOT_FOUND, f"no device {device_id!r}")
        group = _one(query, "group")
        rows = [d for d in devices if group is None or group in d.groups]
        rows.sort(key=lambda d: d.device_id)
        self._send_json({"devices": [device_json(d) for d in rows]})

    def _rollouts(self, rollout_id: str | None) -> None:
        rollouts = self.server.view.rollouts()
        if rollout_id is None:
            self._send_json({"rollouts": [rollout_json(r) for r in rollouts]})
            return
        found = _find_rollout(rollouts, rollout_id)
        self._send_json({"rollout": rollout_json(found)})

    def _series(self, query: dict[str, list[str]]) -> None:
        metric = _one(query, "metric")
        if metric not in METRICS:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"metric must be one of {', '.join(METRICS)}; got {metric!r}"
            )
        scopes = query.get("scope") or ["fleet"]
        if len(scopes) > MAX_SCOPES:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"at most {MAX_SCOPES} scopes per request")
        for scope in scopes:
            kind, _, name = scope.partition(":")
            if not (scope == "fleet" or (kind in ("device", "group", "rollout") and name)):
                raise HttpError(
                    HTTPStatus.BAD_REQUEST,
                    f"scope must be fleet, device:ID, group:NAME or rollout:ID; got {scope!r}",
                )
        raw_since = _one(query, "since")
        now = time.time()
        if raw_since is None:
            since = now - DEFAULT_SERIES_WINDOW_S
        else:
            try:
                since = float(raw_since)
            except ValueError:
                raise HttpError(
                    HTTPStatus.BAD_REQUEST, f"since must be Unix seconds; got {raw_since!r}"
                ) from None
            if not math.isfinite(since):
                raise HttpError(HTTPStatus.BAD_REQUEST, "since must be a finite number")
            if since < 0:  # relative: since=-600 means the last ten minutes
                since = now + since
        view = self.server.view
        series = [
            {"scope": scope, "points": _finite(view.series(cast(Metric, metric), scope, since))}
            for scope in dict.fromkeys(scopes)
        ]
        self._send_json({"metric": metric, "since": since, "series": series})

    def _control(self, rollout_id: str, action: str) -> None:
        self._check_token()
        body = self._read_json_body()
        controls = self.server.controls
        if controls is None:
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "this server was started without rollout controls")
        try:
            command = RolloutControl(
                rollout_id=rollout_id,
                action=cast(Action, action),
                by=body.get("by"),
                reason=body.get("reason"),
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad control: {problems}") from None
        _find_rollout(self.server.view.rollouts(), rollout_id)
        try:
            result = controls(command)
        except LookupError as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no rollout {rollout_id!r}: {exc}") from None
        except RolloutError as exc:
            raise HttpError(HTTPStatus.CONFLICT, str(exc)) from None
        log.info("rollout_control", rollout_id=rollout_id, action=action, by=command.by)
        out: dict[str, Any] = {"ok": True, "rollout_id": rollout_id, "action": action}
        if isinstance(result, RolloutStatus):
            out["rollout"] = rollout_json(result)
        elif isinstance(result, dict):
            out["result"] = result
        self._send_json(out)

    def _intake(self) -> Intake:
        if self.server.intake is None:
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "this server takes no rollouts (serve needs --key)")
        return self.server.intake

    def _blob(self, method: str, sha256: str) -> None:
        intake = self._intake()
        try:
            if method in ("GET", "HEAD"):
                size = intake.has_blob(sha256)
                if size is None:
                    raise HttpError(HTTPStatus.NOT_FOUND, f"no model {sha256}")
                self._send_json({"sha256": sha256, "size": size})
                return
            self._only(method, "PUT")
            self._check_token()
            if self.headers.get("Transfer-Encoding"):
                raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the model with a Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
            if length > MAX_BLOB_BYTES:
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"model over {MAX_BLOB_BYTES} bytes")
            size = intake.put_blob(sha256, length, self.rfile, MAX_BLOB_BYTES)
            self._body_pending = False
        except TopicError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except ConfigError as exc:
            self._body_pending = False  # put_blob read (or failed reading) the body: close anyway
            self.close_connection = True
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        self._send_json({"sha256": sha256, "size": size}, HTTPStatus.CREATED)

    def _submit(self) -> None:
        intake = self._intake()
        self._check_token()
        body = self._read_json_body(MAX_SUBMISSION_BYTES)
        try:
            status = intake.submit(SignedSubmission.from_json(body))
        except SignatureError as exc:
            raise HttpError(HTTPStatus.FORBIDDEN, str(exc)) from None
        except ConfigError as exc:
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        except RolloutError as exc:
            raise HttpError(HTTPStatus.CONFLICT, str(exc)) from None
        log.info("rollout_submitted", rollout_id=status.rollout_id)
        self._send_json({"ok": True, "rollout": rollout_json(status)}, HTTPStatus.CREATED)

    def _check_token(self) -> None:
        token = self.server.token
        if token is None:
            return
        if self.headers.get("Authorization", "") != f"Bearer {token}":
            raise HttpError(HTTPStatus.UNAUTHORIZED, "rollout controls need 'Authorization: Bearer <token>'")

    def _read_json_body(self, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        # A JSON content type forces a CORS preflight in browsers, which this server never grants, so
        # a page on another origin cannot pause a rollout through an operator's browser.
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        raw = self.rfile.read(length) if length else b""
        self._body_pending = False
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    # -- responses

    def _send_static(self, name: str) -> None:
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in _STATIC_TYPES or "/" in name or name.startswith("."):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        resource = resources.files("publisher").joinpath("static", name)
        if not resource.is_file():
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        self._send(HTTPStatus.OK, resource.read_bytes(), _STATIC_TYPES[suffix])

    def _send_json(self, payload: object, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json")

    def _send_error_json(self, status: HTTPStatus, message: str, allow: str | None = None) -> None:
        extra = {"Allow": allow} if allow else {}
        body = json.dumps({"error": {"status": int(status), "message": message}}).encode()
        self._send(status, body, "application/json", extra)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        if self._body_pending:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Every 2 s poll would flood stderr at info; requests go to structlog at debug instead.
        log.debug("http_request", client=self.client_address[0], request=format % args)


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"give {key} once")
    return values[0]


def _find_rollout(rollouts: Sequence[RolloutStatus], rollout_id: str) -> RolloutStatus:
    for r in rollouts:
        if r.rollout_id == rollout_id:
            return r
    raise HttpError(HTTPStatus.NOT_FOUND, f"no rollout {rollout_id!r}")


# --- running it -----------------------------------------------------------------------------------


class HttpHandle:
    """A running server: ``url``, ``host`` and ``port`` (the real one when 0 was asked), ``stop()``."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host: str = str(host)
        self.port: int = int(port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket and join the serving thread; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()

    def __enter__(self) -> HttpHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http(
    view: FleetView,
    host: str = "127.0.0.1",
    port: int = 0,
    controls: Controls | None = None,
    *,
    token: str | None = None,
    intake: Intake | None = None,
) -> HttpHandle:
    """Serve ``view`` on ``host:port`` from a daemon thread and return at once.

    ``port=0`` picks a free port (read it back from ``handle.port``). ``controls`` enables the POST
    routes; ``token``, when given, is required on them as ``Authorization: Bearer TOKEN``. Binding to
    anything but loopback exposes the fleet to that network: put a token on it.
    """
    server = _Server((host, port), view, controls, token, intake)
    # A short poll interval only bounds how long stop() waits; idle cost is negligible.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"fleetbus-http-{port}", daemon=True
    )
    thread.start()
    handle = HttpHandle(server, thread)
    log.info("http_listening", url=handle.url)
    return handle


# --- the client side (``fleetbus rollout pause|resume|cancel|status`` over HTTP) --------------------


def fetch_json(base_url: str, path: str, *, timeout: float = 10.0) -> Any:
    """GET ``base_url + path`` and decode the JSON; an error answer raises ``RolloutError`` with its text."""
    return _call(base_url.rstrip("/") + path, "GET", None, {}, timeout)


def post_control(
    base_url: str,
    rollout_id: str,
    action: Action,
    *,
    by: str | None = None,
    reason: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Pause, resume or cancel a rollout through a running ``fleetbus serve``; returns its answer.

    Refusals (unknown rollout, a resume of a running rollout, a wrong token) raise ``RolloutError``
    carrying the server's message, so the CLI prints what the controller said.
    """
    if action not in ACTIONS:
        raise RolloutError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
    body = {k: v for k, v in (("by", by), ("reason", reason)) if v is not None}
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base_url.rstrip('/')}/api/rollouts/{quote(rollout_id, safe='')}/{action}"
    answer = _call(url, "POST", json.dumps(body).encode(), headers, timeout)
    if not isinstance(answer, dict):
        raise RolloutError(f"{url} answered something that is not a JSON object")
    return answer


def upload_blob(
    base_url: str, path: str, sha256: str, *, token: str | None = None, timeout: float = 300.0
) -> dict[str, Any]:
    """Upload a model file to ``fleetbus serve`` unless it already holds it; returns its answer."""
    url = f"{base_url.rstrip('/')}/api/blobs/{sha256}"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        found = _call(url, "GET", None, headers, timeout)
    except RolloutError as exc:
        if " 404 " not in str(exc):
            raise
    else:
        return dict(found)
    size = os.path.getsize(path)
    headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    with open(path, "rb") as body:
        answer = _call(url, "PUT", body, headers, timeout)  # type: ignore[arg-type]
    return dict(answer)


def submit_rollout(
    base_url: str, signed: SignedSubmission, *, token: str | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Post a signed rollout document; refusals raise ``RolloutError`` with the server's reason."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base_url.rstrip('/')}/api/rollouts"
    answer = _call(url, "POST", json.dumps(signed.to_json()).encode(), headers, timeout)
    if not isinstance(answer, dict):
        raise RolloutError(f"{url} answered something that is not a JSON object")
    return answer


def _call(url: str, method: str, data: bytes | None, headers: dict[str, str], timeout: float) -> Any:
    # urllib would also open file: and ftp: URLs; a server address is http(s) or a mistake.
    if urlsplit(url).scheme not in ("http", "https"):
        raise RolloutError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = str(exc.reason)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            message = json.loads(exc.read())["error"]["message"]
        raise RolloutError(f"{method} {url}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RolloutError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise RolloutError(f"{url} did not answer JSON") from None
