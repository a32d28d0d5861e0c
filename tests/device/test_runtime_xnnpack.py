"""device.runtime's XNNPACK switch, against the installed interpreter and a real model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.errors import RuntimeUnavailable
from device.runtime import XNNPACK_ENV, LiteRtModel, LiteRtRuntime, default_runtime
from publisher.modelgen import ModelSpec, build_model


def _op_names(model: LiteRtModel) -> list[str]:
    # The interpreter lists a delegate's partition as one node named DELEGATE.
    return [str(d["op_name"]) for d in model._interpreter._get_ops_details()]


def _default() -> LiteRtRuntime:
    runtime = default_runtime()
    assert isinstance(runtime, LiteRtRuntime)
    return runtime


def test_xnnpack_off_runs_the_builtin_kernels_with_the_same_outputs(tmp_path: Path) -> None:
    """With xnnpack=False no delegate takes the graph, and the outputs match the delegated run."""
    path = tmp_path / "m.tflite"
    path.write_bytes(build_model(ModelSpec(input_size=32, output_size=16, slow=3, hidden=64, seed=5)))
    backend = _default().name
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    with (
        LiteRtRuntime(backend).load(path) as delegated,  # type: ignore[arg-type]  # name is a Backend
        LiteRtRuntime(backend, xnnpack=False).load(path) as builtin,  # type: ignore[arg-type]
    ):
        assert "DELEGATE" in _op_names(delegated)
        assert "DELEGATE" not in _op_names(builtin)
        np.testing.assert_allclose(builtin.invoke([x])[0], delegated.invoke([x])[0], rtol=1e-5, atol=1e-5)


def test_default_runtime_reads_the_xnnpack_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEETBUS_XNNPACK=0 turns the delegate off, unset or 1 keeps it, anything else is refused."""
    monkeypatch.delenv(XNNPACK_ENV, raising=False)
    assert _default().xnnpack is True
    monkeypatch.setenv(XNNPACK_ENV, "0")
    assert _default().xnnpack is False
    monkeypatch.setenv(XNNPACK_ENV, " On ")
    assert _default().xnnpack is True
    monkeypatch.setenv(XNNPACK_ENV, "maybe")
    with pytest.raises(RuntimeUnavailable, match=XNNPACK_ENV):
        default_runtime()
