"""The ``fleetbus`` command.

It lives in ``schemas`` because that is the one package every role installs; each subcommand is
imported only when it runs, so a board without the broker or publisher extras still has a working
``fleetbus device run`` and a clear message for the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import click

from schemas.logs import configure_logging

# name -> (module:attribute, extra that provides it)
_LAZY: dict[str, tuple[str, str]] = {
    "broker": ("broker.cli:broker", "broker"),
    "rollout": ("publisher.cli:rollout", "publisher"),
    "serve": ("publisher.cli:serve", "publisher"),
    "tail": ("publisher.cli:tail", "publisher"),
    "keys": ("publisher.cli:keys", "publisher"),
    "demo": ("publisher.demo:demo", "all"),
}
_DEVICE_LAZY: dict[str, tuple[str, str]] = {
    "run": ("device.cli:run", "device"),
    "add": ("broker.registry_cli:add", "broker"),
    "list": ("broker.registry_cli:list_devices", "broker"),
    "revoke": ("broker.registry_cli:revoke", "broker"),
    "rotate": ("broker.registry_cli:rotate", "broker"),
}


def _load(name: str, spec: str, extra: str) -> click.Command:
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = f"this command needs the '{extra}' extra: pip install 'fleetbus[{extra}]' ({exc})"

        # A stand-in keeps --help working on a board that lacks the extra, and fails only when run.
        @click.command(
            name,
            help=f"(unavailable: needs fleetbus[{extra}])",
            context_settings={"ignore_unknown_options": True},
        )
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def unavailable(args: tuple[str, ...]) -> None:
            raise click.ClickException(message)

        return unavailable
    command = getattr(module, attr)
    if not isinstance(command, click.Command):
        raise click.ClickException(f"{spec} is not a click command")
    return command


class _LazyGroup(click.Group):
    def __init__(self, *args: object, lazy: dict[str, tuple[str, str]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            return _load(cmd_name, *self._lazy[cmd_name])
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, lazy=_LAZY)
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning or error.")
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of text.")
@click.version_option(package_name="fleetbus")
def cli(log_level: str, log_json: bool) -> None:
    """fleetbus: roll TFLite models out to device fleets over MQTT, and bring results and health back."""
    configure_logging(log_level, log_json)


@cli.group(cls=_LazyGroup, lazy=_DEVICE_LAZY)
def device() -> None:
    """The device agent (run) and the device registry (add, list, revoke, rotate)."""


@cli.group()
def schema() -> None:
    """The wire contract: JSON Schemas and an AsyncAPI document for other languages."""


@schema.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schema_export(directory: Path) -> None:
    """Write a JSON Schema per message kind and asyncapi.json for the topic tree into DIRECTORY."""
    from schemas.spec import export

    written = export(directory)
    click.echo(f"wrote {len(written)} files to {directory}")


def lean_device_argv(argv: list[str]) -> list[str] | None:
    """``python -m device`` arguments for a ``[--log-level L] [--log-json] device run ...`` command line.

    None for anything else, and for ``--help`` (click renders that).
    """
    lean: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("--log-"):
        arg = rest.pop(0)
        if arg == "--log-json" or arg.startswith("--log-level="):
            lean.append(arg)
        elif arg == "--log-level" and rest:
            lean += [arg, rest.pop(0)]
        else:
            return None
    if rest[:2] != ["device", "run"] or {"-h", "--help"} & set(rest):
        return None
    return ["run", *rest[2:], *lean]


def _exec_lean_device(argv: list[str]) -> None:
    """Replace this process with ``python -m device run ...`` (same pid, same signals).

    By now this module has imported click and the logging stack, which a board's agent would carry
    for its whole life (docs/device.md, "Measured": the lean process is several MiB smaller).
    """
    lean = lean_device_argv(argv)
    if lean is None or importlib.util.find_spec("device.entry") is None:
        return
    orig = list(getattr(sys, "orig_argv", []))
    flags = orig[1 : orig.index("-m")] if "-m" in orig else []  # keep -X / -W options
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *flags, "-m", "device", *lean])  # noqa: S606 - our own interpreter


def main() -> None:
    _exec_lean_device(sys.argv[1:])
    cli(prog_name="fleetbus")


if __name__ == "__main__":
    main()
