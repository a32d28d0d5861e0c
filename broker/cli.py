"""``fleetbus broker``: run the embedded broker, make development certificates, export for Mosquitto,
and add the principals that are not devices (operators and readers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from broker.errors import BrokerError
from broker.registry import Role
from broker.registry_cli import _errors, open_registry, registry_option
from schemas.messages import MQTT_PORT


@click.group("broker", invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The broker's TOML file (see docs/broker.md).",
)
@click.pass_context
def broker(ctx: click.Context, config_path: Path | None) -> None:
    """Run the embedded broker (--config FILE), or manage its certificates, users and Mosquitto export."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("give --config broker.toml to run the broker, or a subcommand")
    from broker.server import run_forever  # the broker pulls in amqtt; the other commands do not

    with _errors():
        run_forever(config_path)


@broker.command("certs")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host", "hosts", multiple=True, help="Another name or IP for the server certificate (repeatable)."
)
@click.option("--days", default=825, show_default=True, help="Validity of both certificates.")
@click.option("--force", is_flag=True, help="Replace existing certificates.")
def certs(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Make a development CA and a server certificate (SAN 127.0.0.1, localhost) in DIRECTORY."""
    from broker.certs import make_dev_certs

    with _errors():
        paths = make_dev_certs(directory, hosts=hosts, days=days, overwrite=force)
    click.echo(f"CA certificate:     {paths.ca_cert}   (devices: [mqtt] cafile)")
    click.echo(f"CA key:             {paths.ca_key}   (keep it off the broker host)")
    click.echo(f"server certificate: {paths.server_cert}   (broker: certfile)")
    click.echo(f"server key:         {paths.server_key}   (broker: keyfile)")


@broker.command("export-mosquitto")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@registry_option
@click.option("--port", default=MQTT_PORT, show_default=True, help="Mosquitto's MQTT listener port.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address of the listeners.")
@click.option(
    "--security",
    type=click.Choice(["auto", "dynsec", "file"]),
    default="auto",
    show_default=True,
    help="dynsec: the dynamic-security plugin (checks SUBSCRIBE); file: password_file + acl_file.",
)
@click.option(
    "--max-payload", type=int, default=None, help="Largest payload in bytes [default: the codec's limit]."
)
@click.option("--tls-port", type=int, default=None, help="Add a TLS listener (needs --certfile, --keyfile).")
@click.option("--certfile", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--ws-port", type=int, default=None, help="Add a WebSocket listener.")
def export_mosquitto(
    *,
    directory: Path,
    registry_path: Path | None,
    port: int,
    bind: str,
    security: str,
    max_payload: int | None,
    tls_port: int | None,
    certfile: Path | None,
    keyfile: Path | None,
    ws_port: int | None,
) -> None:
    """Write mosquitto.conf, passwords, acl and dynamic-security.json for the same registry and roles."""
    from broker.mosquitto import MosquittoSettings, export

    registry = open_registry(registry_path)
    settings = MosquittoSettings(
        port=port,
        bind=bind,
        security=security,
        tls_port=tls_port,
        certfile=certfile,
        keyfile=keyfile,
        ws_port=ws_port,
    )
    if max_payload:
        settings = dataclasses.replace(settings, max_payload=max_payload)
    try:
        written = export(registry, directory, settings)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"run: mosquitto -c {written[0]}")


@broker.group("user")
def user() -> None:
    """Principals that are not devices: operators (publisher CLI and service) and readers (backends)."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice([Role.OPERATOR.value, Role.READER.value]), required=True)
@registry_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a ready operator.toml (mode 0600) for the publisher CLI and `fleetbus serve`.",
)
@click.option("--broker-url", default=f"mqtt://127.0.0.1:{MQTT_PORT}", show_default=True, help="For --out.")
@click.option("--cafile", type=click.Path(dir_okay=False, path_type=Path), default=None, help="For --out.")
@click.option("--key", default=None, help="For --out: the publisher's Ed25519 signing key file.")
def user_add(  # noqa: PLR0917 - click passes every parameter by keyword
    name: str,
    role: str,
    registry_path: Path | None,
    out: Path | None,
    broker_url: str,
    cafile: Path | None,
    key: str | None,
) -> None:
    """Register NAME as an operator or a reader and print its password once."""
    from broker.registry_cli import operator_toml, parse_broker_url, write_secret_file

    if out is not None:
        parse_broker_url(broker_url)
    registry = open_registry(registry_path)
    with _errors():
        password = registry.add(name, role)
    click.echo(f"{role} {name} added to {registry.path}")
    click.echo(f"username: {name}")
    click.echo(f"password: {password}")
    if out is not None:
        write_secret_file(out, operator_toml(name, password, broker_url=broker_url, cafile=cafile, key=key))
        click.echo(f"wrote {out}")
    click.echo("the password is not stored anywhere; `fleetbus device rotate NAME` makes a new one")
