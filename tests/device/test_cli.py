"""`fleetbus device run` as a user meets it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from schemas.cli import cli


def test_help_lists_the_config_option() -> None:
    """`fleetbus device run --help` works and documents --config."""
    result = CliRunner().invoke(cli, ["device", "run", "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    """A config with a typo exits non-zero with the key named, not a traceback."""
    cfg = tmp_path / "device.toml"
    cfg.write_text('[device]\nid = "d1"\n[mqtt]\nprot = 1\n')
    result = CliRunner().invoke(cli, ["device", "run", "--config", str(cfg)])
    assert result.exit_code != 0
    assert "unknown keys prot" in result.output
