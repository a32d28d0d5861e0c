"""``fleetbus device add | list | revoke | rotate``: the registry from the command line.

``add`` prints the new credentials once and writes a ready ``device.toml`` (mode 0600, it holds the
password); the registry keeps only hashes. The registry file is ``--registry``, else
``$FLEETBUS_REGISTRY``, else ``./fleetbus-registry.json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from broker.errors import BrokerError
from broker.registry import Principal, Registry, Role, default_registry_path
from schemas.messages import MQTT_PORT, MQTTS_PORT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_BROKER_URL = f"mqtt://127.0.0.1:{MQTT_PORT}"


def registry_option(func: F) -> F:
    return click.option(
        "--registry",
        "registry_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Registry file [default: $FLEETBUS_REGISTRY or ./fleetbus-registry.json].",
    )(func)


@contextmanager
def _errors() -> Iterator[None]:
    """Registry errors become one-line CLI errors instead of tracebacks."""
    try:
        yield
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None


def open_registry(path: Path | None) -> Registry:
    with _errors():
        return Registry.load(path or default_registry_path())


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` or ``mqtts://host:port`` -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise click.BadParameter(
            f"{url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT", param_hint="--broker-url"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (MQTTS_PORT if tls else MQTT_PORT)
    except ValueError:
        raise click.BadParameter(f"{url!r} has an invalid port", param_hint="--broker-url") from None
    return parts.hostname, port, tls


# --- a small TOML writer for the flat tables of device.toml --------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\", \\, \n, \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(doc: Mapping[str, Mapping[str, object]]) -> str:
    """TOML text for ``{table: {key: scalar or list}}`` (all device.toml needs)."""
    out: list[str] = []
    for table, values in doc.items():
        out.append(f"[{table}]")
        out += [f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)


def write_secret_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def device_toml(
    principal: Principal,
    password: str,
    *,
    broker_url: str,
    cafile: Path | None,
    publisher_keys: Sequence[str],
    state_dir: str,
) -> str:
    """The text of a ready device.toml (keys owned by device/config.py)."""
    host, port, tls = parse_broker_url(broker_url)
    return toml_dumps(
        {
            "device": {"id": principal.id, "groups": list(principal.groups), "state_dir": state_dir},
            "mqtt": {
                "host": host,
                "port": port,
                "username": principal.id,
                "password": password,
                "tls": tls,
                "cafile": str(cafile.resolve()) if cafile else None,
            },
            "trust": {"publisher_keys": list(publisher_keys)},
        }
    )


def operator_toml(name: str, password: str, *, broker_url: str, cafile: Path | None, key: str | None) -> str:
    """The text of a ready operator.toml (keys owned by publisher/opconfig.py)."""
    host, port, tls = parse_broker_url(broker_url)
    return toml_dumps(
        {
            "mqtt": {
                "host": host,
                "port": port,
                "username": name,
                "password": password,
                "tls": tls,
                "cafile": str(cafile.resolve()) if cafile else None,
            },
            "publisher": {"key": key},
        }
    )


def _pubkey_entry(value: str) -> str:
    """A publisher key as device.toml takes it: 64 hex digits as given, a file as an absolute path."""
    if len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    path = Path(value)
    if not path.exists():
        raise click.BadParameter(
            f"{value!r} is neither 64 hex digits nor an existing file", param_hint="--pubkey"
        )
    return str(path.resolve())


# --- commands ------------------------------------------------------------------------------------


@click.command("add")
@click.argument("device_id")
@click.option("--group", "-g", "groups", multiple=True, help="A group the device belongs to (repeatable).")
@registry_option
@click.option(
    "--broker-url", default=DEFAULT_BROKER_URL, show_default=True, help="mqtt://HOST:PORT or mqtts://..."
)
@click.option("--cafile", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="CA for TLS.")
@click.option(
    "--pubkey", "pubkeys", multiple=True, help="Publisher public key: 64 hex digits or a file (repeatable)."
)
@click.option("--state-dir", default=None, help="The device's state directory [default: fleetbus-state/ID].")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write device.toml [default: ./ID.toml].",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def add(  # click passes every parameter by keyword
    *,
    device_id: str,
    groups: tuple[str, ...],
    registry_path: Path | None,
    broker_url: str,
    cafile: Path | None,
    pubkeys: tuple[str, ...],
    state_dir: str | None,
    out: Path | None,
    force: bool,
) -> None:
    """Register device DEVICE_ID, print its password once and write a ready device.toml."""
    parse_broker_url(broker_url)
    keys = [_pubkey_entry(k) for k in pubkeys]
    out = out or Path(f"{device_id}.toml")
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite it or --out elsewhere")
    registry = open_registry(registry_path)
    with _errors():
        password = registry.add(device_id, Role.DEVICE, groups)
        principal = registry.get(device_id)
    text = device_toml(
        principal,
        password,
        broker_url=broker_url,
        cafile=cafile,
        publisher_keys=keys,
        state_dir=state_dir or f"fleetbus-state/{device_id}",
    )
    write_secret_file(out, text)
    click.echo(f"device {device_id} added to {registry.path} (groups: {', '.join(principal.groups) or '-'})")
    click.echo(f"username: {device_id}")
    click.echo(f"password: {password}")
    click.echo(f"wrote {out} (mode 0600); the password is not stored anywhere else")


@click.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array (no hashes).")
@click.option("--role", type=click.Choice([r.value for r in Role]), default=None, help="Only this role.")
def list_devices(registry_path: Path | None, as_json: bool, role: str | None) -> None:
    """List the principals of the registry (devices, operators, readers)."""
    registry = open_registry(registry_path)
    principals = [p for p in registry.list() if role is None or p.role.value == role]
    if as_json:
        rows = [
            {
                "id": p.id,
                "role": p.role.value,
                "groups": list(p.groups),
                "revoked": p.revoked,
                "created": p.created,
                "rotated": p.rotated,
            }
            for p in principals
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not principals:
        click.echo(f"no principals in {registry.path}")
        return
    width = max(len(p.id) for p in principals)
    for p in principals:
        status = "REVOKED" if p.revoked else "active"
        click.echo(f"{p.id:<{width}}  {p.role.value:<8}  {status:<7}  {','.join(p.groups) or '-'}")


@click.command("revoke")
@click.argument("principal_id")
@registry_option
def revoke(principal_id: str, registry_path: Path | None) -> None:
    """Revoke PRINCIPAL_ID: refused from now on; a running fleetbus broker disconnects it at once."""
    registry = open_registry(registry_path)
    with _errors():
        registry.revoke(principal_id)
    click.echo(f"{principal_id} revoked in {registry.path}")
    click.echo("a running `fleetbus broker` closes its connections within a second;")
    click.echo("for Mosquitto run `fleetbus broker export-mosquitto` again and restart or SIGHUP it")


@click.command("rotate")
@click.argument("principal_id")
@registry_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A device.toml whose [mqtt] password to replace.",
)
def rotate(principal_id: str, registry_path: Path | None, out: Path | None) -> None:
    """Give PRINCIPAL_ID a new password (re-admitting it if it was revoked) and print it once."""
    registry = open_registry(registry_path)
    with _errors():
        password = registry.rotate(principal_id)
    click.echo(f"{principal_id} has a new password in {registry.path}")
    click.echo(f"password: {password}")
    if out is not None:
        try:
            doc = tomllib.loads(out.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.ClickException(f"cannot update {out}: {exc}") from None
        doc.setdefault("mqtt", {})["password"] = password
        write_secret_file(out, toml_dumps(doc))
        click.echo(f"updated {out}")
    click.echo("the old password is refused from the next connect on")
