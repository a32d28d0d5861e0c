"""``fleetbus device run``: the agent as a process, stopped cleanly by SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from device.errors import DeviceError


@click.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="device.toml",
    show_default=True,
    help="The device.toml to read.",
)
def run(config_path: Path) -> None:
    """Run the device agent: receive models, gate and activate them, report results and health."""
    from device.agent import Agent
    from device.config import load_settings

    try:
        agent = Agent(load_settings(config_path))
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None

    def stop(signum: int, frame: FrameType | None) -> None:
        # The handler only flags; the agent's main thread does the clean shutdown (death, disconnect).
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
