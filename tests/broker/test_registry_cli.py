"""``fleetbus device add|list|revoke|rotate`` and ``fleetbus broker user|certs|export-mosquitto``."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.registry import Registry
from broker.registry_cli import toml_dumps
from schemas.cli import cli

PUBKEY = "ab" * 32


Run = Callable[..., str]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Invoke the fleetbus CLI in tmp_path with $FLEETBUS_REGISTRY pointing there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEETBUS_REGISTRY", str(tmp_path / "registry.json"))
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) is ok, result.output
        return result.output

    return invoke


def _password(output: str) -> str:
    return next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("password: "))


def test_device_add_prints_once_and_writes_a_loadable_device_toml(run: Run, tmp_path: Path) -> None:
    """add prints the password, writes a 0600 device.toml the agent loads, and stores only hashes."""
    from device.config import load_settings

    out = run(
        "device",
        "add",
        "dev-01",
        "--group",
        "lab",
        "--group",
        "eu",
        "--broker-url",
        "mqtt://127.0.0.1:18830",
        "--pubkey",
        PUBKEY,
        "--out",
        "dev.toml",
    )
    password = _password(out)
    toml_path = tmp_path / "dev.toml"
    assert stat.S_IMODE(toml_path.stat().st_mode) == 0o600
    settings = load_settings(toml_path)
    assert settings.device.id == "dev-01"
    assert set(settings.device.groups) == {"lab", "eu"}
    assert (settings.mqtt.host, settings.mqtt.port) == ("127.0.0.1", 18830)
    assert (settings.mqtt.username, settings.mqtt.password, settings.mqtt.tls) == ("dev-01", password, False)
    assert settings.trust.publisher_keys == (PUBKEY,)
    assert password not in (tmp_path / "registry.json").read_text()
    assert Registry.load(tmp_path / "registry.json").verify("dev-01", password) is not None


def test_device_add_refuses_bad_input_without_registering(run: Run, tmp_path: Path) -> None:
    """A bad id, a bad URL or an existing output file is an error and registers nothing."""
    assert "Error" in run("device", "add", "bad/id", ok=False)
    assert "Error" in run("device", "add", "d1", "--broker-url", "http://x", ok=False)
    (tmp_path / "d1.toml").write_text("keep me")
    assert "exists" in run("device", "add", "d1", ok=False)
    assert (tmp_path / "d1.toml").read_text() == "keep me"
    assert json.loads(run("device", "list", "--json")) == []


def test_list_revoke_rotate_round_trip(run: Run, tmp_path: Path) -> None:
    """list shows roles and revocation; rotate --out rewrites the password in device.toml."""
    run("device", "add", "d1", "--group", "g1")
    run("broker", "user", "add", "ops", "--role", "operator")
    run("broker", "user", "add", "backend", "--role", "reader")
    rows = {r["id"]: r for r in json.loads(run("device", "list", "--json"))}
    assert {k: v["role"] for k, v in rows.items()} == {"d1": "device", "ops": "operator", "backend": "reader"}
    assert "argon2" not in json.dumps(rows)
    run("device", "revoke", "d1")
    assert "REVOKED" in run("device", "list")
    new = _password(run("device", "rotate", "d1", "--out", "d1.toml"))
    assert f'password = "{new}"' in (tmp_path / "d1.toml").read_text()
    assert json.loads(run("device", "list", "--json", "--role", "device"))[0]["revoked"] is False
    assert "no principal" in run("device", "revoke", "ghost", ok=False)


def test_broker_certs_and_export_mosquitto(run: Run, tmp_path: Path) -> None:
    """certs writes a CA and server pair; export-mosquitto writes the four Mosquitto files."""
    run("device", "add", "d1")
    out = run("broker", "certs", "tls")
    assert "server.pem" in out
    run("broker", "export-mosquitto", "mq", "--port", "18999", "--security", "file")
    conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
    assert "listener 18999 127.0.0.1" in conf
    assert "acl_file" in conf
    assert (tmp_path / "mq" / "passwords").read_text().startswith("d1:$7$")


def test_broker_without_config_or_subcommand_is_a_usage_error(run: Run) -> None:
    """`fleetbus broker` alone explains that it needs --config."""
    assert "--config" in run("broker", ok=False)


def test_toml_writer_escapes_strings() -> None:
    """The device.toml writer escapes quotes, backslashes and control characters."""
    import tomllib

    doc = {"t": {"s": 'a"b\\c\nd\u0001', "n": 3, "b": True, "l": ["x", "y"], "skip": None}}
    assert tomllib.loads(toml_dumps(doc)) == {
        "t": {"s": 'a"b\\c\nd\u0001', "n": 3, "b": True, "l": ["x", "y"]}
    }


def test_fleetbus_broker_config_runs_the_embedded_broker(tmp_path: Path) -> None:
    """`fleetbus broker --config` serves registry-authenticated clients and exits cleanly on SIGTERM."""
    from tests.broker.conftest import Client, make_registry
    from tests.helpers import free_port, wait_port

    creds = make_registry(tmp_path)
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {port}\nregistry = "{creds.registry.name}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", "from schemas.cli import main; main()", "broker", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        client = Client(port, "d1", "d1", creds.passwords["d1"])
        assert client.connect() == 0
        assert client.subscribe("fleetbus/v1/cmd/dev/d2") == 0x80
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
