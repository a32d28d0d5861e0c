"""The agent's lean process (`fleetbus device run` execs `python -m device run`), and the agent over TLS."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.certs import make_dev_certs
from device.entry import parse_args
from schemas import topics
from schemas.cli import lean_device_argv
from tests.device.conftest import AgentProc, Keys, Rig, write_config
from tests.helpers import free_port, stock_amqtt


def test_device_run_command_lines_map_to_the_lean_entry() -> None:
    """`device run` with its options (and the global log options) becomes `python -m device run ...`."""
    assert lean_device_argv(["device", "run", "--config", "d.toml"]) == ["run", "--config", "d.toml"]
    assert lean_device_argv(["--log-level", "warning", "--log-json", "device", "run"]) == [
        "run",
        "--log-level",
        "warning",
        "--log-json",
    ]
    assert lean_device_argv(["device", "run", "--help"]) is None  # click renders help
    assert lean_device_argv(["device", "add", "d1"]) is None
    assert lean_device_argv(["serve"]) is None
    assert lean_device_argv([]) is None


def test_lean_entry_parses_its_options_and_refuses_unknown_ones() -> None:
    """The lean entry reads --config, --log-level (both spellings) and --log-json; anything else exits."""
    assert parse_args(["run", "--config=a.toml", "--log-level", "debug", "--log-json"]) == (
        Path("a.toml"),
        "debug",
        True,
    )
    assert parse_args(["run"]) == (Path("device.toml"), "info", False)
    with pytest.raises(SystemExit):
        parse_args(["run", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(["walk"])


def test_device_run_process_becomes_the_lean_entry(rig: Rig) -> None:
    """`fleetbus device run` execs `python -m device run` in the same process, which then serves."""
    agent = rig.agent("lean-1").start()
    rig.observer.wait(lambda: rig.observer.of("lean-1", "birth"), 120, "birth of lean-1")
    assert agent.proc is not None
    cmdline = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:4] == [b"-m", b"device", b"run"], cmdline


def test_agent_with_tls_connects_over_a_tls_listener(tmp_path: Path, keys: Keys) -> None:
    """An agent with `tls = true` and the CA file connects to a TLS-only broker and publishes its birth."""
    paths = make_dev_certs(tmp_path / "certs")
    port = free_port()
    config = {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"127.0.0.1:{port}",
                "ssl": True,
                "certfile": str(paths.server_cert),
                "keyfile": str(paths.server_key),
            }
        },
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    with stock_amqtt(port, config):
        births: list[bytes] = []
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-watch-{time.monotonic_ns()}")
        watcher.tls_set(ca_certs=str(paths.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        watcher.on_message = lambda c, u, msg: births.append(bytes(msg.payload))
        watcher.connect("127.0.0.1", port)
        watcher.subscribe(topics.device_stream("tls-1", topics.DeviceStream.BIRTH), qos=1)
        watcher.loop_start()
        state = tmp_path / "tls-1"
        state.mkdir()
        cfg = write_config(tmp_path / "tls-1.toml", "tls-1", port, [keys.public_hex], state)
        cfg.write_text(
            cfg.read_text().replace(
                "keepalive = 10\n", f'keepalive = 10\ntls = true\ncafile = "{paths.ca_cert}"\n'
            )
        )
        agent = AgentProc("tls-1", cfg, state, tmp_path / "tls-1.log")
        try:
            agent.start()
            deadline = time.monotonic() + 120
            while not births and time.monotonic() < deadline:
                assert agent.proc is not None
                assert agent.proc.poll() is None, agent.tail()
                time.sleep(0.05)
            assert births, agent.tail()
        finally:
            agent.stop()
            watcher.disconnect()
            watcher.loop_stop()
