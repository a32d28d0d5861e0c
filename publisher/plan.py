"""Model file -> manifest: hashes, chunking, tensor contract and golden cases.

Everything here reads the model file by offset (or through ``mmap``), so a multi-gigabyte model is
never held in memory.  The only non-pure step, computing golden outputs, takes the inference runtime
as an argument; the caller decides which one (``device.runtime.default_runtime()`` in practice).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from publisher.errors import PlanError
from schemas.messages import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, GoldenCase, Manifest, TensorSig

if TYPE_CHECKING:
    from device.runtime import InferenceRuntime

# 256 KiB: amqtt's cost is per message, so a quarter of the messages moved 16 MB to 10 agents in
# 0.48 s instead of 0.84 s (bench/device.py); Mosquitto and the hardened broker take 1 MiB payloads.
DEFAULT_CHUNK_SIZE = 256 * 1024
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")  # no ":": it separates execution-id suffixes
# Integer outputs from two runtimes may round a requantization tie differently: one step apart.
_INT_ATOL = 1.0


@dataclass(frozen=True)
class PlanOptions:
    """How to turn a model file into a manifest; every field has a working default."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    name: str = "model"
    golden_count: int = 3
    golden_seed: int = 0
    atol: float = 1e-5
    rtol: float = 1e-4
    latency_budget_ms: float | None = None
    arena_budget_bytes: int | None = None
    timeout_s: float = 600.0
    rollback: bool = False
    shadow: bool = False
    # False lets a test push a deliberately broken file so that devices can be seen refusing it.
    strict: bool = True


@dataclass(frozen=True)
class FileDigest:
    """The size and hashes of a model file, as the manifest lists them."""

    size: int
    sha256: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)


@dataclass(frozen=True)
class Contract:
    """What the model promises: its tensors, its ops and what the runtime measured."""

    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    ops: tuple[str, ...]


def check_chunk_size(chunk_size: int) -> int:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise PlanError(
            f"chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes; "
            f"the default, {DEFAULT_CHUNK_SIZE // 1024} KiB, suits amqtt and Mosquitto alike"
        )
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, math.ceil(size / chunk_size))


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` in a file of ``size`` bytes."""
    if index < 0 or index >= chunk_count(size, chunk_size):
        raise PlanError(f"chunk {index} is outside a {size}-byte file cut into {chunk_size}-byte chunks")
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


def read_chunk(fh: BinaryIO, size: int, chunk_size: int, index: int) -> bytes:
    """Read one chunk from an open file by offset."""
    offset, length = chunk_span(size, chunk_size, index)
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise PlanError(f"model file shrank: chunk {index} has {len(data)} of {length} bytes")
    return data


def iter_chunks(path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the chunks of a file in order, one chunk in memory at a time."""
    check_chunk_size(chunk_size)
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            yield block


def digest_file(path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileDigest:
    """Hash a file and each of its chunks in one streaming pass."""
    check_chunk_size(chunk_size)
    whole = hashlib.sha256()
    per_chunk: list[str] = []
    size = 0
    try:
        for block in iter_chunks(path, chunk_size):
            whole.update(block)
            per_chunk.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    except OSError as exc:
        raise PlanError(f"cannot read model file {os.fspath(path)}: {exc.strerror or exc}") from None
    if size == 0:
        raise PlanError(f"model file {os.fspath(path)} is empty")
    return FileDigest(size, whole.hexdigest(), chunk_size, tuple(per_chunk))


def _sig(info: Any) -> TensorSig:
    return TensorSig(
        name=info.name, shape=list(info.shape), dtype=info.dtype, scale=info.scale, zero_point=info.zero_point
    )


def read_contract(path: str | os.PathLike[str]) -> Contract:
    """Tensor signature and ops of a .tflite file, parsed through mmap (never read whole)."""
    from publisher.modelgen import InvalidModel, model_ops, tensor_signature

    problem: str | None = None
    try:
        with open(path, "rb") as fh:
            view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read model file {os.fspath(path)}: {exc}") from None
    buf: Any = view  # flatbuffers reads through the buffer protocol; mmap provides it
    try:
        inputs, outputs = tensor_signature(buf)
        ops = model_ops(buf)
    except InvalidModel as exc:
        problem = str(exc)
    finally:
        del buf
        # A failed parse can leave a traceback holding a view into the map; let GC unmap it then.
        with contextlib.suppress(BufferError):
            view.close()
    if problem is not None:
        raise PlanError(f"{os.fspath(path)} is not a usable TFLite model: {problem}")
    return Contract(tuple(_sig(i) for i in inputs), tuple(_sig(o) for o in outputs), tuple(ops))


def _random_input(sig: TensorSig, rng: np.random.Generator) -> npt.NDArray[Any]:
    shape = tuple(sig.shape)
    dtype = np.dtype(sig.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    return rng.uniform(-1.0, 3.0, size=shape).astype(dtype)


def golden_cases(
    path: str | os.PathLike[str],
    runtime: InferenceRuntime,
    *,
    count: int = 3,
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> tuple[list[GoldenCase], int]:
    """Run the model on ``count`` seeded random inputs; returns the cases and the arena estimate.

    The device runs the same inputs before it commits and compares within the tolerances.
    """
    try:
        model = runtime.load(path)
    except Exception as exc:  # each runtime raises its own types; the device agent's adapter says why
        raise PlanError(f"the model does not load in {runtime.name} {runtime.version}: {exc}") from None
    try:
        rng = np.random.default_rng(seed)
        integer_out = any(np.issubdtype(np.dtype(o.dtype), np.integer) for o in model.outputs)
        cases: list[GoldenCase] = []
        for _ in range(count):
            x = [_random_input(_sig(s), rng) for s in model.inputs]
            y = model.invoke(x)
            cases.append(
                GoldenCase(
                    inputs=[a.astype(np.float64).ravel().tolist() for a in x],
                    expected=[a.astype(np.float64).ravel().tolist() for a in y],
                    atol=max(atol, _INT_ATOL) if integer_out else atol,
                    rtol=rtol,
                )
            )
        for case in cases:
            if any(not math.isfinite(v) for out in case.expected for v in out):
                raise PlanError("the model produces NaN or infinite outputs on golden inputs; refusing it")
        return cases, model.arena_bytes()
    finally:
        model.close()


def rollout_id_for(version: str, sha256: str, now: float | None = None) -> str:
    """A fresh rollout id that names the version: ``{version}-{sha[:8]}-{time in hex}``."""
    stamp = format(int((time.time() if now is None else now) * 1000), "x")
    safe = _UNSAFE_ID_CHARS.sub("_", version)[:32].lstrip("._-") or "v"
    return f"{safe}-{sha256[:8]}-{stamp}"


def build_manifest(
    path: str | os.PathLike[str],
    version: str,
    rollout_id: str | None = None,
    options: PlanOptions | None = None,
    runtime: InferenceRuntime | None = None,
) -> Manifest:
    """The manifest of the model at ``path``; golden cases and the arena need a ``runtime``."""
    opts = options or PlanOptions()
    if not Path(path).is_file():
        raise PlanError(f"model file {os.fspath(path)} does not exist or is not a file")
    digest = digest_file(path, opts.chunk_size)
    try:
        contract = read_contract(path)
    except PlanError:
        if opts.strict:
            raise
        contract = Contract((), (), ())
    golden: list[GoldenCase] = []
    arena: int | None = None
    if runtime is not None and opts.golden_count > 0:
        try:
            golden, arena = golden_cases(
                path, runtime, count=opts.golden_count, seed=opts.golden_seed, atol=opts.atol, rtol=opts.rtol
            )
        except PlanError:
            if opts.strict:
                raise
    try:
        return Manifest(
            rollout_id=rollout_id or rollout_id_for(version, digest.sha256),
            name=opts.name,
            version=version,
            model_sha256=digest.sha256,
            size=digest.size,
            chunk_size=digest.chunk_size,
            chunk_sha256=list(digest.chunk_sha256),
            inputs=list(contract.inputs),
            outputs=list(contract.outputs),
            ops=list(contract.ops),
            arena_bytes=arena,
            golden=golden,
            latency_budget_ms=opts.latency_budget_ms,
            arena_budget_bytes=opts.arena_budget_bytes,
            rollback=opts.rollback,
            shadow=opts.shadow,
            timeout_s=opts.timeout_s,
        )
    except ValueError as exc:  # pydantic's ValidationError: a version or id the schema refuses
        raise PlanError(f"cannot build a manifest: {exc}") from None
