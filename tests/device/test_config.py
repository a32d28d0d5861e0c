"""device.toml parsing: defaults, paths, and errors that name the key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.config import load_settings
from device.errors import ConfigError
from schemas.messages import MQTT_PORT

KEY = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "device.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults_and_relative_paths(tmp_path: Path) -> None:
    """Only [device] id is required; state_dir and key files resolve against the file's folder."""
    s = load_settings(
        write(
            tmp_path, f'[device]\nid = "d1"\nstate_dir = "st"\n[trust]\npublisher_keys = ["{KEY}", "p.pub"]\n'
        )
    )
    assert s.device.id == "d1"
    assert s.state_path == tmp_path / "st"
    assert s.trust.publisher_keys == (KEY, str(tmp_path / "p.pub"))
    assert s.mqtt.port == MQTT_PORT
    assert s.inference.source == "synthetic"
    assert s.watchdog.window == 20


def test_full_config(tmp_path: Path) -> None:
    """Every section is read into typed settings."""
    s = load_settings(
        write(
            tmp_path,
            """
[device]
id = "d1"
groups = ["lab", "eu"]
ram_bytes = 1000
[mqtt]
host = "broker"
port = 8883
username = "d1"
password = "pw"
tls = true
cafile = "/etc/ca.pem"
keepalive = 15
[inference]
source = "npy:/data"
interval_s = 0
batch_max = 5
batch_interval_s = 2
[health]
interval_s = 3
[transfer]
window = 16
[gate]
latency_runs = 3
[watchdog]
window = 5
collapse_tolerance = -1
""",
        )
    )
    assert s.device.groups == ("lab", "eu")
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.tls, s.mqtt.cafile) == ("broker", 8883, True, "/etc/ca.pem")
    assert s.inference.interval_s == 0.0
    assert s.transfer.window == 16
    assert s.watchdog.collapse_tolerance == -1.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[device]\nid = "d1"\n[mqtt]\nprot = 1\n', "unknown keys prot"),
        ('[device]\nid = "d1"\n[mqqt]\n', "unknown sections mqqt"),
        ("[device]\n", "id is required"),
        ('[device]\nid = "a/b"\n', "MQTT syntax"),
        ('[device]\nid = "d"\ngroups = ["#"]\n', "group"),
        ('[device]\nid = "d"\n[mqtt]\nport = "x"\n', "integer"),
        ('[device]\nid = "d"\n[mqtt]\ntls = 1\n', "true or false"),
        ('[device]\nid = "d"\n[inference]\nsource = "camera"\n', "synthetic, npy:PATH"),
        ('[device]\nid = "d"\n[transfer]\nwindow = 0\n', "window"),
        ("[device\n", "not valid TOML"),
    ],
)
def test_bad_configs_say_what_to_fix(tmp_path: Path, text: str, words: str) -> None:
    """A typo or a bad value is a ConfigError naming it, never a silent default."""
    with pytest.raises(ConfigError, match=words):
        load_settings(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError with the path."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml")
