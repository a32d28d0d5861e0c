"""The configured embedded broker: settings from TOML, start/stop, and the ways to run it.

    [broker]
    host = "127.0.0.1"
    port = 1883                      # real deployments; tests pass a free port
    ws_port = 8080                   # optional WebSocket listener (path /mqtt)
    tls_port = 8883                  # optional TLS listener; needs certfile and keyfile
    certfile = "server.crt"
    keyfile = "server.key"
    cafile = "ca.crt"                # optional: clients may present certificates from this CA
    data_dir = "/var/lib/fleetbus"   # sessions and retained messages survive restarts and crashes
    registry = "registry.json"       # devices, operators, readers (broker/registry.py)
    allow_anonymous = false
    max_connections = 10000          # per listener; 0 = no limit
    max_payload_bytes = 1114112      # 1 MiB codec limit + 64 KiB
    keepalive_grace = 1.5            # silent for grace x keepalive -> disconnected, Will published
    max_inflight = 60000             # per connection: deliveries not yet written (QoS 0) or acked (1, 2)
    max_pending_bytes = 33554432     # per connection: their bytes (+1 KiB each); beyond either, drop + count
    max_queued = 10000               # per offline persistent session; beyond, drop + count
    session_expiry_s = 604800        # persistent sessions unused this long are removed

Relative paths are relative to the TOML file. Run it with ``fleetbus broker --config FILE`` (which
calls ``run_forever``), ``python -m broker.server FILE``, or, in tests and demos, ``run_in_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.connection import Limits
from broker.errors import BrokerConfigError
from broker.hardening import HardenedBroker
from broker.session_store import SessionStore
from schemas.codec import DEFAULT_MAX_BYTES
from schemas.messages import MQTT_PORT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = structlog.get_logger("fleetbus.broker")

# Every message fleetbus sends is decoded with the codec's limit (1 MiB), which the largest one, a
# 256 KiB chunk (schemas.messages.MAX_CHUNK_SIZE) plus its msgpack framing, sits far below. The
# broker admits anything the codec would accept plus 64 KiB, so a publisher that raises the codec
# limit slightly does not get disconnected for it, and no client can make the broker buffer more.
DEFAULT_MAX_PAYLOAD = DEFAULT_MAX_BYTES + 64 * 1024

_ANONYMOUS_PLUGIN = "broker.hardening.AllowAnonymousPlugin"


class BrokerSettings(BaseModel):
    """The ``[broker]`` table of the broker's TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=MQTT_PORT, ge=0, le=65535)
    ws_port: int | None = Field(default=None, ge=0, le=65535)
    tls_port: int | None = Field(default=None, ge=0, le=65535)
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None
    data_dir: Path | None = None
    registry: Path | None = None
    allow_anonymous: bool = False
    max_connections: int = Field(default=0, ge=0)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1024, le=256 * 1024 * 1024)
    keepalive_grace: float = Field(default=1.5, ge=1.0, le=10.0)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_inflight: int = Field(default=60_000, ge=1, le=65535)
    max_pending_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    max_queued: int = Field(default=10_000, ge=0)
    session_expiry_s: int | None = Field(default=7 * 24 * 3600, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> BrokerSettings:
        if self.tls_port is not None and (self.certfile is None or self.keyfile is None):
            raise ValueError("tls_port needs certfile and keyfile (make them with `fleetbus broker certs`)")
        if self.registry is None and not self.allow_anonymous:
            raise ValueError("no registry and allow_anonymous = false: nobody could connect; set one of them")
        return self

    @classmethod
    def from_toml(cls, path: Path | str) -> BrokerSettings:
        """Read the ``[broker]`` table; relative paths are taken relative to the file."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise BrokerConfigError(f"cannot read broker config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise BrokerConfigError(f"broker config {path} is not valid TOML: {exc}") from None
        table = data.get("broker")
        if not isinstance(table, dict):
            raise BrokerConfigError(f"broker config {path} has no [broker] table")
        for key in ("certfile", "keyfile", "cafile", "data_dir", "registry"):
            if isinstance(table.get(key), str):
                table[key] = str((path.parent / table[key]).resolve())
        return cls.from_mapping(table, source=str(path))

    @classmethod
    def from_mapping(cls, table: dict[str, Any], source: str = "settings") -> BrokerSettings:
        try:
            return cls.model_validate(table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'broker'}: {err['msg']}" for err in exc.errors()
            )
            raise BrokerConfigError(f"{source}: {problems}") from None

    def limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            keepalive_grace=self.keepalive_grace,
            connect_timeout=self.connect_timeout,
            max_inflight=self.max_inflight,
            max_pending_bytes=self.max_pending_bytes,
            max_queued=self.max_queued,
        )

    def amqtt_config(self, ports: dict[str, int] | None = None) -> dict[str, Any]:
        """The dict amqtt's Broker takes; ``ports`` overrides the configured ones (after binding 0)."""
        ports = ports or {}
        max_conn = self.max_connections or -1
        listeners: dict[str, Any] = {
            "default": {
                "type": "tcp",
                "bind": f"{self.host}:{ports.get('tcp', self.port)}",
                "max_connections": max_conn,
            }
        }
        if self.ws_port is not None:
            listeners["ws"] = {
                "type": "ws",
                "bind": f"{self.host}:{ports.get('ws', self.ws_port)}",
                "max_connections": max_conn,
            }
        if self.tls_port is not None:
            tls: dict[str, Any] = {
                "type": "tcp",
                "bind": f"{self.host}:{ports.get('tls', self.tls_port)}",
                "ssl": True,
                "certfile": str(self.certfile),
                "keyfile": str(self.keyfile),
                "max_connections": max_conn,
            }
            if self.cafile is not None:
                tls["cafile"] = str(self.cafile)
            listeners["tls"] = tls
        plugins: dict[str, Any]
        if self.registry is not None:
            # Imported here: the plugins pull in the registry and argon2, which anonymous runs skip.
            from broker.plugins import plugin_config

            plugins = plugin_config(self.registry, allow_anonymous=self.allow_anonymous)
        else:
            plugins = {_ANONYMOUS_PLUGIN: {}}
        return {
            "listeners": listeners,
            "plugins": plugins,
            "session_expiry_interval": self.session_expiry_s,
        }


def _free_ports(settings: BrokerSettings) -> dict[str, int]:
    """Resolve port 0 to a free port per listener so the bound ports can be reported."""
    import socket

    wanted = {"tcp": settings.port, "ws": settings.ws_port, "tls": settings.tls_port}
    ports: dict[str, int] = {}
    for name, port in wanted.items():
        if port is None:
            continue
        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((settings.host, 0))
                ports[name] = s.getsockname()[1]
        else:
            ports[name] = port
    return ports


class FleetbusBroker:
    """The hardened amqtt broker configured by ``BrokerSettings``; create and use it in one event loop."""

    def __init__(self, settings: BrokerSettings, *, extra_plugins: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.extra_plugins = extra_plugins or {}
        self.ports: dict[str, int] = {}
        self._broker: HardenedBroker | None = None

    @property
    def port(self) -> int:
        """The TCP listener's port."""
        return self.ports["tcp"]

    @property
    def amqtt(self) -> HardenedBroker:
        if self._broker is None:
            raise BrokerConfigError("the broker is not started")
        return self._broker

    @property
    def stats(self) -> Counter[str]:
        """Counters of refused, dropped and timed-out things since start (0 for anything not seen)."""
        return Counter(self._broker.stats) if self._broker is not None else Counter()

    async def start(self) -> None:
        self.ports = _free_ports(self.settings)
        store = SessionStore(self.settings.data_dir) if self.settings.data_dir is not None else None
        config = self.settings.amqtt_config(self.ports)
        config["plugins"] = {**config["plugins"], **self.extra_plugins}
        broker = HardenedBroker(config, limits=self.settings.limits(), store=store)
        try:
            await broker.start()
        except Exception as exc:
            if store is not None:
                store.close()
            raise BrokerConfigError(f"the broker could not start: {exc}") from None
        self._broker = broker
        log.info(
            "broker listening",
            host=self.settings.host,
            ports=self.ports,
            data_dir=str(self.settings.data_dir) if self.settings.data_dir else None,
            registry=str(self.settings.registry) if self.settings.registry else None,
            allow_anonymous=self.settings.allow_anonymous,
        )

    async def shutdown(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("broker stopped")


async def serve(settings: BrokerSettings, stop: asyncio.Event) -> None:
    """Run a broker until ``stop`` is set."""
    broker = FleetbusBroker(settings)
    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def run_forever(config_path: Path | str) -> None:
    """Run the broker of a TOML file until SIGTERM or SIGINT (``fleetbus broker --config``)."""
    settings = BrokerSettings.from_toml(config_path)
    # A broker holds many long-lived objects per connection (session, handler, queues, tasks); with
    # CPython's default threshold (700) young-generation collections run every few connections and
    # keep re-scanning them. A larger threshold is the usual server setting and cut the CPU of a
    # 5,000-client connect storm (bench/broker.py). Only in the dedicated broker process.
    gc.set_threshold(50_000, 20, 100)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())


@dataclass
class BrokerHandle:
    """A broker running in a background thread (tests, demos)."""

    settings: BrokerSettings
    ports: dict[str, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    broker: FleetbusBroker | None = None

    @property
    def port(self) -> int:
        return self.ports["tcp"]

    @property
    def stats(self) -> Counter[str]:
        return self.broker.stats if self.broker is not None else Counter()

    def stop(self) -> None:
        """Shut the broker down cleanly and join its thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(
    settings: BrokerSettings, timeout: float = 10.0, *, extra_plugins: dict[str, Any] | None = None
) -> BrokerHandle:
    """Start a broker in a daemon thread with its own event loop; returns once it listens.

    ``extra_plugins`` adds amqtt plugins (dotted path -> config) to the ones the settings imply.
    """
    handle = BrokerHandle(settings)
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        handle._loop = asyncio.get_running_loop()
        handle._stop = asyncio.Event()
        broker = FleetbusBroker(settings, extra_plugins=extra_plugins)
        try:
            await broker.start()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        handle.broker = broker
        handle.ports = dict(broker.ports)
        started.set()
        try:
            await handle._stop.wait()
        finally:
            await broker.shutdown()

    handle._thread = threading.Thread(target=asyncio.run, args=(main(),), name="fleetbus-broker", daemon=True)
    handle._thread.start()
    if not started.wait(timeout):
        raise BrokerConfigError(f"the broker did not start within {timeout}s")
    if failure:
        raise failure[0]
    return handle


def main(argv: list[str] | None = None) -> None:
    """``python -m broker.server CONFIG.toml``: the subprocess-friendly entry; SIGTERM stops it cleanly."""
    from schemas.logs import configure_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m broker.server CONFIG.toml", file=sys.stderr)
        raise SystemExit(2)
    configure_logging("info")
    try:
        run_forever(args[0])
    except BrokerConfigError as exc:
        print(f"fleetbus broker: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
