"""The commit gate on real generated models in the installed runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.gate import precheck, run_gate
from device.runtime import default_runtime
from publisher.modelgen import HUGE_ARENA_BYTES, ModelSpec, build_broken, build_model
from tests.device.conftest import make_manifest

SPEC = ModelSpec(input_size=4, output_size=3, seed=3)
RUNTIME = default_runtime()


def gate(tmp_path: Path, model: bytes, **overrides: object) -> tuple[bool, str]:
    p = tmp_path / "m.tflite"
    p.write_bytes(model)
    m = make_manifest(build_model(SPEC), "1", spec=SPEC)
    m = m.model_copy(update=overrides)
    result = run_gate(RUNTIME, p, m, latency_runs=3)
    if result.model is not None:
        result.model.close()
    return result.ok, result.reason


def test_good_model_passes_every_check(tmp_path: Path) -> None:
    """The model the manifest describes loads, matches its contract and golden cases, within budgets."""
    ok, reason = gate(tmp_path, build_model(SPEC), latency_budget_ms=1000.0, arena_budget_bytes=1 << 20)
    assert ok, reason
    assert reason == "passed load, contract, golden, latency, arena"


def test_int8_model_contract_includes_quantization(tmp_path: Path) -> None:
    """A quantized model passes against its own contract and fails when the scale differs."""
    q = ModelSpec(input_size=4, output_size=3, seed=3, dtype="int8")
    model = build_model(q)
    m = make_manifest(model, "1", golden=False)
    p = tmp_path / "q.tflite"
    p.write_bytes(model)
    assert run_gate(RUNTIME, p, m).ok
    bad_input = m.inputs[0].model_copy(update={"scale": (m.inputs[0].scale or 1) * 2})
    result = run_gate(RUNTIME, p, m.model_copy(update={"inputs": [bad_input]}))
    assert not result.ok
    assert "scale" in result.reason


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("truncated", "load"),
        ("garbage", "load"),
        ("bad_op", "load"),
        ("wrong_shape", "contract"),
        ("nan_output", "NaN"),
    ],
)
def test_broken_models_fail_with_a_precise_reason(tmp_path: Path, kind: str, words: str) -> None:
    """Each broken model kind is refused at the check that catches it."""
    ok, reason = gate(tmp_path, build_broken(kind, SPEC))  # type: ignore[arg-type]
    assert not ok
    assert words in reason


def test_wrong_numbers_fail_golden(tmp_path: Path) -> None:
    """A model computing different numbers fails the golden comparison with the size of the error."""
    ok, reason = gate(tmp_path, build_model(ModelSpec(input_size=4, output_size=3, seed=4)))
    assert not ok
    assert "golden case 0" in reason
    assert "off by" in reason


def test_budgets(tmp_path: Path) -> None:
    """A latency budget no model can meet and an arena budget below the model's arena both refuse."""
    assert "latency" in gate(tmp_path, build_model(SPEC), latency_budget_ms=1e-9)[1]
    huge = build_broken("huge_arena", SPEC)
    ok, reason = gate(tmp_path, huge, arena_budget_bytes=1 << 20)
    assert not ok
    assert "arena" in reason


def test_precheck_from_the_manifest_alone() -> None:
    """Missing ops and an arena over the advertised RAM are INCOMPATIBLE before any download."""
    m = make_manifest(build_model(SPEC), "1", spec=SPEC)
    ops = RUNTIME.supported_ops()
    assert precheck(m, ops, 1 << 30) is None
    assert "CUSTOM:X" in (precheck(m.model_copy(update={"ops": ["CUSTOM:X"]}), ops, 1 << 30) or "")
    assert "arena" in (precheck(m.model_copy(update={"arena_bytes": HUGE_ARENA_BYTES}), ops, 1 << 20) or "")
