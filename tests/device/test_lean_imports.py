"""What the lean agent process (`python -m device run`) keeps out of memory."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device.dist import installed_version
from device.entry import defer_import
from device.gate import _median
from device.inputs import SyntheticSource
from device.runtime import TensorSpec

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


def _run(probe: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", probe, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# The lean entry's set-up (it stops at the missing config), then what the agent loads and runs.
_AGENT_IMPORTS = """
import sys
from device.entry import main
assert main(["run", "--config", sys.argv[1]]) == 2
from schemas.logs import configure_logging
configure_logging("info")
import paho.mqtt.client, structlog
import device.agent
from device.runtime import default_runtime
from schemas.codec import decode, encode
structlog.get_logger("probe").info("logged")
print(default_runtime().version)
print(sorted(n for n in sys.argv[2:] if n in sys.modules))
"""


def test_lean_agent_keeps_asyncio_and_urllib_request_unloaded(tmp_path: Path) -> None:
    """The agent's imports under the lean entry load neither asyncio nor urllib.request (http.client)."""
    kept_out = ["asyncio.base_events", "subprocess", "concurrent.futures", "http.client", "urllib.response"]
    out = _run(_AGENT_IMPORTS, str(tmp_path / "missing.toml"), *kept_out)
    assert "[]" in out.splitlines(), out
    assert "logged" in out


_AGENT_AND_RUNTIME = """
import sys
from device.entry import main
assert main(["run", "--config", sys.argv[1]]) == 2
from schemas.logs import configure_logging
configure_logging("info")
import paho.mqtt.client, structlog
import device.agent
from device.runtime import default_runtime
from schemas.plain import Death, decode, encode
assert decode(encode(Death(device_id="d1", bdseq=3))).kind == "death"
print(default_runtime().version, device.agent.agent_version())
print(sorted(n for n in sys.argv[2:] if n in sys.modules))
"""


def test_lean_agent_loads_neither_pydantic_nor_importlib_metadata(tmp_path: Path) -> None:
    """The agent, its messages and the runtime, under the lean entry: no pydantic, no importlib.metadata."""
    kept_out = ["pydantic", "pydantic_core", "importlib.metadata", "email", "zipfile", "csv", "tempfile"]
    out = _run(_AGENT_AND_RUNTIME, str(tmp_path / "missing.toml"), *kept_out)
    runtime_version, agent_version = out.splitlines()[0].split(" ", 1)
    assert runtime_version[0].isdigit(), out
    assert agent_version == importlib.metadata.version("fleetbus"), out
    assert out.splitlines()[1] == "[]", out


_FIRST_USE = """
import sys
from device.entry import main
assert main(["run", "--config", sys.argv[1]]) == 2
from schemas.logs import configure_logging
configure_logging("info")
import asyncio
import structlog
assert "asyncio.base_events" not in sys.modules
asyncio.run(structlog.get_logger("probe").ainfo("async logged"))
from urllib.request import getproxies
assert isinstance(getproxies(), dict)
print(sys.modules["asyncio"].run is asyncio.run, "http.client" in sys.modules)
"""


def test_deferred_modules_load_on_first_use_and_work(tmp_path: Path) -> None:
    """Under the lean entry, structlog's async logging runs asyncio and urllib.request answers."""
    out = _run(_FIRST_USE, str(tmp_path / "missing.toml"))
    assert "True True" in out.splitlines(), out
    assert "async logged" in out


def _module(tmp_path: Path, name: str) -> Path:
    marker = tmp_path / f"{name}.ran"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('x')\nVALUE = 42\n")
    return marker


def test_defer_import_runs_the_module_at_its_first_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deferred module is bound by `import` without running; its first attribute runs it once."""
    name = f"deferred_{tmp_path.name}"
    marker = _module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    stand_in = defer_import(name, OVERRIDDEN="here")
    assert stand_in is not None
    module = importlib.import_module(name)
    assert module is stand_in
    assert module.OVERRIDDEN == "here"
    assert not marker.exists()
    assert module.VALUE == 42
    assert module.VALUE == 42
    assert marker.read_text() == "x"
    assert sys.modules[name] is not stand_in
    assert sys.modules[name].VALUE == 42


def test_defer_import_leaves_loaded_and_missing_modules_alone() -> None:
    """defer_import does nothing for a module already imported, a missing one or a missing parent."""
    assert defer_import("json") is None
    assert "fleetbus_no_such_module" not in sys.modules
    assert defer_import("fleetbus_no_such_module") is None
    assert defer_import("fleetbus_no_such_package.sub") is None
    assert "fleetbus_no_such_module" not in sys.modules


_EAGER_PACKAGE = """
import builtins, sys
sys.path.insert(0, sys.argv[1])
from device.entry import defer_submodules
made = defer_submodules("eagerpkg", ("heavy", "absent"))
import eagerpkg
ran_at_import = getattr(builtins, "HEAVY_RAN", False)
value = eagerpkg.heavy.VALUE
print(len(made), ran_at_import, value, builtins.HEAVY_RAN, sys.modules["eagerpkg.heavy"].VALUE)
print(defer_submodules("eagerpkg", ("heavy",)), defer_submodules("fleetbus_no_such_package", ("x",)))
"""


def test_defer_submodules_keeps_a_packages_eager_children_from_running(tmp_path: Path) -> None:
    """A child the package imports in its __init__ runs at its first attribute, not at the import."""
    pkg = tmp_path / "eagerpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import heavy\n")
    (pkg / "heavy.py").write_text("import builtins\nbuiltins.HEAVY_RAN = True\nVALUE = 42\n")
    out = _run(_EAGER_PACKAGE, str(tmp_path)).splitlines()
    assert out[0] == "1 False 42 True 42", out
    assert out[1] == "[] []", out  # the package is imported now; a missing one is left alone


@pytest.mark.parametrize("dist", ["pydantic", "paho-mqtt", "typing_extensions", "numpy", "fleetbus"])
def test_installed_version_agrees_with_importlib_metadata(dist: str) -> None:
    """installed_version reads the version importlib.metadata reports for an installed distribution."""
    try:
        expected: str | None = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        expected = None
    assert installed_version(dist) == expected
    assert installed_version("fleetbus-no-such-dist") is None


_GATE_AND_SYNTHETIC_INPUTS = """
import sys
import numpy
eager = "numpy.random" in sys.modules  # numpy 1.x imports it with numpy; 2.x on first use
from device.gate import run_gate
from device.inputs import SyntheticSource
from device.runtime import TensorSpec
SyntheticSource(seed=1).next([TensorSpec("in", (2, 3), "float32", None, None)])
print(eager, sorted(n for n in ("statistics", "fractions", "numpy.random") if n in sys.modules))
"""


def test_gate_and_synthetic_inputs_keep_statistics_and_numpy_random_unloaded() -> None:
    """The gate loads no statistics module, and synthetic inputs no numpy.random where numpy defers it."""
    eager, loaded = _run(_GATE_AND_SYNTHETIC_INPUTS).splitlines()[0].split(" ", 1)
    if eager == "True":
        assert loaded in ("['numpy.random']", "['fractions', 'numpy.random']"), loaded
    else:
        assert loaded in ("[]", "['fractions']"), loaded


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [2.0, 9.0, 4.0], [1.5, 0.5, 7.0, 3.0, 3.0, 8.0]])
def test_gate_median_is_statistics_median(values: list[float]) -> None:
    """The gate's median of latencies is the one statistics.median gives, odd and even counts alike."""
    assert _median(values) == statistics.median(values)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"]
)
def test_synthetic_inputs_keep_their_contract(dtype: str) -> None:
    """Synthetic inputs have the spec's shape and dtype, are writable, and a seed repeats its sequence."""
    spec = [TensorSpec("in", (64, 32), dtype, None, None)]
    first, again, other = SyntheticSource(seed=7), SyntheticSource(seed=7), SyntheticSource(seed=8)
    a = first.next(spec)[0]
    assert a.shape == (64, 32)
    assert a.dtype == np.dtype(dtype)
    assert a.flags.writeable
    assert np.array_equal(a, again.next(spec)[0])
    assert not np.array_equal(first.next(spec)[0], a)
    assert not np.array_equal(other.next(spec)[0], a)
    if a.dtype.kind == "f":
        assert a.min() >= -1.0
        assert a.max() < 1.0 or a.dtype == np.float16  # float16 rounds the top values up to 1
        assert abs(float(a.mean())) < 0.1
    elif a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        assert info.min <= a.min() < a.max() <= info.max
    else:
        assert 0.3 < a.mean() < 0.7
