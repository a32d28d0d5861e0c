"""Real .tflite models, built without TensorFlow, for tests, demos and benchmarks.

`build_model` writes a FULLY_CONNECTED (fused RELU) followed by an ADD of a constant, with optional
identity layers that cost time but leave the output unchanged; `reference_output` is the same
computation in numpy.  `build_broken` makes the models a device must refuse or survive.
`model_ops` and `tensor_signature` read any .tflite file back, for manifests and compatibility checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import flatbuffers
import numpy as np
import numpy.typing as npt
import tflite
from tflite.utils import BUILTIN_OPCODE2NAME

BrokenKind = Literal["truncated", "garbage", "bad_op", "nan_output", "wrong_shape", "huge_arena"]
BAD_CUSTOM_OP = "FleetbusNoSuchOp"
HUGE_ARENA_BYTES = 8 << 20

# The schema stores codes past 126 only in `builtin_code`; the old int8 field holds this placeholder.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
_INT8_OP_VERSIONS = {tflite.BuiltinOperator.FULLY_CONNECTED: 4, tflite.BuiltinOperator.ADD: 2}
_TYPE_NAMES = {v: k.lower() for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
# Inputs are quantized over [-1, 3) so that the zero point is not 0 and a mix-up shows.
_INPUT_SCALE, _INPUT_ZERO_POINT = 4.0 / 255.0, -64


class InvalidModel(ValueError):
    """The bytes are not a TFLite flatbuffer this module can read."""


@dataclass(frozen=True)
class ModelSpec:
    """What `build_model` makes: [1, input_size] -> [1, output_size].

    `slow` chains that many identity FULLY_CONNECTED layers of width `hidden` (or output_size when
    hidden is 0) before the ADD: same output, more work.  `pad_to` grows the file with an unused buffer.
    """

    input_size: int = 4
    output_size: int = 3
    seed: int = 0
    bias_add: float = 0.0
    pad_to: int = 0
    dtype: Literal["float32", "int8"] = "float32"
    slow: int = 0
    hidden: int = 0


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of a model; scale and zero_point are None unless quantized per tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None
    zero_point: int | None


@dataclass(frozen=True)
class _Quant:
    scale: float
    zero_point: int


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ttype: int
    data: bytes | None
    quant: _Quant | None


@dataclass
class _Op:
    code: int | str
    inputs: list[int]
    outputs: list[int]
    version: int
    options: tuple[int, Callable[[flatbuffers.Builder], int]] | None


@dataclass
class _Graph:
    """The tensors and operators of one subgraph, in the order the flatbuffer stores them."""

    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(
        self,
        shape: tuple[int, ...],
        ttype: int,
        data: npt.NDArray[Any] | None = None,
        quant: _Quant | None = None,
        name: str = "",
    ) -> int:
        raw = None if data is None else np.ascontiguousarray(data).tobytes()
        self.tensors.append(_Tensor(name or f"t{len(self.tensors)}", shape, ttype, raw, quant))
        return len(self.tensors) - 1

    def op(
        self,
        code: int | str,
        inputs: list[int],
        outputs: list[int],
        version: int = 1,
        options: tuple[int, Callable[[flatbuffers.Builder], int]] | None = None,
    ) -> None:
        self.ops.append(_Op(code, inputs, outputs, version, options))


def _fc_options(relu: bool) -> tuple[int, Callable[[flatbuffers.Builder], int]]:
    def build(b: flatbuffers.Builder) -> int:
        tflite.FullyConnectedOptionsStart(b)
        act = tflite.ActivationFunctionType.RELU if relu else tflite.ActivationFunctionType.NONE
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, act)
        return int(tflite.FullyConnectedOptionsEnd(b))

    return tflite.BuiltinOptions.FullyConnectedOptions, build


def _add_options() -> tuple[int, Callable[[flatbuffers.Builder], int]]:
    def build(b: flatbuffers.Builder) -> int:
        tflite.AddOptionsStart(b)
        return int(tflite.AddOptionsEnd(b))

    return tflite.BuiltinOptions.AddOptions, build


# --- the numbers both the model and the reference use -------------------------------------------


def _weights(spec: ModelSpec) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(spec.seed)
    w = rng.uniform(-1.0, 1.0, (spec.output_size, spec.input_size)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, spec.output_size).astype(np.float32)
    return w, b


def _identity_chain(spec: ModelSpec) -> list[npt.NDArray[np.float32]]:
    """Weights of the `slow` layers; zero rows and columns pad to `hidden`, so the product is exact."""
    if spec.slow <= 0:
        return []
    n = spec.output_size
    width = max(spec.hidden, n)
    expand = np.eye(width, n, dtype=np.float32)
    chain = [np.eye(width, dtype=np.float32) for _ in range(spec.slow)]
    return [expand, *chain, expand.T.copy()] if width > n else chain


def _range_quant(lo: float, hi: float) -> _Quant:
    scale = max(hi - lo, 1e-6) / 255.0
    return _Quant(scale, int(np.clip(round(-128 - lo / scale), -128, 127)))


@dataclass(frozen=True)
class _Int8Plan:
    """Quantized weights and the scale and zero point of every activation."""

    wq: npt.NDArray[np.int8]
    w_scale: float
    bq: npt.NDArray[np.int32]
    hidden: _Quant
    const_q: int
    const: _Quant
    out: _Quant


def _int8_plan(spec: ModelSpec) -> _Int8Plan:
    w, b = _weights(spec)
    w_scale = float(np.abs(w).max()) / 127.0
    wq = np.round(w / w_scale).astype(np.int8)
    bq = np.round(b / (_INPUT_SCALE * w_scale)).astype(np.int32)
    # The largest |x| over the input range is 3: this bounds the FULLY_CONNECTED output.
    top = float((np.abs(wq.astype(np.float64)) * w_scale * 3).sum(axis=1).max() + np.abs(b).max())
    hidden = _Quant(top / 255.0, -128)
    c = spec.bias_add
    const = _Quant(abs(c) / 127.0, 0) if c else _Quant(1.0, 0)
    const_q = int(np.sign(c) * 127) if c else 0
    return _Int8Plan(wq, w_scale, bq, hidden, const_q, const, _range_quant(min(0.0, c), top + max(0.0, c)))


# --- building ----------------------------------------------------------------------------------


def _float_graph(spec: ModelSpec, add_value: float, arena_rows: int = 0) -> _Graph:
    g = _Graph()
    f32 = tflite.TensorType.FLOAT32
    w, b = _weights(spec)
    x = g.tensor((1, spec.input_size), f32, name="input")
    g.inputs.append(x)
    if arena_rows:
        # PAD grows the batch to `arena_rows` zero rows and SLICE keeps row 0: a big arena, same result.
        pads = g.tensor((2, 2), tflite.TensorType.INT32, np.array([[0, arena_rows - 1], [0, 0]], np.int32))
        big = g.tensor((arena_rows, spec.input_size), f32)
        g.op(tflite.BuiltinOperator.PAD, [x, pads], [big])
        x = big
    rows = g.tensors[x].shape[0]
    h = g.tensor((rows, spec.output_size), f32)
    wt, bt = g.tensor(w.shape, f32, w), g.tensor(b.shape, f32, b)
    g.op(tflite.BuiltinOperator.FULLY_CONNECTED, [x, wt, bt], [h], options=_fc_options(relu=True))
    if arena_rows:
        begin = g.tensor((2,), tflite.TensorType.INT32, np.zeros(2, np.int32))
        size = g.tensor((2,), tflite.TensorType.INT32, np.array([1, spec.output_size], np.int32))
        row = g.tensor((1, spec.output_size), f32)
        g.op(tflite.BuiltinOperator.SLICE, [h, begin, size], [row])
        h = row
    for m in _identity_chain(spec):
        nxt = g.tensor((1, m.shape[0]), f32)
        g.op(
            tflite.BuiltinOperator.FULLY_CONNECTED,
            [h, g.tensor(m.shape, f32, m), -1],
            [nxt],
            options=_fc_options(relu=False),
        )
        h = nxt
    const = g.tensor((1, spec.output_size), f32, np.full((1, spec.output_size), add_value, np.float32))
    y = g.tensor((1, spec.output_size), f32, name="output")
    g.op(tflite.BuiltinOperator.ADD, [h, const], [y], options=_add_options())
    g.outputs.append(y)
    return g


def _int8_graph(spec: ModelSpec) -> _Graph:
    g, p = _Graph(), _int8_plan(spec)
    i8, fc = tflite.TensorType.INT8, tflite.BuiltinOperator.FULLY_CONNECTED
    x = g.tensor((1, spec.input_size), i8, quant=_Quant(_INPUT_SCALE, _INPUT_ZERO_POINT), name="input")
    g.inputs.append(x)
    wt = g.tensor(p.wq.shape, i8, p.wq, _Quant(p.w_scale, 0))
    bt = g.tensor(p.bq.shape, tflite.TensorType.INT32, p.bq, _Quant(_INPUT_SCALE * p.w_scale, 0))
    h = g.tensor((1, spec.output_size), i8, quant=p.hidden)
    g.op(fc, [x, wt, bt], [h], _INT8_OP_VERSIONS[fc], _fc_options(relu=True))
    # A weight of 127 at scale 1/127 is exactly 1.0, so each identity layer keeps the quantization.
    for m in _identity_chain(spec):
        mt = g.tensor(m.shape, i8, (m * 127).astype(np.int8), _Quant(1.0 / 127.0, 0))
        nxt = g.tensor((1, m.shape[0]), i8, quant=p.hidden)
        g.op(fc, [h, mt, -1], [nxt], _INT8_OP_VERSIONS[fc], _fc_options(relu=False))
        h = nxt
    const = g.tensor((1, spec.output_size), i8, np.full((1, spec.output_size), p.const_q, np.int8), p.const)
    y = g.tensor((1, spec.output_size), i8, quant=p.out, name="output")
    g.op(
        tflite.BuiltinOperator.ADD,
        [h, const],
        [y],
        _INT8_OP_VERSIONS[tflite.BuiltinOperator.ADD],
        _add_options(),
    )
    g.outputs.append(y)
    return g


def _byte_vector(b: flatbuffers.Builder, data: bytes) -> int:
    # 16-byte alignment lets the runtime use constant data in place, as TensorFlow's converter does.
    b.StartVector(1, len(data), 16)
    b.head -= len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _vector(b: flatbuffers.Builder, items: list[int], *, offsets: bool = False) -> int:
    b.StartVector(4, len(items), 4)
    for item in reversed(items):
        if offsets:
            b.PrependUOffsetTRelative(item)
        else:
            b.PrependInt32(item)
    return int(b.EndVector())


def _quant_table(b: flatbuffers.Builder, q: _Quant) -> int:
    scale = b.CreateNumpyVector(np.array([q.scale], np.float32))
    zero = b.CreateNumpyVector(np.array([q.zero_point], np.int64))
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale)
    tflite.QuantizationParametersAddZeroPoint(b, zero)
    return int(tflite.QuantizationParametersEnd(b))


def _op_key(op: _Op) -> str | tuple[int, int]:
    return op.code if isinstance(op.code, str) else (op.code, op.version)


def _write_buffers(b: flatbuffers.Builder, g: _Graph, pad: int) -> list[int]:
    # Buffer 0 stays empty by convention: tensors computed at run time point at it.
    datas = [b""] + [t.data for t in g.tensors if t.data is not None] + ([bytes(pad)] if pad else [])
    buffers = []
    for data in datas:
        vec = _byte_vector(b, data) if data else None
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffers.append(tflite.BufferEnd(b))
    return buffers


def _write_tensors(b: flatbuffers.Builder, g: _Graph) -> list[int]:
    tensors, next_buffer = [], 1
    for t in g.tensors:
        name, shape = b.CreateString(t.name), _vector(b, list(t.shape))
        quant = _quant_table(b, t.quant) if t.quant else None
        tflite.TensorStart(b)
        tflite.TensorAddName(b, name)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, t.ttype)
        if t.data is not None:
            tflite.TensorAddBuffer(b, next_buffer)
            next_buffer += 1
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensors.append(tflite.TensorEnd(b))
    return tensors


def _write_ops(b: flatbuffers.Builder, g: _Graph, codes: list[str | tuple[int, int]]) -> list[int]:
    ops = []
    for op in g.ops:
        ins, outs = _vector(b, op.inputs), _vector(b, op.outputs)
        options = (op.options[0], op.options[1](b)) if op.options else None
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(_op_key(op)))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, options[0])
            tflite.OperatorAddBuiltinOptions(b, options[1])
        ops.append(tflite.OperatorEnd(b))
    return ops


def _serialize(g: _Graph, pad: int = 0) -> bytes:
    b = flatbuffers.Builder(1024 + pad)
    codes = list(dict.fromkeys(_op_key(op) for op in g.ops))
    buffers, tensors, ops = _write_buffers(b, g, pad), _write_tensors(b, g), _write_ops(b, g, codes)
    code_tables = [_opcode_table(b, key) for key in codes]
    sg_tensors, sg_ops = _vector(b, tensors, offsets=True), _vector(b, ops, offsets=True)
    sg_in, sg_out, sg_name = _vector(b, g.inputs), _vector(b, g.outputs), b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, sg_tensors)
    tflite.SubGraphAddOperators(b, sg_ops)
    tflite.SubGraphAddInputs(b, sg_in)
    tflite.SubGraphAddOutputs(b, sg_out)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)
    model_codes, model_sgs = _vector(b, code_tables, offsets=True), _vector(b, [subgraph], offsets=True)
    model_bufs, desc = _vector(b, buffers, offsets=True), b.CreateString("fleetbus modelgen")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, model_codes)
    tflite.ModelAddSubgraphs(b, model_sgs)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, model_bufs)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _opcode_table(b: flatbuffers.Builder, key: str | tuple[int, int]) -> int:
    custom = b.CreateString(key) if isinstance(key, str) else None
    code, version = (tflite.BuiltinOperator.CUSTOM, 1) if isinstance(key, str) else key
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES))
    tflite.OperatorCodeAddBuiltinCode(b, code)
    tflite.OperatorCodeAddVersion(b, version)
    if custom is not None:
        tflite.OperatorCodeAddCustomCode(b, custom)
    return int(tflite.OperatorCodeEnd(b))


def _graph(spec: ModelSpec) -> _Graph:
    return _int8_graph(spec) if spec.dtype == "int8" else _float_graph(spec, spec.bias_add)


def _finish(g: _Graph, pad_to: int) -> bytes:
    model = _serialize(g)
    if len(model) >= pad_to:
        return model
    return _serialize(g, pad=pad_to - len(model))


def build_model(spec: ModelSpec) -> bytes:
    """The .tflite bytes for `spec`."""
    if spec.input_size < 1 or spec.output_size < 1 or spec.slow < 0 or spec.hidden < 0:
        raise ValueError(f"sizes must be positive: {spec}")
    return _finish(_graph(spec), spec.pad_to)


def write_model(path: str | os.PathLike[str], spec: ModelSpec) -> int:
    """Write the model for `spec` to `path`; returns its size in bytes."""
    data = build_model(spec)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def reference_output(spec: ModelSpec, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """What the model computes for `x` of shape (N, input_size) or (input_size,), in numpy.

    float32 matches within 1e-5.  int8 takes and returns int8 and is within one quantization
    step: the runtimes requantize in fixed point and round ties their own way.
    """
    if spec.dtype == "int8":
        return _int8_reference(spec, x)
    w, b = _weights(spec)
    h = np.maximum(np.asarray(x, np.float32).reshape(-1, spec.input_size) @ w.T + b, 0)
    for m in _identity_chain(spec):
        h = h @ m.T
    out: npt.NDArray[np.float32] = (h + np.float32(spec.bias_add)).astype(np.float32)
    return out


def _requantize(real: npt.NDArray[np.floating[Any]], q: _Quant, low: int = -128) -> npt.NDArray[np.int8]:
    out: npt.NDArray[np.int8] = np.clip(np.round(real / q.scale) + q.zero_point, low, 127).astype(np.int8)
    return out


def _int8_reference(spec: ModelSpec, x: npt.NDArray[Any]) -> npt.NDArray[np.int8]:
    p = _int8_plan(spec)
    xq = np.asarray(x).reshape(-1, spec.input_size).astype(np.int64)
    acc = (xq - _INPUT_ZERO_POINT) @ p.wq.T.astype(np.int64) + p.bq
    hq = _requantize(acc * (_INPUT_SCALE * p.w_scale), p.hidden, low=p.hidden.zero_point)
    real = (hq.astype(np.float64) - p.hidden.zero_point) * p.hidden.scale
    return _requantize(real + p.const_q * p.const.scale, p.out)


# --- broken models ------------------------------------------------------------------------------


def build_broken(kind: BrokenKind, spec: ModelSpec = ModelSpec()) -> bytes:
    """A model, based on `spec`, that a device must refuse or catch.

    - truncated: the first half of a valid model; does not load.
    - garbage: random bytes (at least 512, or `pad_to`) behind a TFL3 identifier; does not load.
    - bad_op: a valid flatbuffer whose last op is CUSTOM:FleetbusNoSuchOp; fails at allocation.
    - nan_output: runs, and every output is NaN (the ADD constant is NaN).
    - wrong_shape: runs, with output_size + 1 outputs.
    - huge_arena: computes the same as `spec`, through an intermediate of HUGE_ARENA_BYTES.

    nan_output and huge_arena are float32 whatever `spec.dtype` says.
    """
    if kind == "truncated":
        # Half a valid file: the root table points past the end.
        model = build_model(spec)
        return model[: len(model) // 2]
    if kind == "garbage":
        noise = np.random.default_rng(spec.seed).bytes(max(spec.pad_to, 512))
        return noise[:4] + b"TFL3" + noise[8:]
    if kind == "bad_op":
        # A custom op no runtime registers: the flatbuffer is valid, allocation is not.
        g = _graph(spec)
        y = g.outputs[0]
        out = g.tensor(g.tensors[y].shape, g.tensors[y].ttype, name="custom_output")
        g.op(BAD_CUSTOM_OP, [y], [out])
        g.outputs[0] = out
        return _finish(g, spec.pad_to)
    if kind == "nan_output":
        return _finish(_float_graph(spec, float("nan")), spec.pad_to)
    if kind == "wrong_shape":
        return build_model(replace(spec, output_size=spec.output_size + 1))
    if kind == "huge_arena":
        rows = max(2, HUGE_ARENA_BYTES // (4 * spec.input_size))
        return _finish(_float_graph(spec, spec.bias_add, arena_rows=rows), spec.pad_to)
    raise ValueError(f"unknown broken model kind {kind!r}")


# --- reading ------------------------------------------------------------------------------------


def _root(model_bytes: bytes) -> Any:
    if len(model_bytes) < 8 or not tflite.Model.ModelBufferHasIdentifier(model_bytes, 0):
        raise InvalidModel("not a TFLite model: the TFL3 file identifier is missing")
    return tflite.Model.GetRootAs(model_bytes, 0)


def _op_name(opcode: Any) -> str:
    code = max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode())
    if code == tflite.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{(opcode.CustomCode() or b'').decode('utf-8', 'replace')}"
    # A code newer than this schema keeps its number, so no runtime's name list can match it.
    return str(BUILTIN_OPCODE2NAME.get(code, f"BUILTIN_{code}"))


def model_ops(model_bytes: bytes) -> list[str]:
    """Sorted names of the operators the model runs, custom ones as "CUSTOM:<code>"."""
    try:
        model = _root(model_bytes)
        names = set()
        for s in range(model.SubgraphsLength()):
            sg = model.Subgraphs(s)
            for i in range(sg.OperatorsLength()):
                names.add(_op_name(model.OperatorCodes(sg.Operators(i).OpcodeIndex())))
    except InvalidModel:
        raise
    except Exception as exc:  # the generated readers raise whatever a bad offset leads to
        raise InvalidModel(f"unreadable TFLite model: {exc!r}") from None
    return sorted(names)


def _tensor_info(t: Any) -> TensorInfo:
    q = t.Quantization()
    scale = zero = None
    if q is not None and q.ScaleLength() == 1:
        scale, zero = float(q.Scale(0)), int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    return TensorInfo(
        (t.Name() or b"").decode(), shape, _TYPE_NAMES.get(t.Type(), str(t.Type())), scale, zero
    )


def tensor_signature(model_bytes: bytes) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The inputs and outputs of the model's first subgraph."""
    try:
        sg = _root(model_bytes).Subgraphs(0)
        inputs = [_tensor_info(sg.Tensors(int(i))) for i in sg.InputsAsNumpy()]
        outputs = [_tensor_info(sg.Tensors(int(i))) for i in sg.OutputsAsNumpy()]
    except InvalidModel:
        raise
    except Exception as exc:  # the generated readers raise whatever a bad offset leads to
        raise InvalidModel(f"unreadable TFLite model: {exc!r}") from None
    return inputs, outputs
