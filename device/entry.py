"""The agent process's lean entry point: ``python -m device run --config device.toml``.

``fleetbus device run`` execs this (see ``schemas/cli.py``), so the agent process never carries
click or the CLI's command tree (docs/device.md, "Measured").

What it deliberately does not do: keep ``ssl`` out of a plain-TCP process with ``None`` in
``sys.modules``.  asyncio and paho both import ssl in ``try/except ImportError``, but paho 2.2 still
names ``ssl.SSLWantReadError`` in the ``except`` clauses of its plain-socket reads, so the first
would-block read raised AttributeError and killed the network thread (seen in
tests/device/test_crash_resume.py).  The saving was about 1.2 MiB; hashlib maps libcrypto anyway.

What it does keep out: the optional extras structlog's console renderer imports when they are
installed (rich, better_exceptions, colorama).  They only colour output and prettify tracebacks, and
the agent logs without colour, so a board where rich happens to be installed (a dev install) paid
3.2 MiB of RSS for nothing and logged tracebacks differently from one without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Imported by structlog.dev in try/except ImportError; None in sys.modules is "not installed".
UNUSED_EXTRAS = ("rich", "better_exceptions", "colorama")

USAGE = """usage: python -m device run [--config device.toml] [--log-level LEVEL] [--log-json]

Run the device agent: receive models, gate and activate them, report results and health."""


def parse_args(argv: list[str]) -> tuple[Path, str, bool]:
    """(config, log level, log json) from ``run [--config P] [--log-level L] [--log-json]``."""
    if not argv or argv[0] != "run":
        raise SystemExit(USAGE)
    config, level, as_json = Path("device.toml"), "info", False
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--log-json":
            as_json = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--config", "--log-level"):
            raise SystemExit(f"unknown option {arg!r}\n{USAGE}")
        if not eq:
            if not rest:
                raise SystemExit(f"{name} needs a value\n{USAGE}")
            value = rest.pop(0)
        if name == "--config":
            config = Path(value)
        else:
            level = value
    return config, level, as_json


def serve(config: Path) -> None:
    """Load the settings, run the agent until SIGTERM or Ctrl-C (the handler only flags)."""
    import signal
    import threading
    from types import FrameType

    from device.agent import Agent
    from device.config import load_settings

    agent = Agent(load_settings(config))

    def stop(signum: int, frame: FrameType | None) -> None:
        # The agent's main thread does the clean shutdown (death, disconnect), not the handler.
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


def keep_out_unused_extras() -> None:
    """Make structlog fall back to plain tracebacks, as on a board without the extras installed."""
    for name in UNUSED_EXTRAS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    # First, before anything imports structlog.
    keep_out_unused_extras()
    config, level, as_json = parse_args(sys.argv[1:] if argv is None else argv)
    if not config.is_file():
        print(f"Error: config file {config} does not exist", file=sys.stderr)
        return 2
    from device.errors import DeviceError
    from schemas.logs import configure_logging

    configure_logging(level, as_json)
    try:
        serve(config)
    except DeviceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0
