"""Packaging, the CLI surface and docker-compose.yml hold together."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from click.testing import CliRunner

from schemas.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_distribution_lists_our_four_packages_explicitly() -> None:
    """setuptools is told the package names, so PyPI's unrelated broker/device/... never shadow ours."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"] == ["schemas", "broker", "device", "publisher"]
    extras = project["project"]["optional-dependencies"]
    assert {"device", "broker", "publisher"} <= set(extras)
    assert any(dep.startswith("paho-mqtt") for dep in extras["device"])
    assert not any(dep.startswith("amqtt") for dep in extras["device"])


def test_tests_import_our_packages_not_pypi_namesakes() -> None:
    """The imported schemas/broker/device/publisher are the ones in this checkout."""
    import broker
    import device
    import publisher
    import schemas

    for module in (schemas, broker, device, publisher):
        assert Path(module.__file__ or "").resolve().is_relative_to(ROOT)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["broker"],
        ["device"],
        ["device", "run"],
        ["device", "add"],
        ["rollout"],
        ["rollout", "push"],
        ["serve"],
        ["demo"],
        ["keys", "generate"],
        ["schema", "export"],
        ["tail"],
    ],
)
def test_every_subcommand_has_help(args: list[str]) -> None:
    """`fleetbus ... --help` works for every documented subcommand."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "unavailable" not in result.output.split("\n", 3)[0]


def _compose_commands() -> list[list[str]]:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip(
            "docker-compose is not installed (Debian package docker-compose); cannot validate the file"
        )
    out = subprocess.run([compose, "config"], capture_output=True, text=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"broker", "aggregator", "device-1", "device-2", "device-3"} <= set(services)
    return [s["command"] for s in services.values() if s.get("command")]


def test_compose_file_is_valid_and_runs_real_subcommands() -> None:
    """docker-compose accepts the file, and every service command is a real fleetbus subcommand."""
    commands = _compose_commands()
    assert len(commands) >= 5
    for command in commands:
        words = [w for w in command if not w.startswith("-") and "/" not in w and ":" not in w][:2]
        result = CliRunner().invoke(cli, [*words, "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_module_entry_point_runs() -> None:
    """python -m schemas.cli is the same command as the console script."""
    out = subprocess.run(
        [sys.executable, "-m", "schemas.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "rollout" in out.stdout
