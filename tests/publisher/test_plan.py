"""Model file -> manifest: hashes, chunking, contract and golden cases on real .tflite files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from device.runtime import default_runtime
from publisher.errors import PlanError
from publisher.modelgen import ModelSpec, build_broken, reference_output, write_model
from publisher.plan import (
    DEFAULT_CHUNK_SIZE,
    PlanOptions,
    build_manifest,
    chunk_span,
    digest_file,
    iter_chunks,
    read_chunk,
    rollout_id_for,
)
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.messages import Manifest


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(seed=3, bias_add=0.5))
    return path


def test_manifest_hashes_match_the_file(small_model: Path) -> None:
    """The manifest's file hash, size and single chunk hash are those of the bytes on disk."""
    data = small_model.read_bytes()
    m = build_manifest(small_model, "1.0.0")
    assert m.model_sha256 == hashlib.sha256(data).hexdigest()
    assert m.size == len(data)
    assert m.chunk_sha256 == [hashlib.sha256(data).hexdigest()]
    assert m.chunk_size == DEFAULT_CHUNK_SIZE == 256 * 1024


def test_padded_multi_megabyte_model_is_cut_into_exact_chunks(tmp_path: Path) -> None:
    """A 3 MB model in 64 KiB chunks: every chunk hash matches its slice and the last chunk is short."""
    path = tmp_path / "big.tflite"
    size = write_model(path, ModelSpec(pad_to=3_000_000))
    m = build_manifest(path, "2.0.0", options=PlanOptions(chunk_size=64 * 1024))
    data = path.read_bytes()
    assert m.size == size == len(data)
    assert m.chunk_count == -(-size // (64 * 1024)) == 46
    for i, expected in enumerate(m.chunk_sha256):
        offset, length = chunk_span(m.size, m.chunk_size, i)
        assert hashlib.sha256(data[offset : offset + length]).hexdigest() == expected
    with path.open("rb") as fh:
        last = read_chunk(fh, m.size, m.chunk_size, m.chunk_count - 1)
    assert len(last) == size - 45 * 64 * 1024
    assert b"".join(iter_chunks(path, m.chunk_size)) == data


def test_contract_lists_tensors_and_ops(small_model: Path) -> None:
    """The manifest carries the model's tensor signature and operator names."""
    m = build_manifest(small_model, "1.0.0")
    assert [(t.name, t.shape, t.dtype) for t in m.inputs] == [("input", [1, 4], "float32")]
    assert [(t.name, t.shape, t.dtype) for t in m.outputs] == [("output", [1, 3], "float32")]
    assert m.ops == ["ADD", "FULLY_CONNECTED"]


def test_golden_cases_are_what_the_model_computes(small_model: Path) -> None:
    """Golden outputs from the runtime equal modelgen's numpy reference for the same inputs."""
    spec = ModelSpec(seed=3, bias_add=0.5)
    m = build_manifest(small_model, "1.0.0", options=PlanOptions(golden_count=4), runtime=default_runtime())
    assert len(m.golden) == 4
    assert m.arena_bytes is not None
    assert m.arena_bytes > 0
    for case in m.golden:
        x = np.array(case.inputs[0], np.float32)
        np.testing.assert_allclose(case.expected[0], reference_output(spec, x).ravel(), atol=1e-5)


def test_golden_cases_are_reproducible_from_the_seed(small_model: Path) -> None:
    """The same seed gives the same golden inputs; another seed gives others."""
    rt = default_runtime()
    a = build_manifest(small_model, "1", options=PlanOptions(golden_seed=1), runtime=rt)
    b = build_manifest(small_model, "1", options=PlanOptions(golden_seed=1), runtime=rt)
    c = build_manifest(small_model, "1", options=PlanOptions(golden_seed=2), runtime=rt)
    assert a.golden == b.golden != c.golden


def test_int8_golden_cases_allow_one_quantization_step(tmp_path: Path) -> None:
    """An int8 model gets integer golden inputs and an absolute tolerance of one step."""
    path = tmp_path / "q.tflite"
    write_model(path, ModelSpec(dtype="int8"))
    m = build_manifest(path, "1", runtime=default_runtime())
    assert m.inputs[0].dtype == "int8"
    assert m.inputs[0].scale is not None
    assert all(v == int(v) and -128 <= v <= 127 for v in m.golden[0].inputs[0])
    assert m.golden[0].atol == 1.0


def test_manifest_survives_the_codec(small_model: Path) -> None:
    """A planned manifest encodes and decodes to an equal message."""
    m = build_manifest(small_model, "1.0.0", runtime=default_runtime())
    assert decode_as(encode(m), Manifest) == m


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_model_is_refused_with_a_reason(tmp_path: Path, kind: str) -> None:
    """A file that is not a TFLite model raises PlanError naming the file."""
    path = tmp_path / "bad.tflite"
    path.write_bytes(build_broken(kind))  # type: ignore[arg-type]
    with pytest.raises(PlanError, match=r"bad\.tflite"):
        build_manifest(path, "1.0.0")


def test_model_that_does_not_load_is_refused(tmp_path: Path) -> None:
    """A valid flatbuffer with an op no runtime has fails planning when golden cases are asked for."""
    path = tmp_path / "op.tflite"
    path.write_bytes(build_broken("bad_op"))
    with pytest.raises(PlanError, match="does not load"):
        build_manifest(path, "1.0.0", runtime=default_runtime())


def test_nan_model_is_refused(tmp_path: Path) -> None:
    """A model whose golden outputs are NaN is refused at planning time."""
    path = tmp_path / "nan.tflite"
    path.write_bytes(build_broken("nan_output"))
    with pytest.raises(PlanError, match="NaN"):
        build_manifest(path, "1.0.0", runtime=default_runtime())


def test_non_strict_plan_lets_a_broken_model_through(tmp_path: Path) -> None:
    """strict=False plans a broken file anyway, so tests can watch devices refuse it."""
    path = tmp_path / "bad.tflite"
    path.write_bytes(build_broken("garbage"))
    m = build_manifest(path, "9", options=PlanOptions(strict=False), runtime=default_runtime())
    assert m.ops == []
    assert m.golden == []
    assert m.size == path.stat().st_size


def test_missing_and_empty_files_are_refused(tmp_path: Path) -> None:
    """A missing or empty model file is a PlanError, not an OSError."""
    with pytest.raises(PlanError, match="does not exist"):
        build_manifest(tmp_path / "nope.tflite", "1")
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(PlanError, match="empty"):
        digest_file(tmp_path / "empty.tflite")


@pytest.mark.parametrize("size", [100, 512 * 1024])
def test_chunk_size_out_of_bounds_is_refused(small_model: Path, size: int) -> None:
    """Chunk sizes outside 1 KiB..256 KiB are refused with the allowed range."""
    with pytest.raises(PlanError, match="outside"):
        build_manifest(small_model, "1", options=PlanOptions(chunk_size=size))


def test_rollout_id_is_a_valid_topic_level() -> None:
    """Rollout ids made from awkward versions are still one valid topic level."""
    rid = rollout_id_for("1.0.0+build/7 beta:x", "ab" * 32, now=1.0)
    assert topics.validate_id(rid, "rollout id") == rid
    assert rid.startswith("1.0.0_build_7_beta_x-abababab-")
    # Execution ids append ":r{n}" or ":shadow" (docs/rollouts.md), so ids stay short and colon-free.
    longest = rollout_id_for("v" * 200, "ab" * 32, now=4102444800.0)
    assert len(longest) <= 56
    assert ":" not in longest
