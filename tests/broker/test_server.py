"""broker/server.py: settings from TOML, the thread and subprocess entries, listeners, persistence."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.errors import BrokerConfigError
from broker.server import DEFAULT_MAX_PAYLOAD, BrokerSettings, run_in_thread
from broker.testing import PahoClient, embedded_broker
from tests.helpers import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


def write_config(directory: Path, **values: object) -> Path:
    lines = ["[broker]"]
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    path = directory / "broker.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ settings


def test_settings_read_toml_and_resolve_relative_paths(tmp_path: Path) -> None:
    """Paths in the TOML are relative to the file; unset keys take the documented defaults."""
    path = write_config(tmp_path, port=1234, data_dir="state", registry="reg.json", max_connections=5)
    settings = BrokerSettings.from_toml(path)
    assert settings.port == 1234
    assert settings.data_dir == (tmp_path / "state").resolve()
    assert settings.registry == (tmp_path / "reg.json").resolve()
    assert settings.host == "127.0.0.1"
    assert settings.allow_anonymous is False
    assert settings.keepalive_grace == 1.5
    assert settings.max_payload_bytes == DEFAULT_MAX_PAYLOAD


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[broker]\nallow_anonymous = true\nportt = 1\n", "portt"),
        ("[broker]\nallow_anonymous = true\nport = 70000\n", "port"),
        ("[broker\n", "not valid TOML"),
        ("[other]\n", "no [broker] table"),
        ("[broker]\n", "nobody could connect"),
        ("[broker]\nallow_anonymous = true\ntls_port = 8883\n", "certfile"),
    ],
    ids=["unknown-key", "port-range", "bad-toml", "no-table", "no-auth", "tls-without-cert"],
)
def test_bad_settings_raise_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    """A bad config file raises BrokerConfigError naming the problem."""
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BrokerConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        BrokerSettings.from_toml(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist raises BrokerConfigError, not OSError."""
    with pytest.raises(BrokerConfigError, match="cannot read"):
        BrokerSettings.from_toml(tmp_path / "nope.toml")


def test_registry_mode_lists_the_fleetbus_plugins(tmp_path: Path) -> None:
    """With a registry, amqtt's config names the fleetbus auth and ACL plugins and no anonymous plugin."""
    settings = BrokerSettings(registry=tmp_path / "r.json", port=1)
    plugins = settings.amqtt_config()["plugins"]
    assert "broker.plugins.FleetbusAuthPlugin" in plugins
    assert "broker.plugins.FleetbusAclPlugin" in plugins
    assert "broker.hardening.AllowAnonymousPlugin" not in plugins


# ------------------------------------------------------------------ running


def test_run_in_thread_serves_and_stops() -> None:
    """run_in_thread returns a handle with the bound port; stop() closes the listener."""
    handle = run_in_thread(BrokerSettings(port=0, allow_anonymous=True))
    port = handle.port
    with PahoClient(port, "a", subscribe=[("t", 1)]) as client:
        client.publish("t", b"hi", qos=1)
        assert client.get().payload == b"hi"
    handle.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_port_in_use_is_a_config_error() -> None:
    """Starting on a port someone else holds raises BrokerConfigError."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerConfigError, match="could not start"):
            run_in_thread(BrokerSettings(port=port, allow_anonymous=True))


def test_websocket_listener_carries_mqtt() -> None:
    """ws_port adds a WebSocket listener that paho can use (path /mqtt)."""
    ws_port = free_port()
    with embedded_broker(ws_port=ws_port) as handle:
        received: list[bytes] = []
        with PahoClient(handle.port, "tcp-sub", subscribe=[("ws/t", 1)]) as sub:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws-pub", transport="websockets")
            client.ws_set_options(path="/mqtt")
            client.connect("127.0.0.1", ws_port)
            client.loop_start()
            client.publish("ws/t", b"over ws", qos=1).wait_for_publish(10)
            received.append(sub.get().payload)
            client.disconnect()
            client.loop_stop()
        assert received == [b"over ws"]


def test_tls_listener_with_dev_certificates(tmp_path: Path) -> None:
    """tls_port with `fleetbus broker certs` files accepts a client that trusts the development CA."""
    from broker.certs import make_dev_certs

    paths = make_dev_certs(tmp_path)
    tls_port = free_port()
    tls = {"tls_port": tls_port, "certfile": paths.server_cert, "keyfile": paths.server_key}
    with (
        embedded_broker(**tls) as handle,
        PahoClient(handle.port, "plain-sub", subscribe=[("tls/t", 1)]) as sub,
    ):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-pub")
        client.tls_set(ca_certs=str(paths.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.connect("localhost", tls_port)
        client.loop_start()
        client.publish("tls/t", b"secret", qos=1).wait_for_publish(10)
        assert sub.get().payload == b"secret"
        client.disconnect()
        client.loop_stop()


def _start_subprocess(config: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.server", str(config)], env=env, stderr=subprocess.PIPE
    )
    try:
        wait_port(port, timeout=20)
    except TimeoutError:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(err.decode(errors="replace")) from None
    return proc


def test_sigterm_stops_the_subprocess_cleanly(tmp_path: Path) -> None:
    """`python -m broker.server FILE` exits 0 on SIGTERM, and its retained messages survive."""
    port = free_port()
    config = write_config(tmp_path, port=port, allow_anonymous=True, data_dir="data")
    proc = _start_subprocess(config, port)
    with PahoClient(port, "p") as pub:
        pub.publish("fleetbus/v1/desired/grp/g1", b"deploy", qos=1, retain=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    proc = _start_subprocess(config, port)
    try:
        with PahoClient(port, "s") as sub:
            sub.subscribe([("fleetbus/v1/desired/#", 1)])
            message = sub.get()
        assert (message.topic, message.payload, message.retain) == (
            "fleetbus/v1/desired/grp/g1",
            b"deploy",
            True,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_retained_and_queued_messages_survive_sigkill(tmp_path: Path) -> None:
    """After SIGKILL of the broker process, retained messages and offline queues are still there."""
    port = free_port()
    config = write_config(tmp_path, port=port, allow_anonymous=True, data_dir="data")
    proc = _start_subprocess(config, port)
    try:
        PahoClient(port, "dev-1", clean=False, username="dev-1", subscribe=[("cmd/dev-1", 1)]).close()
        with PahoClient(port, "ops") as ops:
            ops.ping_self("ops/marker")  # gives the broker time to see dev-1's DISCONNECT
            ops.publish("fleetbus/v1/desired/dev/dev-1", b"deploy-7", qos=1, retain=True)
            ops.publish("cmd/dev-1", b"rebirth", qos=1)
            # The PUBACK comes before the broker stores the message; a marker round trip orders them.
            ops.ping_self("ops/marker")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
    proc = _start_subprocess(config, port)
    try:
        with PahoClient(port, "dev-1", clean=False, username="dev-1") as device:
            assert device.session_present
            assert device.get().payload == b"rebirth"
            device.subscribe([("fleetbus/v1/desired/dev/dev-1", 1)])
            assert device.get().payload == b"deploy-7"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_registry_mode_authenticates_and_keeps_acl_across_restart(tmp_path: Path) -> None:
    """With a registry: anonymous is refused, a device's persistent session and queue survive a restart."""
    from broker.registry import Registry

    registry_path = tmp_path / "registry.json"
    registry = Registry.load(registry_path)
    device_pw = registry.add("d1", "device", ["g1"])
    ops_pw = registry.add("ops", "operator")
    settings = BrokerSettings(port=0, registry=registry_path, data_dir=tmp_path / "data")
    cmd = "fleetbus/v1/cmd/dev/d1"
    with run_in_thread(settings) as handle:
        with pytest.raises(ConnectionRefusedError, match="refused"):
            PahoClient(handle.port, "anon").close()
        device = PahoClient(handle.port, "d1", clean=False, username="d1", password=device_pw)
        assert device.subscribe([(cmd, 1), ("fleetbus/v1/cmd/dev/d2", 1)]) == [1, 0x80]
        device.close()
    with run_in_thread(settings) as handle:
        with PahoClient(handle.port, "ops", username="ops", password=ops_pw) as ops:
            ops.publish(cmd, b"rebirth", qos=1)
            ops.ping_self("fleetbus/v1/cmd/dev/ops-marker")
        with PahoClient(handle.port, "d1", clean=False, username="d1", password=device_pw) as device:
            assert device.session_present
            assert device.get().payload == b"rebirth"
