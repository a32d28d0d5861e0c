"""Broker fixtures: a registry with one principal of each role, and a running broker of either kind.

``broker_under_test`` is parametrized over "amqtt" (fleetbus's embedded broker, broker/server.py,
with the registry) and "mosquitto" (a real ``mosquitto -c`` subprocess configured by ``fleetbus
broker export-mosquitto`` from the same registry); the Mosquitto half is skipped with a reason when
the binary is missing. ``start_amqtt``, ``start_stock_amqtt`` and ``start_mosquitto`` are plain
context managers yielding a port, so other test packages can reuse them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import argon2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.mosquitto import MosquittoSettings, export
from broker.plugins import plugin_config
from broker.registry import Registry
from tests.helpers import free_port, stock_amqtt, wait_port

MOSQUITTO = shutil.which("mosquitto")
NO_MOSQUITTO = "Debian's mosquitto binary is not installed (apt-get install mosquitto); .ci/run installs it"
CONNECT_TIMEOUT = 10.0
# paho-mqtt 2 reports an MQTT 3.1.1 CONNACK code as the matching MQTT 5 reason code:
# 5 (not authorised) as 135 and 4 (bad user name or password) as 134.
NOT_AUTHORIZED = 135
BAD_CREDENTIALS = 134
REFUSED = (NOT_AUTHORIZED, BAD_CREDENTIALS)

DEVICE_GROUPS = {"d1": ("g1",), "d2": ("g2",)}
OPERATOR = "ops"
READER = "backend"


@dataclass
class Credentials:
    """The registry file and the password of every principal in it."""

    registry: Path
    passwords: dict[str, str] = field(default_factory=dict)


# Real argon2id at its cheapest: the broker verifies with the parameters stored in each hash, so tests
# that connect hundreds of times stay fast. Production hashes use registry.default_hasher().
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def make_registry(directory: Path) -> Credentials:
    """A registry with devices d1 (group g1) and d2 (g2), operator ``ops`` and reader ``backend``."""
    path = directory / "registry.json"
    registry = Registry.load(path, FAST_HASHER)
    creds = Credentials(path)
    for dev, groups in DEVICE_GROUPS.items():
        creds.passwords[dev] = registry.add(dev, "device", groups)
    creds.passwords[OPERATOR] = registry.add(OPERATOR, "operator")
    creds.passwords[READER] = registry.add(READER, "reader")
    return creds


def amqtt_config(port: int, registry: Path, **listeners: dict[str, Any]) -> dict[str, Any]:
    """A stock amqtt config with the fleetbus plugins; extra listeners by name."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}, **listeners},
        "plugins": plugin_config(registry),
    }


@contextlib.contextmanager
def start_stock_amqtt(
    registry: Path, port: int | None = None, config: dict[str, Any] | None = None
) -> Iterator[int]:
    """Unmodified amqtt with only the fleetbus auth and ACL plugins, in a thread; yields its port."""
    port = port or free_port()
    with stock_amqtt(port, config or amqtt_config(port, registry)) as p:
        wait_port(p)
        yield p


@contextlib.contextmanager
def start_amqtt(registry: Path, port: int = 0, **settings: Any) -> Iterator[int]:
    """fleetbus's embedded broker (broker/server.py) with this registry, in a thread; yields its port."""
    from broker.server import BrokerSettings, run_in_thread

    config = BrokerSettings(host="127.0.0.1", port=port, registry=registry, **settings)
    with run_in_thread(config) as handle:
        yield handle.port


@contextlib.contextmanager
def run_mosquitto(
    tmpdir: Path, registry_path: Path, port: int | None = None, **settings: Any
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Export the registry for Mosquitto into ``tmpdir/mosquitto`` and run it; yields (port, process).

    ``settings`` go to MosquittoSettings (e.g. ``security="file"``). The process is SIGKILLed at exit.
    """
    if MOSQUITTO is None:
        pytest.skip(NO_MOSQUITTO)
    port = port or free_port()
    conf_dir = tmpdir / "mosquitto"
    export_for_test(registry_path, conf_dir, port, **settings)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf_dir / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        try:
            wait_port(port)
        except TimeoutError:
            log = conf_dir / "mosquitto.log"
            tail = log.read_text()[-2000:] if log.exists() else "(no log)"
            raise RuntimeError(
                f"mosquitto did not listen on {port} (exit code {proc.poll()}):\n{tail}"
            ) from None
        yield port, proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def export_for_test(registry_path: Path, conf_dir: Path, port: int, **settings: Any) -> None:
    """export-mosquitto with a log file, and ``user root`` when tests run as root (Mosquitto would
    otherwise drop to a user that cannot read the test's directory)."""
    user = "root" if os.geteuid() == 0 else None
    conf_dir.mkdir(parents=True, exist_ok=True)
    export(
        Registry.load(registry_path),
        conf_dir,
        MosquittoSettings(port=port, user=user, log_file=conf_dir / "mosquitto.log", **settings),
    )


@contextlib.contextmanager
def start_mosquitto(
    tmpdir: Path, registry_path: Path, port: int | None = None, **settings: Any
) -> Iterator[int]:
    """A real Mosquitto configured from the registry by export-mosquitto; yields its port."""
    with run_mosquitto(tmpdir, registry_path, port, **settings) as (bound, _):
        yield bound


@dataclass
class BrokerUnderTest:
    kind: str
    port: int
    creds: Credentials
    tmpdir: Path


@pytest.fixture(scope="module")
def module_creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """One registry per test module (argon2 makes principals slow to create)."""
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module", params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_under_test(
    request: pytest.FixtureRequest, module_creds: Credentials, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerUnderTest]:
    """A running broker of each kind, sharing one registry."""
    tmpdir = tmp_path_factory.mktemp(request.param)
    if request.param == "amqtt":
        with start_amqtt(module_creds.registry) as port:
            yield BrokerUnderTest("amqtt", port, module_creds, tmpdir)
    else:
        with start_mosquitto(tmpdir, module_creds.registry) as port:
            yield BrokerUnderTest("mosquitto", port, module_creds, tmpdir)


# --- paho clients --------------------------------------------------------------------------------


class Client:
    """A paho-mqtt client on a background loop, with queues for CONNACK, SUBACK, PUBACK and messages."""

    def __init__(
        self, port: int, client_id: str, username: str | None, password: str | None, **kw: Any
    ) -> None:
        self.port = port
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=kw.pop("clean_session", True),
            transport=kw.pop("transport", "tcp"),
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[int]]] = queue.Queue()
        self.pubacks: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnected = threading.Event()
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(
            (mid, [int(r.value) for r in rcs])
        )
        self.paho.on_publish = lambda c, u, mid, rc, p: self.pubacks.put(mid)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.on_disconnect = self._on_disconnect

    # paho's loop thread reconnects on its own; these tests want each refusal and drop to stay final.
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connacks.put(rc)
        if rc.is_failure:
            client.disconnect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnected.set()
        client.disconnect()

    def connect(self, keepalive: int = 30) -> int:
        """Connect and return the CONNACK reason code (0 = accepted, see REFUSED)."""
        self.paho.connect("127.0.0.1", self.port, keepalive=keepalive)
        self.paho.loop_start()
        rc = self.connacks.get(timeout=CONNECT_TIMEOUT)
        return int(rc.value)

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the SUBACK code for the filter (0x80 = refused)."""
        _, mid = self.paho.subscribe(topic_filter, qos)
        while True:
            got_mid, codes = self.subacks.get(timeout=CONNECT_TIMEOUT)
            if got_mid == mid:
                return codes[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait for the PUBACK (which amqtt sends even for a denied publish)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(CONNECT_TIMEOUT)
            assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, payload: bytes, timeout: float = CONNECT_TIMEOUT) -> list[mqtt.MQTTMessage]:
        """Collect messages until one with ``payload`` arrives; returns all seen, that one last."""
        seen = []
        while True:
            msg = self.messages.get(timeout=timeout)
            seen.append(msg)
            if msg.payload == payload:
                return seen

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients made through this list are closed at the end of the test."""
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connect_as(
    made: list[Client], port: int, creds: Credentials, principal: str, client_id: str | None = None, **kw: Any
) -> Client:
    """A connected client for ``principal`` (client id = principal id unless given)."""
    c = Client(port, client_id or principal, principal, creds.passwords[principal], **kw)
    made.append(c)
    rc = c.connect()
    assert rc == 0, f"{principal} was refused (CONNACK {rc})"
    return c
