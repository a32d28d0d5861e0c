"""device.toml -> typed settings.

    [device]
    id = "dev-01"                  # one topic level: letters, digits, . _ : -
    groups = ["lab", "eu"]
    state_dir = "/var/lib/fleetbus"   # slots, staging, state.json
    ram_bytes = 0                  # RAM to advertise for compatibility checks; 0 = MemTotal

    [mqtt]
    host = "127.0.0.1"
    port = 1883
    username = "dev-01"            # optional
    password = "..."               # optional
    tls = false
    cafile = "ca.pem"              # optional, with tls = true
    keepalive = 30

    [trust]
    publisher_keys = ["<64 hex digits>", "/etc/fleetbus/publisher.pub"]

    [inference]
    source = "synthetic"           # or "npy:PATH" (file or directory) or "socket:PATH" (unix datagram)
    interval_s = 0.1               # pause between inferences; 0 runs flat out
    batch_max = 50                 # results per message ...
    batch_interval_s = 1.0         # ... or per this many seconds, whichever comes first

    [health]
    interval_s = 10.0

    [transfer]
    window = 64                    # chunks asked for at once (flow control)
    fetch_timeout_s = 2.0          # silence before asking again (then backoff with jitter)
    fetch_backoff_max_s = 30.0
    settle_s = 0.25                # a pause this long in a flowing download asks for the rest now
    fsync_every = 8                # chunks written between fsyncs of the staging file
    accept_push = true             # take the first chunks pushed with a live deploy (no fetch round trip)

    [gate]
    latency_runs = 5               # invokes whose median is held against the latency budget

    [watchdog]
    window = 20                    # inferences judged after a commit
    max_error_ratio = 0.1
    collapse_tolerance = 0.0       # negative disables the "outputs collapsed" check
    max_resumes = 3                # restarts in one state before a crash loop is declared

Unknown sections and keys are errors, so a typo never silently means a default.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from device.errors import ConfigError
from schemas.constants import MQTT_PORT
from schemas.errors import TopicError
from schemas.topics import validate_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib


@dataclass(frozen=True)
class DeviceSection:
    id: str
    groups: tuple[str, ...] = ()
    state_dir: str = "fleetbus-state"
    ram_bytes: int = 0


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = MQTT_PORT
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cafile: str | None = None
    keepalive: int = 30


@dataclass(frozen=True)
class TrustSection:
    publisher_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceSection:
    source: str = "synthetic"
    interval_s: float = 0.1
    batch_max: int = 50
    batch_interval_s: float = 1.0


@dataclass(frozen=True)
class HealthSection:
    interval_s: float = 10.0


@dataclass(frozen=True)
class TransferSection:
    window: int = 64
    fetch_timeout_s: float = 2.0
    fetch_backoff_max_s: float = 30.0
    settle_s: float = 0.25
    fsync_every: int = 8
    accept_push: bool = True


@dataclass(frozen=True)
class GateSection:
    latency_runs: int = 5


@dataclass(frozen=True)
class WatchdogSection:
    window: int = 20
    max_error_ratio: float = 0.1
    collapse_tolerance: float = 0.0
    max_resumes: int = 3


@dataclass(frozen=True)
class Settings:
    device: DeviceSection
    mqtt: MqttSection = field(default_factory=MqttSection)
    trust: TrustSection = field(default_factory=TrustSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    health: HealthSection = field(default_factory=HealthSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    gate: GateSection = field(default_factory=GateSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)

    @property
    def state_path(self) -> Path:
        return Path(self.device.state_dir)


_SECTIONS: dict[str, type[Any]] = {
    "device": DeviceSection,
    "mqtt": MqttSection,
    "trust": TrustSection,
    "inference": InferenceSection,
    "health": HealthSection,
    "transfer": TransferSection,
    "gate": GateSection,
    "watchdog": WatchdogSection,
}
_T = TypeVar("_T")


def _coerce(section: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    where = f"[{section}] {key}"
    if "tuple" in annotation:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _section(name: str, cls: type[_T], raw: Any, base: Path | None) -> _T:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {', '.join(unknown)}; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = known[key]
        values[key] = _coerce(name, key, value, f.default, str(f.type))
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{name}] is incomplete: {exc}") from None


def settings_from_dict(raw: dict[str, Any], base: Path | None = None) -> Settings:
    """Build settings from parsed TOML; relative paths are taken from ``base`` (the file's folder)."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown sections {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
    if "device" not in raw or "id" not in raw.get("device", {}):
        raise ConfigError("[device] id is required")
    parts = {name: _section(name, cls, raw[name], base) for name, cls in _SECTIONS.items() if name in raw}
    dev: DeviceSection = parts["device"]
    try:
        validate_id(dev.id)
        for g in dev.groups:
            validate_id(g, "group")
    except TopicError as exc:
        raise ConfigError(f"[device] {exc}") from None
    if base is not None:
        # replace(), not the constructors: a field added to a section later is carried over too.
        parts["device"] = replace(dev, state_dir=_resolve(dev.state_dir, base))
        if "trust" in parts:
            keys = tuple(k if _is_hex_key(k) else _resolve(k, base) for k in parts["trust"].publisher_keys)
            parts["trust"] = replace(parts["trust"], publisher_keys=keys)
        if "mqtt" in parts and parts["mqtt"].cafile:
            parts["mqtt"] = replace(parts["mqtt"], cafile=_resolve(parts["mqtt"].cafile, base))
    settings = Settings(**parts)
    _validate(settings)
    return settings


def _is_hex_key(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def _validate(s: Settings) -> None:
    src = s.inference.source
    if not (src == "synthetic" or src.startswith(("npy:", "socket:"))):
        raise ConfigError(f"[inference] source {src!r}: use synthetic, npy:PATH or socket:PATH")
    if s.inference.batch_max < 1:
        raise ConfigError("[inference] batch_max must be at least 1")
    if not 1 <= s.transfer.window <= 1024:
        raise ConfigError("[transfer] window must be between 1 and 1024")
    if s.watchdog.window < 2:
        raise ConfigError("[watchdog] window must be at least 2")
    if not 0 < s.mqtt.port < 65536:
        raise ConfigError(f"[mqtt] port {s.mqtt.port} is not a TCP port")


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and check device.toml, or raise ConfigError saying what to fix."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return settings_from_dict(raw, p.parent.resolve())
