"""operator.toml: how an operator (or the aggregator) reaches the broker, and which key signs.

    [mqtt]                      # the same keys as device.toml's [mqtt]
    host = "127.0.0.1"
    port = 1883
    username = "ops"            # optional
    password = "..."            # optional
    tls = false
    cafile = "ca.pem"           # optional, with tls = true

    [publisher]
    key = "keys/publisher.key"  # Ed25519 signing key from `fleetbus keys generate DIR`
    server = "http://127.0.0.1:8080"  # optional: `fleetbus serve --http`, where documents go
    token = "..."               # optional: its --token (Authorization: Bearer)

Relative paths are taken from the file's folder. Command-line options override the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from publisher.bus import BrokerAddress
from publisher.errors import ConfigError
from schemas.messages import MQTT_PORT

_MQTT_KEYS = {"host", "port", "username", "password", "tls", "cafile", "keepalive"}
_PUBLISHER_KEYS = {"key", "server", "token"}


@dataclass(frozen=True)
class OperatorConfig:
    address: BrokerAddress
    key: Path | None = None
    server: str | None = None
    token: str | None = None


def _resolve(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def load_operator_config(path: str | os.PathLike[str]) -> OperatorConfig:
    """Read operator.toml, or raise ConfigError saying what to fix."""
    p = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    base = p.parent.resolve()
    mqtt = raw.get("mqtt", {})
    publisher = raw.get("publisher", {})
    if not isinstance(mqtt, dict) or not isinstance(publisher, dict):
        raise ConfigError(f"{p}: [mqtt] and [publisher] must be tables")
    unknown = sorted((set(mqtt) - _MQTT_KEYS) | (set(publisher) - _PUBLISHER_KEYS))
    if unknown:
        raise ConfigError(f"{p}: unknown keys {', '.join(unknown)}")
    port = mqtt.get("port", MQTT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{p}: [mqtt] port must be a TCP port number, got {port!r}")
    cafile = mqtt.get("cafile")
    address = BrokerAddress(
        host=str(mqtt.get("host", "127.0.0.1")),
        port=port,
        username=mqtt.get("username"),
        password=mqtt.get("password"),
        tls=bool(mqtt.get("tls", False)),
        ca_file=str(_resolve(cafile, base)) if cafile else None,
    )
    key = publisher.get("key")
    server, token = publisher.get("server"), publisher.get("token")
    return OperatorConfig(
        address,
        _resolve(key, base) if key else None,
        str(server) if server else None,
        str(token) if token else None,
    )
