"""The same bus on Mosquitto: mosquitto.conf plus credentials and ACLs from the same registry.

``export()`` writes four files into one directory:

* ``passwords`` and ``acl``: Mosquitto's classic ``password_file`` / ``acl_file``;
* ``dynamic-security.json``: the same principals and rules for Mosquitto's dynamic-security plugin;
* ``mosquitto.conf``, which uses the plugin when it is installed (``security="dynsec"``, the default
  when the .so is found) and the two classic files otherwise (``security="file"``).

Why two forms: Mosquitto 2.0's ``acl_file`` never checks a SUBSCRIBE (``security_default.c``:
"FIXME - implement ACL subscription strings"); it grants every filter and only filters messages at
delivery. The dynamic-security plugin checks subscriptions (``subscribePattern`` uses the same
containment rule as ``broker.acl.covers``) and answers a denied one with SUBACK 0x80, as our embedded
broker does. With ``acl_file`` the published-to and delivered topics are still exactly ours.

* **Passwords.** The registry keeps, next to each argon2 hash, a PBKDF2-SHA512 hash in Mosquitto's
  ``$7$iterations$salt$hash`` format, made when the password was generated (``add``/``rotate``), and
  the dynamic-security file takes the same three parts. Export needs no plaintext and no rotation.
  Revoked principals are left out of every file.
* **ACL.** One ``user`` block (one role) per principal, listing exactly the filters
  ``broker.acl.rules()`` grants. No ``pattern`` lines: Mosquitto applies a pattern to *every* user, so
  ``pattern write fleetbus/v1/dev/%u/state`` would let a reader or operator named ``x`` publish as a
  device ``x``. Explicit lines give the same decisions as ``acl.decide`` and are looked up per user.
* **Limits.** Set on purpose, see the comments in the written file.

After ``fleetbus device revoke`` or ``rotate``: export again, then send SIGHUP (``security="file"``
re-reads both files) or restart Mosquitto (the plugin reads its file at start).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker import acl
from broker.errors import ExportError
from broker.registry import Principal, Registry, Role
from schemas.codec import DEFAULT_MAX_BYTES
from schemas.messages import MQTT_PORT

log = structlog.get_logger("fleetbus.broker.mosquitto")

CONF_NAME = "mosquitto.conf"
PASSWORD_NAME = "passwords"  # noqa: S105 - a file name, not a password
ACL_NAME = "acl"
DYNSEC_NAME = "dynamic-security.json"
DYNSEC_PLUGIN_PATHS = (
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
)
# Topic (<= ~200 bytes for our tree), packet id and fixed header on top of the largest payload.
PACKET_HEADROOM = 4096


def find_dynsec_plugin() -> Path | None:
    """The dynamic-security plugin shipped with Mosquitto 2 (Debian: package mosquitto), if present."""
    return next((p for p in DYNSEC_PLUGIN_PATHS if p.exists()), None)


@dataclass(frozen=True)
class MosquittoSettings:
    """What goes into mosquitto.conf besides the registry."""

    port: int = MQTT_PORT
    security: str = "auto"  # "dynsec", "file", or "auto" (dynsec when the plugin is installed)
    dynsec_plugin: Path | None = None  # default: find_dynsec_plugin()
    bind: str = "127.0.0.1"
    max_payload: int = DEFAULT_MAX_BYTES
    # A lagging subscriber (the publisher's service, an aggregator, a slow board) must not lose QoS 1
    # messages: Mosquitto's default of 1,000 queued messages per client dropped 74% of 160k QoS 1
    # telemetry messages to one slow subscriber here. 100,000 messages of ~200 B is ~20 MB per client.
    max_queued_messages: int = 100_000
    # Bytes bound the same queue for chunks (up to 256 KiB each): 256 MiB holds a whole large model
    # for a device that is behind, and stops a few stalled clients from exhausting the broker.
    max_queued_bytes: int = 256 * 1024 * 1024
    # A subscriber's throughput is at most max_inflight / round trip. The default of 20 throttles the
    # one service subscriber that receives telemetry from thousands of devices; 100 keeps loopback and
    # LAN round trips off the critical path. Devices still bound their own load with their fetch window.
    max_inflight_messages: int = 100
    persistence_dir: Path | None = None  # default: DIR/data
    # Persistent sessions of devices gone for good would otherwise keep queueing forever.
    persistent_client_expiration: str = "30d"
    tls_port: int | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    ws_port: int | None = None
    user: str | None = None  # Mosquitto started as root drops to this user ("mosquitto" if unset)
    log_file: Path | None = None  # default: stderr


def render_conf(settings: MosquittoSettings, directory: Path) -> str:
    """The text of mosquitto.conf, with absolute paths into ``directory``."""
    directory = directory.resolve()
    data = (settings.persistence_dir or directory / "data").resolve()
    security, plugin = _security(settings)
    lines = [
        "# Written by `fleetbus broker export-mosquitto` from the registry: regenerate, do not edit.",
        "per_listener_settings false",
        "allow_anonymous false",
    ]
    if security == "dynsec":
        lines += [
            "# The dynamic-security plugin checks SUBSCRIBE too (acl_file does not) and answers SUBACK 0x80.",
            "# After a revoke or rotate: export again and restart mosquitto.",
            f"plugin {plugin}",
            f"plugin_opt_config_file {directory / DYNSEC_NAME}",
        ]
    else:
        lines += [
            "# acl_file checks publishes and deliveries but grants every SUBSCRIBE (Mosquitto 2.0).",
            "# After a revoke or rotate: export again, then send SIGHUP to mosquitto.",
            f"password_file {directory / PASSWORD_NAME}",
            f"acl_file {directory / ACL_NAME}",
        ]
    lines += [
        "",
        "# Retained desired state, birth/death and queued QoS 1 messages survive a restart.",
        "persistence true",
        f"persistence_location {data}",
        "autosave_interval 30",
        f"persistent_client_expiration {settings.persistent_client_expiration}",
        "",
        "# Mosquitto's stock limit (1,000) dropped 74% of QoS 1 messages to a lagging subscriber.",
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        "# Throughput per subscriber is at most max_inflight / round trip; 20 (stock) throttles the one",
        "# service subscriber that hears thousands of devices.",
        f"max_inflight_messages {settings.max_inflight_messages}",
        "# Our largest message (a chunk or a manifest) plus headroom for topic and headers; larger packets",
        "# are refused and the client is disconnected, as on the embedded broker.",
        f"max_packet_size {settings.max_payload + PACKET_HEADROOM}",
        "set_tcp_nodelay true",
        "",
    ]
    if settings.user:
        lines.append(f"user {settings.user}")
    if settings.log_file:
        lines += [
            f"log_dest file {settings.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
    else:
        lines += ["log_dest stderr"]
    lines += ["connection_messages true", "", f"listener {settings.port} {settings.bind}", "protocol mqtt"]
    if settings.tls_port is not None:
        if settings.certfile is None or settings.keyfile is None:
            raise ExportError(
                "a TLS listener needs certfile and keyfile (fleetbus broker certs DIR makes them)"
            )
        lines += [
            "",
            f"listener {settings.tls_port} {settings.bind}",
            "protocol mqtt",
            f"certfile {settings.certfile.resolve()}",
            f"keyfile {settings.keyfile.resolve()}",
        ]
    if settings.ws_port is not None:
        lines += ["", f"listener {settings.ws_port} {settings.bind}", "protocol websockets"]
    return "\n".join(lines) + "\n"


def _security(settings: MosquittoSettings) -> tuple[str, Path | None]:
    if settings.security not in ("auto", "dynsec", "file"):
        raise ExportError(f"security must be auto, dynsec or file, not {settings.security!r}")
    plugin = settings.dynsec_plugin or find_dynsec_plugin()
    if settings.security == "file" or (settings.security == "auto" and plugin is None):
        return "file", None
    if plugin is None:
        raise ExportError(
            "Mosquitto's dynamic-security plugin was not found; install Debian's mosquitto package, "
            "pass its path, or use security=file"
        )
    return "dynsec", plugin


def _active(principals: Iterable[Principal]) -> list[Principal]:
    return sorted((p for p in principals if not p.revoked), key=lambda p: p.id)


def render_passwords(principals: Iterable[Principal]) -> str:
    """``id:$7$...`` lines for every principal that is not revoked."""
    lines = []
    for p in _active(principals):
        if not p.mosquitto_hash.startswith("$7$"):
            log.warning("mosquitto_hash_missing", principal=p.id, fix="fleetbus device rotate " + p.id)
            continue
        lines.append(f"{p.id}:{p.mosquitto_hash}")
    return "\n".join(lines) + ("\n" if lines else "")


def render_acl(principals: Iterable[Principal]) -> str:
    """One ``user`` block per active principal with the filters broker.acl grants it."""
    out = ["# fleetbus ACL, generated from broker/acl.py rules(): the same decisions as the embedded broker."]
    for p in _active(principals):
        out += ["", f"user {p.id}"]
        out += [f"topic write {t}" for t in acl.rules(p.role.value, p.id, p.groups, "publish")]
        out += [f"topic read {t}" for t in acl.rules(p.role.value, p.id, p.groups, "subscribe")]
    return "\n".join(out) + "\n"


def _role_name(p: Principal) -> str:
    return f"fleetbus-{p.role.value}-{p.id}"


def render_dynsec(principals: Iterable[Principal]) -> str:
    """The dynamic-security plugin's JSON: one client and one role (our rules) per active principal."""
    clients: list[dict[str, object]] = []
    roles: list[dict[str, object]] = []
    for p in _active(principals):
        parts = p.mosquitto_hash.split("$")
        if len(parts) != 5 or parts[1] != "7":
            log.warning("mosquitto_hash_missing", principal=p.id, fix="fleetbus device rotate " + p.id)
            continue
        _, _, iterations, salt, derived = parts
        client: dict[str, object] = {
            "username": p.id,
            "textname": f"fleetbus {p.role.value}",
            "password": derived,
            "salt": salt,
            "iterations": int(iterations),
            "roles": [{"rolename": _role_name(p)}],
        }
        if p.role is Role.DEVICE:
            # As on the embedded broker: a device connects with its id as client id and no other.
            client["clientid"] = p.id
        clients.append(client)
        acls: list[dict[str, object]] = []
        for topic in acl.rules(p.role.value, p.id, p.groups, "publish"):
            acls.append({"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": True})
        for topic in acl.rules(p.role.value, p.id, p.groups, "subscribe"):
            literal = "+" not in topic and "#" not in topic
            acls.append(
                {
                    "acltype": "subscribeLiteral" if literal else "subscribePattern",
                    "topic": topic,
                    "priority": 0,
                    "allow": True,
                }
            )
            # The plugin matches the whole "$share/g/filter" string; acl.decide looks at the filter.
            acls.append(
                {"acltype": "subscribePattern", "topic": f"$share/+/{topic}", "priority": 0, "allow": True}
            )
            acls.append({"acltype": "publishClientReceive", "topic": topic, "priority": 0, "allow": True})
        roles.append({"rolename": _role_name(p), "acls": acls})
    doc = {
        # Deny by default: a principal gets exactly its rules, like acl.decide.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
    return json.dumps(doc, indent=2) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def export(registry: Registry, directory: Path, settings: MosquittoSettings | None = None) -> list[Path]:
    """Write mosquitto.conf, passwords, acl and dynamic-security.json into ``directory``."""
    settings = settings or MosquittoSettings()
    registry.reload_if_changed()
    principals = registry.list()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (settings.persistence_dir or directory / "data").mkdir(parents=True, exist_ok=True)
        conf, pw, acl_path = directory / CONF_NAME, directory / PASSWORD_NAME, directory / ACL_NAME
        dynsec = directory / DYNSEC_NAME
        _write(pw, render_passwords(principals), 0o600)
        _write(acl_path, render_acl(principals), 0o600)
        _write(dynsec, render_dynsec(principals), 0o600)
        _write(conf, render_conf(settings, directory), 0o644)
    except OSError as exc:
        raise ExportError(f"cannot write the Mosquitto configuration into {directory}: {exc}") from None
    log.info("mosquitto_exported", directory=str(directory), principals=len(_active(principals)))
    return [conf, pw, acl_path, dynsec]
