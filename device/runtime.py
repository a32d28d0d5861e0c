"""The one place the device touches a TFLite interpreter.

`InferenceRuntime` and `LoadedModel` are what the rest of the agent codes against, so another engine
(ONNX Runtime, say) can be added as one more adapter.  `LiteRtRuntime` serves both LiteRT
(`ai_edge_litert`) and tflite-runtime (`tflite_runtime`), whose interpreter APIs are the same.
Neither is imported until a model is loaded or the ops are probed: the interpreter alone costs
about 10 MiB of RSS, which an agent that is only downloading should not pay.

Both apply the XNNPACK delegate by default, which packs a float model's weights into a copy of its
own: a 69 MiB model then costs 141 MiB of RSS (the mapped file plus 69 MiB of packed weights)
instead of 72, for 1.6 to 1.8 times faster inference (docs/device.md, "Measured").  A board short
of memory sets ``FLEETBUS_XNNPACK=0`` to run the builtin kernels on the mapped weights alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import numpy.typing as npt

from device.dist import installed_version
from device.errors import ModelLoadError, RuntimeUnavailable

Backend = Literal["litert", "tflite-runtime"]
RUNTIME_ENV = "FLEETBUS_RUNTIME"
XNNPACK_ENV = "FLEETBUS_XNNPACK"
_SWITCH = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}
# backend -> (module that holds Interpreter, distribution that carries the version)
_BACKENDS: dict[str, tuple[str, str]] = {
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime", "tflite-runtime"),
}
# Used only when no schema package is installed to read the full list of builtin codes from:
# operators every TFLite runtime since 2.4 has, so the probe below still has something to check.
_COMMON_OPS = {
    "ADD": 0,
    "AVERAGE_POOL_2D": 1,
    "CONCATENATION": 2,
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 4,
    "DEQUANTIZE": 6,
    "FULLY_CONNECTED": 9,
    "L2_NORMALIZATION": 11,
    "LOGISTIC": 14,
    "MAX_POOL_2D": 17,
    "MUL": 18,
    "RELU": 19,
    "RELU6": 21,
    "RESHAPE": 22,
    "RESIZE_BILINEAR": 23,
    "SOFTMAX": 25,
    "TANH": 28,
    "PAD": 34,
    "GATHER": 36,
    "TRANSPOSE": 39,
    "MEAN": 40,
    "SUB": 41,
    "DIV": 42,
    "SQUEEZE": 43,
    "STRIDED_SLICE": 45,
    "EXP": 47,
    "SPLIT": 49,
    "MAXIMUM": 55,
    "ARG_MAX": 56,
    "MINIMUM": 57,
    "SLICE": 65,
    "TRANSPOSE_CONV": 67,
    "SUM": 74,
    "SQRT": 75,
    "RSQRT": 76,
    "PACK": 83,
    "UNPACK": 88,
    "RESIZE_NEAREST_NEIGHBOR": 97,
    "LEAKY_RELU": 98,
    "QUANTIZE": 114,
    "HARD_SWISH": 117,
}
_ENUM_RE = re.compile(r"^class BuiltinOperator\(object\):\n((?:    \w+ = \d+\n)+)", re.MULTILINE)


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a loaded model; scale and zero_point are None unless it is quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None
    zero_point: int | None


class LoadedModel(Protocol):
    """A model with its tensors allocated, ready to run."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def invoke(self, inputs: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]: ...

    def arena_bytes(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> LoadedModel: ...

    def __exit__(self, *exc: object) -> None: ...


class InferenceRuntime(Protocol):
    """An inference engine the device can load models into."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def load(self, path: str | os.PathLike[str], num_threads: int = 1) -> LoadedModel: ...

    def supported_ops(self) -> list[str]: ...


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail["quantization"]
    quantized = scale != 0.0
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale) if quantized else None,
        zero_point=int(zero_point) if quantized else None,
    )


class LiteRtModel:
    """A model in a LiteRT or tflite-runtime interpreter."""

    def __init__(self, interpreter: Any) -> None:
        self._interpreter: Any = interpreter
        self._input_details = interpreter.get_input_details()
        self._output_details = interpreter.get_output_details()
        self.inputs = [_spec(d) for d in self._input_details]
        self.outputs = [_spec(d) for d in self._output_details]

    def invoke(self, inputs: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Run once; inputs must match `self.inputs` in count, shape and dtype exactly.

        Mismatches raise ValueError before the interpreter sees them, since silently casting a
        float into an int8 input would give wrong answers rather than an error.  A kernel failing
        during the run raises the interpreter's RuntimeError unchanged.
        """
        it = self._live()
        if len(inputs) != len(self.inputs):
            raise ValueError(f"model takes {len(self.inputs)} inputs, got {len(inputs)}")
        for spec, detail, value in zip(self.inputs, self._input_details, inputs, strict=True):
            arr = np.ascontiguousarray(value)
            if arr.shape != spec.shape or arr.dtype.name != spec.dtype:
                raise ValueError(
                    f"input {spec.name!r} wants {spec.dtype}{list(spec.shape)}, "
                    f"got {arr.dtype.name}{list(arr.shape)}"
                )
            it.set_tensor(detail["index"], arr)
        it.invoke()
        # get_tensor returns a copy, so results survive the next invoke.
        return [it.get_tensor(d["index"]) for d in self._output_details]

    def arena_bytes(self) -> int:
        """Bytes of every tensor the model computes, inputs included; constants are not counted.

        An upper bound: the arena planner reuses memory between tensors whose lifetimes do not
        overlap and the XNNPACK delegate plans its own workspace, but neither exposes a figure.
        """
        it = self._live()
        # Node details list the original nodes as well as any delegate node, so every computed
        # tensor appears as some node's output.  The method is private (in both runtimes since
        # TF 2.3); without it, constants are counted too, which still gives an upper bound.
        ops_details = getattr(it, "_get_ops_details", None)
        computed: set[int] | None = None
        if ops_details is not None:
            computed = {int(d["index"]) for d in self._input_details}
            for node in ops_details():
                computed.update(int(i) for i in node["outputs"] if i >= 0)
        total = 0
        for detail in it.get_tensor_details():
            if computed is None or int(detail["index"]) in computed:
                total += int(np.prod(detail["shape"], dtype=np.int64)) * np.dtype(detail["dtype"]).itemsize
        return total

    def close(self) -> None:
        """Free the interpreter; the model cannot be used afterwards."""
        self._interpreter = None

    def __enter__(self) -> LiteRtModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Any:
        if self._interpreter is None:
            raise ValueError("model is closed")
        return self._interpreter


class LiteRtRuntime:
    """LiteRT or tflite-runtime, imported on first use."""

    def __init__(self, backend: Backend = "litert", *, xnnpack: bool = True) -> None:
        module, dist = _BACKENDS[backend]
        self.name: str = backend
        self.xnnpack = xnnpack
        self._module = module
        self.version: str = installed_version(dist) or "unknown"
        self._interpreter_cls: Any = None
        self._resolver_without_delegates: Any = None
        self._ops: list[str] | None = None

    def load(self, path: str | os.PathLike[str], num_threads: int = 1) -> LiteRtModel:
        """Load and allocate the model at `path`, or raise ModelLoadError saying why not."""
        cls = self._interpreter_class()
        options: dict[str, Any] = {}
        if not self.xnnpack:
            options["experimental_op_resolver_type"] = self._resolver_without_delegates
        try:
            interpreter = cls(model_path=os.fspath(path), num_threads=num_threads, **options)
            interpreter.allocate_tensors()
        except ImportError as exc:
            # tflite-runtime's wheels, built against numpy 1.x, can import and then fail to start
            # an interpreter under numpy 2 ("_ARRAY_API not found"): that is the runtime, not the model.
            raise RuntimeUnavailable(
                f"{self.name} cannot start ({exc}); with tflite-runtime use numpy<2"
            ) from None
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())
            where = f"{self.name} {self.version} cannot load {os.fspath(path)}"
            raise ModelLoadError(f"{where}: {reason}") from None
        return LiteRtModel(interpreter)

    def supported_ops(self) -> list[str]:
        """Names of the builtin operators this runtime can build an interpreter for, sorted.

        Why a probe: neither runtime lists its registered kernels, and the schema's enum is a
        superset (it names ops like STABLEHLO_* or CONCAT_EMBEDDINGS that no kernel implements).
        So each code gets a one-operator model; the interpreter refuses to construct when the op
        is missing.  About 200 constructions take some 15 ms, once per runtime object.
        """
        if self._ops is None:
            cls = self._interpreter_class()
            self._ops = sorted(name for name, code in _builtin_codes().items() if _has_op(cls, code))
        return list(self._ops)

    def _interpreter_class(self) -> Any:
        if self._interpreter_cls is None:
            try:
                mod = importlib.import_module(f"{self._module}.interpreter")
            except ImportError as exc:
                hint = "install ai-edge-litert, or tflite-runtime with numpy<2"
                raise RuntimeUnavailable(f"{self.name} is not usable ({exc}): {hint}") from None
            self._interpreter_cls = mod.Interpreter
            self._resolver_without_delegates = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return self._interpreter_cls


def default_runtime() -> InferenceRuntime:
    """The runtime named by $FLEETBUS_RUNTIME, else LiteRT if installed, else tflite-runtime.

    $FLEETBUS_XNNPACK=0 turns the XNNPACK delegate off (see the module docstring).
    """
    switch = os.environ.get(XNNPACK_ENV, "1").strip().lower()
    if switch not in _SWITCH:
        raise RuntimeUnavailable(f"{XNNPACK_ENV}={switch!r}: expected 1 or 0 (true/false, on/off)")
    forced = os.environ.get(RUNTIME_ENV, "").strip()
    if forced:
        if forced not in _BACKENDS:
            raise RuntimeUnavailable(f"{RUNTIME_ENV}={forced!r}: expected one of {', '.join(_BACKENDS)}")
        candidates = [forced]
    else:
        candidates = list(_BACKENDS)
    for backend in candidates:
        # find_spec locates a top-level package without running it, so choosing costs no RSS.
        if importlib.util.find_spec(_BACKENDS[backend][0]) is not None:
            return LiteRtRuntime(cast(Backend, backend), xnnpack=_SWITCH[switch])
    raise RuntimeUnavailable(
        f"no TFLite runtime installed (looked for {', '.join(candidates)}): "
        "pip install ai-edge-litert, or tflite-runtime on armv7l"
    )


# --- op probing ---------------------------------------------------------------------------------


def _builtin_codes() -> dict[str, int]:
    """Builtin operator names and codes from a TFLite schema, read as text.

    Reading the generated enum's source rather than importing it keeps the schema's thousands of
    generated classes (about 4 MiB) out of the agent's memory.
    """
    for package, filename in (("ai_edge_litert", "schema_py_generated.py"), ("tflite", "BuiltinOperator.py")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        source = Path(next(iter(spec.submodule_search_locations)), filename)
        match = _ENUM_RE.search(source.read_text(encoding="utf-8")) if source.is_file() else None
        if match:
            pairs = (line.split(" = ") for line in match.group(1).strip().splitlines())
            return {name.strip(): int(code) for name, code in pairs}
    return dict(_COMMON_OPS)


def _has_op(interpreter_cls: Any, code: int) -> bool:
    # Kernels are registered for a range of versions, not always from 1 (BROADCAST_TO starts at 2).
    for version in (1, 2, 3):
        try:
            interpreter_cls(model_content=_probe_model(code, version))
        except (ValueError, RuntimeError):
            continue
        return True
    return False


def _table(buf: bytearray, fields: dict[int, tuple[str, int]]) -> tuple[int, dict[int, int]]:
    """Append a flatbuffer table, its vtable first; returns where the table and each field start."""
    order = sorted(fields, key=lambda f: -struct.calcsize(fields[f][0]))
    vtable = [0] * (max(fields) + 1 if fields else 0)
    size = 4
    for f in order:
        vtable[f] = size
        size += struct.calcsize(fields[f][0])
    size += -size % 4
    vt_pos = len(buf)
    buf += struct.pack(f"<{2 + len(vtable)}H", 4 + 2 * len(vtable), size, *vtable)
    buf += bytes(-len(buf) % 4)
    table_pos = len(buf)
    buf += struct.pack("<i", table_pos - vt_pos) + bytes(size - 4)
    for f in order:
        struct.pack_into(fields[f][0], buf, table_pos + vtable[f], fields[f][1])
    return table_pos, {f: table_pos + vtable[f] for f in fields}


def _link(buf: bytearray, at: int, target: int) -> None:
    """Store at `at` the uoffset to `target`: flatbuffer offsets count from their own position."""
    struct.pack_into("<I", buf, at, target - at)


def _probe_model(code: int, version: int) -> bytes:
    """The smallest model naming one builtin operator, with no operators, tensors or data.

    Written by hand so probing needs neither flatbuffers nor a schema package on the board.
    """
    buf = bytearray(8)
    buf[4:8] = b"TFL3"
    # Model: version=3, then vectors of one table each: operator_codes (1), subgraphs (2), buffers (4).
    root, model = _table(buf, {0: ("<I", 3), 1: ("<I", 0), 2: ("<I", 0), 4: ("<I", 0)})
    _link(buf, 0, root)
    children: dict[int, dict[int, tuple[str, int]]] = {
        1: {0: ("<b", min(code, 127)), 2: ("<i", version), 3: ("<i", code)},  # OperatorCode
        2: {0: ("<I", 0), 1: ("<I", 0), 2: ("<I", 0), 3: ("<I", 0)},  # SubGraph: 4 empty vectors
        4: {},  # Buffer 0, the empty one every model starts with
    }
    for field_id, fields in children.items():
        _link(buf, model[field_id], len(buf))
        element = len(buf) + 4
        buf += struct.pack("<II", 1, 0)
        table, slots = _table(buf, fields)
        _link(buf, element, table)
        if field_id == 2:
            for slot in slots.values():
                _link(buf, slot, len(buf))
                buf += struct.pack("<I", 0)
    return bytes(buf)
