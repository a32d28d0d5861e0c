"""publisher.modelgen: generated models load in the real runtime and compute what numpy says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.runtime import default_runtime
from publisher.modelgen import (
    BAD_CUSTOM_OP,
    InvalidModel,
    ModelSpec,
    TensorInfo,
    build_broken,
    build_model,
    model_ops,
    reference_output,
    tensor_signature,
    write_model,
)

FLOAT_SPECS = [
    ModelSpec(),
    ModelSpec(seed=1, bias_add=0.5),
    ModelSpec(input_size=16, output_size=8, seed=2, bias_add=-1.25),
    ModelSpec(input_size=1, output_size=1, seed=3),
    ModelSpec(seed=4, slow=3),
    ModelSpec(seed=5, slow=2, hidden=64, bias_add=2.0),
]


def _run(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    with default_runtime().load(path) as model:
        return [model.invoke([x])[0] for x in inputs]


def _float_inputs(spec: ModelSpec, n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + spec.seed)
    return [rng.uniform(-3, 3, (1, spec.input_size)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("spec", FLOAT_SPECS, ids=str)
def test_float_model_computes_reference_output(tmp_path: Path, spec: ModelSpec) -> None:
    """A float32 model's outputs equal reference_output within 1e-5 for several inputs."""
    path = tmp_path / "m.tflite"
    write_model(path, spec)
    xs = _float_inputs(spec)
    for x, y in zip(xs, _run(path, xs), strict=True):
        np.testing.assert_allclose(y, reference_output(spec, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(dtype="int8"),
        ModelSpec(dtype="int8", seed=7, bias_add=-0.7, input_size=10, output_size=6),
        ModelSpec(dtype="int8", seed=8, bias_add=1.5, slow=2, hidden=16),
    ],
    ids=str,
)
def test_int8_model_is_within_one_step_of_reference(tmp_path: Path, spec: ModelSpec) -> None:
    """An int8 model's outputs are within one quantization step of reference_output."""
    path = tmp_path / "m.tflite"
    write_model(path, spec)
    rng = np.random.default_rng(spec.seed)
    xs = [rng.integers(-128, 128, (1, spec.input_size)).astype(np.int8) for _ in range(20)]
    for x, y in zip(xs, _run(path, xs), strict=True):
        assert y.dtype == np.int8
        assert np.abs(y.astype(int) - reference_output(spec, x).astype(int)).max() <= 1


def test_int8_signature_carries_quantization() -> None:
    """tensor_signature reports int8 tensors with a scale and a non-zero input zero point."""
    inputs, outputs = tensor_signature(build_model(ModelSpec(dtype="int8")))
    assert inputs[0].dtype == outputs[0].dtype == "int8"
    assert inputs[0].scale is not None
    assert inputs[0].scale > 0
    assert inputs[0].zero_point == -64
    assert outputs[0].scale is not None
    assert outputs[0].zero_point is not None


SMALL_SPECS = st.builds(
    ModelSpec,
    input_size=st.integers(1, 32),
    output_size=st.integers(1, 32),
    seed=st.integers(0, 2**32 - 1),
    bias_add=st.floats(-10, 10, width=32),
    slow=st.integers(0, 3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=SMALL_SPECS)
def test_any_small_spec_matches_reference(tmp_path: Path, spec: ModelSpec) -> None:
    """Every small float32 spec loads and matches reference_output within 1e-5 (relative to scale)."""
    path = tmp_path / "h.tflite"
    write_model(path, spec)
    x = _float_inputs(spec, 1)[0]
    np.testing.assert_allclose(_run(path, [x])[0], reference_output(spec, x), atol=1e-5, rtol=1e-6)


def test_same_spec_gives_same_bytes() -> None:
    """Building is deterministic, and the seed changes the weights."""
    assert build_model(ModelSpec(seed=1)) == build_model(ModelSpec(seed=1))
    assert build_model(ModelSpec(seed=1)) != build_model(ModelSpec(seed=2))


def test_bias_add_distinguishes_two_versions(tmp_path: Path) -> None:
    """Two specs differing only in bias_add compute outputs that differ by exactly that amount."""
    a, b = ModelSpec(seed=3), ModelSpec(seed=3, bias_add=1.0)
    write_model(tmp_path / "a.tflite", a)
    write_model(tmp_path / "b.tflite", b)
    x = _float_inputs(a, 1)
    np.testing.assert_allclose(_run(tmp_path / "b.tflite", x)[0] - _run(tmp_path / "a.tflite", x)[0], 1.0)


def test_small_model_is_small() -> None:
    """The default model is a few hundred bytes."""
    assert len(build_model(ModelSpec())) < 1024


def test_padded_model_is_big_and_computes_the_same(tmp_path: Path) -> None:
    """pad_to grows the file to at least that size without changing what it computes."""
    spec = ModelSpec(seed=9, pad_to=2_000_000)
    size = write_model(tmp_path / "big.tflite", spec)
    assert size == (tmp_path / "big.tflite").stat().st_size >= 2_000_000
    write_model(tmp_path / "small.tflite", ModelSpec(seed=9))
    xs = _float_inputs(spec)
    np.testing.assert_array_equal(_run(tmp_path / "big.tflite", xs), _run(tmp_path / "small.tflite", xs))


def test_slow_model_has_more_layers_and_same_output() -> None:
    """slow=N adds N FULLY_CONNECTED layers and leaves reference_output unchanged."""
    fast, slow = ModelSpec(seed=1), ModelSpec(seed=1, slow=4, hidden=32)
    assert len(build_model(slow)) > len(build_model(fast))
    x = _float_inputs(fast, 1)[0]
    np.testing.assert_array_equal(reference_output(fast, x), reference_output(slow, x))


def test_model_ops_names_builtin_and_custom_ops() -> None:
    """model_ops lists builtin names sorted, and custom ops as CUSTOM:<code>."""
    assert model_ops(build_model(ModelSpec())) == ["ADD", "FULLY_CONNECTED"]
    assert model_ops(build_broken("huge_arena")) == ["ADD", "FULLY_CONNECTED", "PAD", "SLICE"]
    assert model_ops(build_broken("bad_op")) == ["ADD", f"CUSTOM:{BAD_CUSTOM_OP}", "FULLY_CONNECTED"]


def test_tensor_signature_describes_float_model() -> None:
    """tensor_signature gives names, shapes and dtypes, and no quantization for float32."""
    inputs, outputs = tensor_signature(build_model(ModelSpec(input_size=5, output_size=2)))
    assert inputs == [TensorInfo("input", (1, 5), "float32", None, None)]
    assert outputs == [TensorInfo("output", (1, 2), "float32", None, None)]


def test_wrong_shape_differs_from_spec() -> None:
    """The wrong_shape model has one output more than its spec and the same input."""
    spec = ModelSpec(input_size=6, output_size=3)
    inputs, outputs = tensor_signature(build_broken("wrong_shape", spec))
    assert inputs[0].shape == (1, 6)
    assert outputs[0].shape == (1, 4)


@pytest.mark.parametrize("data", [b"", b"not a tflite model", build_broken("garbage")])
def test_readers_reject_what_is_not_a_model(data: bytes) -> None:
    """model_ops and tensor_signature raise InvalidModel on bytes that are not a model."""
    with pytest.raises(InvalidModel):
        model_ops(data)
    with pytest.raises(InvalidModel):
        tensor_signature(data)


def test_broken_truncated_and_garbage_look_like_models() -> None:
    """truncated is half a model and garbage carries the TFL3 identifier, so only loading tells."""
    whole = build_model(ModelSpec())
    assert build_broken("truncated") == whole[: len(whole) // 2]
    garbage = build_broken("garbage", ModelSpec(pad_to=4096))
    assert garbage[4:8] == b"TFL3"
    assert len(garbage) == 4096


def test_unknown_broken_kind_is_refused() -> None:
    """build_broken refuses a kind it does not know."""
    with pytest.raises(ValueError, match="unknown"):
        build_broken("melted")  # type: ignore[arg-type]


def test_nonpositive_sizes_are_refused() -> None:
    """build_model refuses a spec with an empty input or output."""
    with pytest.raises(ValueError, match="positive"):
        build_model(ModelSpec(input_size=0))
