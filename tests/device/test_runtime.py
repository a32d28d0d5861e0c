"""device.runtime: the LiteRT / tflite-runtime adapter, against the installed interpreter and real files."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device.errors import DeviceError, ModelLoadError, RuntimeUnavailable
from device.runtime import RUNTIME_ENV, InferenceRuntime, LiteRtRuntime, TensorSpec, default_runtime
from publisher.modelgen import (
    BAD_CUSTOM_OP,
    HUGE_ARENA_BYTES,
    BrokenKind,
    ModelSpec,
    build_broken,
    model_ops,
    reference_output,
    tensor_signature,
    write_model,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runtime() -> InferenceRuntime:
    return default_runtime()


def _broken(tmp_path: Path, kind: BrokenKind, spec: ModelSpec | None = None) -> Path:
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(build_broken(kind, spec or ModelSpec()))
    return path


def test_default_runtime_names_itself(runtime: InferenceRuntime) -> None:
    """The default runtime is one of the two backends and knows its installed version."""
    assert runtime.name in ("litert", "tflite-runtime")
    assert runtime.version[0].isdigit()


def test_env_var_forces_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEETBUS_RUNTIME picks the backend, and an unknown value is refused with the choices."""
    monkeypatch.setenv(RUNTIME_ENV, "litert")
    if importlib.util.find_spec("ai_edge_litert") is not None:
        assert default_runtime().name == "litert"
    monkeypatch.setenv(RUNTIME_ENV, "onnx")
    with pytest.raises(RuntimeUnavailable, match="litert, tflite-runtime"):
        default_runtime()


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is not None, reason="tflite-runtime installed")
def test_forcing_a_missing_backend_is_runtime_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing tflite-runtime where it is not installed raises RuntimeUnavailable, a DeviceError."""
    monkeypatch.setenv(RUNTIME_ENV, "tflite-runtime")
    with pytest.raises(DeviceError, match="no TFLite runtime"):
        default_runtime()
    with pytest.raises(RuntimeUnavailable, match="install"):
        LiteRtRuntime("tflite-runtime").load("whatever.tflite")


@pytest.mark.parametrize("spec", [ModelSpec(), ModelSpec(seed=4, input_size=8, output_size=5, bias_add=0.25)])
def test_loaded_model_computes_reference(tmp_path: Path, runtime: InferenceRuntime, spec: ModelSpec) -> None:
    """invoke returns what reference_output computes, within 1e-5, over several calls."""
    write_model(tmp_path / "m.tflite", spec)
    model = runtime.load(tmp_path / "m.tflite", num_threads=2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((1, spec.input_size)).astype(np.float32)
        (y,) = model.invoke([x])
        np.testing.assert_allclose(y, reference_output(spec, x), atol=1e-5, rtol=0)
    model.close()


def test_tensor_specs_match_the_model_file(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """inputs and outputs agree with what the publisher reads from the file, quantization included."""
    spec = ModelSpec(dtype="int8", input_size=7, output_size=2)
    write_model(tmp_path / "q.tflite", spec)
    model = runtime.load(tmp_path / "q.tflite")
    published_in, published_out = tensor_signature((tmp_path / "q.tflite").read_bytes())
    for mine, theirs in zip([*model.inputs, *model.outputs], [*published_in, *published_out], strict=True):
        assert (mine.name, mine.shape, mine.dtype, mine.zero_point) == (
            theirs.name,
            theirs.shape,
            theirs.dtype,
            theirs.zero_point,
        )
        assert mine.scale == pytest.approx(theirs.scale)
    model.close()


def test_float_tensor_spec_has_no_quantization(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """A float32 input is described without scale or zero point."""
    write_model(tmp_path / "m.tflite", ModelSpec())
    model = runtime.load(tmp_path / "m.tflite")
    assert model.inputs == [TensorSpec("input", (1, 4), "float32", None, None)]
    model.close()


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ([], "takes 1 inputs"),
        ([np.zeros((1, 5), np.float32)], "float32\\[1, 4\\]"),
        ([np.zeros((1, 4), np.float64)], "got float64"),
    ],
)
def test_invoke_refuses_mismatched_inputs(
    tmp_path: Path, runtime: InferenceRuntime, inputs: list[np.ndarray], match: str
) -> None:
    """Wrong input count, shape or dtype raise ValueError naming what the model wants."""
    write_model(tmp_path / "m.tflite", ModelSpec())
    model = runtime.load(tmp_path / "m.tflite")
    with pytest.raises(ValueError, match=match):
        model.invoke(inputs)
    model.close()


def test_closed_model_refuses_to_run(tmp_path: Path) -> None:
    """After close (here by leaving the with block) invoke raises ValueError."""
    write_model(tmp_path / "m.tflite", ModelSpec())
    with LiteRtRuntime().load(tmp_path / "m.tflite") as model:
        pass
    with pytest.raises(ValueError, match="closed"):
        model.invoke([np.zeros((1, 4), np.float32)])


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_unloadable_file_is_model_load_error(
    tmp_path: Path, runtime: InferenceRuntime, kind: BrokenKind
) -> None:
    """A truncated or garbage file raises ModelLoadError naming the file."""
    path = _broken(tmp_path, kind)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        runtime.load(path)


def test_missing_file_is_model_load_error(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """A path with no file raises ModelLoadError, not the interpreter's ValueError."""
    with pytest.raises(ModelLoadError, match=r"nope\.tflite"):
        runtime.load(tmp_path / "nope.tflite")


def test_missing_op_fails_at_load_and_is_visible_beforehand(
    tmp_path: Path, runtime: InferenceRuntime
) -> None:
    """bad_op fails to load naming the op, and model_ops shows an op supported_ops lacks."""
    path = _broken(tmp_path, "bad_op")
    with pytest.raises(ModelLoadError, match=BAD_CUSTOM_OP):
        runtime.load(path)
    missing = set(model_ops(path.read_bytes())) - set(runtime.supported_ops())
    assert missing == {f"CUSTOM:{BAD_CUSTOM_OP}"}


def test_supported_ops_come_from_the_runtime(runtime: InferenceRuntime) -> None:
    """supported_ops has the generated models' ops and omits codes no kernel implements."""
    ops = set(runtime.supported_ops())
    assert {"ADD", "FULLY_CONNECTED", "PAD", "SLICE", "CONV_2D", "SOFTMAX"} <= ops
    # BROADCAST_TO has no version-1 kernel and GELU's code is past 127: both need the probe right.
    assert {"BROADCAST_TO", "GELU"} <= ops
    assert not ops & {"CUSTOM", "DELEGATE", "CALL", "PLACEHOLDER_FOR_GREATER_OP_CODES"}
    assert f"CUSTOM:{BAD_CUSTOM_OP}" not in ops


def test_nan_output_runs_and_gives_nan(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """nan_output loads and runs, and every output is NaN."""
    model = runtime.load(_broken(tmp_path, "nan_output"))
    (y,) = model.invoke([np.ones((1, 4), np.float32)])
    assert np.isnan(y).all()
    model.close()


def test_wrong_shape_loads_with_other_output_shape(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """wrong_shape loads and runs, with an output shape other than the spec's."""
    model = runtime.load(_broken(tmp_path, "wrong_shape", ModelSpec(output_size=3)))
    assert model.outputs[0].shape == (1, 4)
    assert model.invoke([np.ones((1, 4), np.float32)])[0].shape == (1, 4)
    model.close()


def test_huge_arena_is_measured_and_still_correct(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """huge_arena reports an arena of several MB, against under 1 KiB for the plain model."""
    spec = ModelSpec(seed=2)
    big = runtime.load(_broken(tmp_path, "huge_arena", spec))
    write_model(tmp_path / "m.tflite", spec)
    small = runtime.load(tmp_path / "m.tflite")
    assert big.arena_bytes() >= HUGE_ARENA_BYTES
    assert small.arena_bytes() < 1024
    x = np.full((1, 4), 0.5, np.float32)
    np.testing.assert_allclose(big.invoke([x])[0], reference_output(spec, x), atol=1e-5, rtol=0)
    big.close()
    small.close()


def test_choosing_a_runtime_imports_no_interpreter_or_schema() -> None:
    """Importing the module and picking a runtime load no interpreter; probing ops loads no schema."""
    code = (
        "import sys; from device.runtime import default_runtime; r = default_runtime(); "
        "assert not any(m.startswith(('ai_edge_litert', 'tflite_runtime')) for m in sys.modules); "
        "r.supported_ops(); "
        "assert not any(m.startswith(('ai_edge_litert.schema', 'tflite.')) for m in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
