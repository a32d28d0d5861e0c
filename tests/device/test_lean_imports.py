"""What the lean agent process (`python -m device run`) keeps out of memory."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs the lean entry (which stops at the missing config), then what the agent does next: set up
# structlog and log an exception.
_PROBE = """
import sys
from device.entry import UNUSED_EXTRAS, main
rc = main(["run", "--config", sys.argv[1]])
import structlog
from schemas.logs import configure_logging
configure_logging("info")
try:
    raise ValueError("boom")
except ValueError:
    structlog.get_logger("probe").exception("failed")
loaded = [n for n in UNUSED_EXTRAS if sys.modules.get(n) is not None]
print(rc, structlog.dev.rich is None, loaded)
"""


@pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="rich is not installed here")
def test_lean_entry_keeps_structlogs_optional_extras_out(tmp_path: Path) -> None:
    """With rich installed, the lean entry loads none of structlog's extras and logs plain tracebacks."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "missing.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split("\n")[0] == "2 True []", done.stdout + done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: boom" in done.stderr
