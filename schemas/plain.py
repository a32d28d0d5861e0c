"""The device's messages without pydantic: frozen dataclasses checked against the same contract.

pydantic and the built models cost the device agent about 9 MiB of its 45 MiB budget
(docs/device.md, "Measured"), so the agent decodes and encodes with this module instead of
``schemas.codec``. Each class has the name, fields, field order and defaults of its pydantic model
in ``schemas.messages``, and the same constraints; tests/schemas/test_plain.py holds the two to
each other, byte for byte on the wire.

The decoder accepts exactly what a correct msgpack encoder makes of a valid message: an int where
the contract says int (never a bool), an int or a float where it says float, str, bin for bytes,
arrays, maps with str keys, nil for an optional field. It may refuse what pydantic would coerce
(``"5"`` for an int) but never accepts what pydantic refuses. Unknown keys are ignored.

Constructing a class validates it too: a bad field raises ValueError (as pydantic's ValidationError
is one), and ``decode`` turns that into a DecodeError naming the field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import msgpack

from schemas import signing
from schemas.constants import (
    DEFAULT_MAX_BYTES,
    IDENT_MAX,
    IDENT_PATTERN,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SCHEMA_VERSION,
    SHA256_PATTERN,
    ExecStatus,
)
from schemas.errors import DecodeError, MessageTooLarge

if TYPE_CHECKING:
    from schemas.signing import PinnedKey

# Every kind of the pydantic contract (schemas.messages.KINDS; a test holds the two equal), so a
# publisher-side kind reaching a device is told apart from garbage.
KINDS: frozenset[str] = frozenset(
    {
        "manifest",
        "deploy",
        "chunk",
        "rebirth",
        "cancel",
        "birth",
        "death",
        "state",
        "health",
        "results",
        "fetch",
        "shadow",
        "aggregate",
        "rollout_control",
        "rollout_status",
    }
)


class _Invalid(ValueError):
    """One field that breaks the contract; ``str()`` is ``"field: problem"``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


# --- field checks: each takes (value, field path) and returns the value to store ----------------

_Check = Callable[[Any, str], Any]


def _str(min_len: int = 0, max_len: int | None = None, pattern: str | None = None) -> _Check:
    # fullmatch: pydantic's (Rust) regex `$` does not match before a trailing newline, Python's does.
    regex = re.compile(pattern) if pattern is not None else None

    def check(value: Any, name: str) -> str:
        if type(value) is not str:
            raise _Invalid(name, "Input should be a valid string")
        if len(value) < min_len:
            raise _Invalid(name, f"String should have at least {min_len} characters")
        if max_len is not None and len(value) > max_len:
            raise _Invalid(name, f"String should have at most {max_len} characters")
        if regex is not None and regex.fullmatch(value) is None:
            raise _Invalid(name, f"String should match pattern '{pattern}'")
        return value

    return check


def _int(ge: int | None = None, le: int | None = None, gt: int | None = None) -> _Check:
    def check(value: Any, name: str) -> int:
        if type(value) is not int:  # a bool is an int subclass, and not an int on this wire
            raise _Invalid(name, "Input should be a valid integer")
        if ge is not None and value < ge:
            raise _Invalid(name, f"Input should be greater than or equal to {ge}")
        if le is not None and value > le:
            raise _Invalid(name, f"Input should be less than or equal to {le}")
        if gt is not None and value <= gt:
            raise _Invalid(name, f"Input should be greater than {gt}")
        return value

    return check


def _float(gt: float | None = None) -> _Check:
    def check(value: Any, name: str) -> float:
        if type(value) is float:
            number = value
        elif type(value) is int:
            # pydantic stores an int given for a float as a float, and it goes out as one.
            try:
                number = float(value)
            except OverflowError:
                raise _Invalid(name, "Input should be a finite number") from None
        else:
            raise _Invalid(name, "Input should be a valid number")
        if gt is not None and not number > gt:  # `not >` also refuses NaN, as pydantic does
            raise _Invalid(name, f"Input should be greater than {gt}")
        return number

    return check


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise _Invalid(name, "Input should be a valid boolean")
    return value


def _bytes(value: Any, name: str) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is bytearray:
        return bytes(value)
    raise _Invalid(name, "Input should be a valid bytes")


def _optional(check: _Check) -> _Check:
    def optional(value: Any, name: str) -> Any:
        return None if value is None else check(value, name)

    return optional


def _list(check: _Check) -> _Check:
    def list_of(value: Any, name: str) -> list[Any]:
        if type(value) is not list and type(value) is not tuple:
            raise _Invalid(name, "Input should be a valid list")
        return [check(item, f"{name}.{i}") for i, item in enumerate(value)]

    return list_of


def _dict(check: _Check) -> _Check:
    def dict_of(value: Any, name: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise _Invalid(name, "Input should be a valid dictionary")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(f"{name}.{key!r}", "Keys should be valid strings")
            out[key] = check(item, f"{name}.{key}")
        return out

    return dict_of


def _literal(expected: str) -> _Check:
    def check(value: Any, name: str) -> str:
        if value != expected or type(value) is not str:
            raise _Invalid(name, f"Input should be '{expected}'")
        return expected

    return check


def _status(value: Any, name: str) -> ExecStatus:
    if isinstance(value, ExecStatus):
        return value
    if type(value) is str:
        try:
            return ExecStatus(value)
        except ValueError:
            pass
    choices = ", ".join(f"'{s.value}'" for s in ExecStatus)
    raise _Invalid(name, f"Input should be {choices}")


def _part(cls: type[_Part]) -> _Check:
    def check(value: Any, name: str) -> Any:
        if type(value) is cls:
            return value
        if type(value) is not dict:
            raise _Invalid(name, f"Input should be a valid dictionary or instance of {cls.__name__}")
        return _build(cls, value, name)

    return check


_IDENT = _str(1, IDENT_MAX, IDENT_PATTERN)
_SHA256 = _str(pattern=SHA256_PATTERN)
_SEQ = _int(ge=0, le=255)
_TEXT = _str()
_OPT_TEXT = _optional(_TEXT)
_INT = _int()
_FLOAT = _float()
_OPT_FLOAT = _optional(_FLOAT)
_TEXTS = _list(_TEXT)
_FLOAT_ROWS = _list(_list(_FLOAT))


# --- records ----------------------------------------------------------------------------------------


class _Checked:
    """Runs the class's CHECKS over the fields a dataclass __init__ just stored (a message's table
    starts with the ``v``, ``ts`` and ``kind`` checks that ``@_message`` puts in front)."""

    __slots__ = ()
    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = ()

    def __post_init__(self) -> None:
        for name, check in self.CHECKS:
            value = getattr(self, name)
            checked = check(value, name)
            if checked is not value:
                object.__setattr__(self, name, checked)  # frozen: only __init__ may store


def _build(cls: type[_C], raw: Mapping[str, Any], path: str = "") -> _C:
    """Make ``cls`` from a decoded map: known keys only, a missing required field named."""
    names, required = _FIELDS[cls]
    for name in required:
        if name not in raw:
            raise _Invalid(f"{path}.{name}" if path else name, "Field required")
    kwargs = {name: raw[name] for name in names if name in raw}
    if not path:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except _Invalid as exc:
        raise _Invalid(f"{path}.{exc.name}", exc.problem) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSig(_Checked):
    """One input or output tensor of a model: the contract the commit gate checks."""

    name: str
    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("name", _TEXT),
        ("shape", _list(_INT)),
        ("dtype", _TEXT),
        ("scale", _OPT_FLOAT),
        ("zero_point", _optional(_INT)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GoldenCase(_Checked):
    """Inputs and the outputs the model must produce from them, within tolerances."""

    inputs: list[list[float]]
    expected: list[list[float]]
    atol: float = 1e-5
    rtol: float = 1e-4

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("inputs", _FLOAT_ROWS),
        ("expected", _FLOAT_ROWS),
        ("atol", _FLOAT),
        ("rtol", _FLOAT),
    )


_Part = TensorSig | GoldenCase
_TENSORS = _list(_part(TensorSig))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base(_Checked):
    v: int = SCHEMA_VERSION
    ts: float = field(default_factory=time.time)


_BASE_CHECKS: tuple[tuple[str, _Check], ...] = (("v", _int(ge=1)), ("ts", _FLOAT))
_MSG = TypeVar("_MSG", bound=_Base)


def _message(cls: type[_MSG]) -> type[_MSG]:
    """Put the checks every message shares (``v``, ``ts``, its ``kind``) before its own CHECKS."""
    kind = str(cls.__dataclass_fields__["kind"].default)
    cls.CHECKS = (*_BASE_CHECKS, ("kind", _literal(kind)), *cls.CHECKS)
    return cls


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest(_Base):
    """What a device needs to fetch, verify, gate and activate one model version."""

    kind: Literal["manifest"] = "manifest"
    rollout_id: str
    name: str = "model"
    version: str
    model_sha256: str
    size: int
    chunk_size: int
    chunk_sha256: list[str]
    inputs: list[TensorSig] = field(default_factory=list)
    outputs: list[TensorSig] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    arena_bytes: int | None = None
    golden: list[GoldenCase] = field(default_factory=list)
    latency_budget_ms: float | None = None
    arena_budget_bytes: int | None = None
    rollback: bool = False
    shadow: bool = False
    timeout_s: float = 600.0

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("rollout_id", _IDENT),
        ("name", _TEXT),
        ("version", _str(1, 64)),
        ("model_sha256", _SHA256),
        ("size", _int(ge=1)),
        ("chunk_size", _int(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)),
        ("chunk_sha256", _list(_SHA256)),
        ("inputs", _TENSORS),
        ("outputs", _TENSORS),
        ("ops", _TEXTS),
        ("arena_bytes", _optional(_int(ge=0))),
        ("golden", _list(_part(GoldenCase))),
        ("latency_budget_ms", _optional(_float(gt=0))),
        ("arena_budget_bytes", _optional(_int(gt=0))),
        ("rollback", _bool),
        ("shadow", _bool),
        ("timeout_s", _float(gt=0)),
    )

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Deploy(_Base):
    """A signed manifest addressed to a device or a group."""

    kind: Literal["deploy"] = "deploy"
    rollout_id: str
    manifest: bytes
    signature: bytes
    key_id: str
    pushed: int = 0

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("rollout_id", _IDENT),
        ("manifest", _bytes),
        ("signature", _bytes),
        ("key_id", _str(1, 64)),
        ("pushed", _int(ge=0)),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(_Base):
    """One piece of a model file, addressed by the file's SHA-256 and its index."""

    kind: Literal["chunk"] = "chunk"
    sha256: str
    index: int
    data: bytes

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("sha256", _SHA256),
        ("index", _int(ge=0)),
        ("data", _bytes),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Rebirth(_Base):
    """Asks a device to publish its birth again."""

    kind: Literal["rebirth"] = "rebirth"

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = ()


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(_Base):
    """Stops a rollout on the devices that have not committed it."""

    kind: Literal["cancel"] = "cancel"
    rollout_id: str

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (("rollout_id", _IDENT),)


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Birth(_Base):
    """Published on connect and on Rebirth: what the device is, can do and runs."""

    kind: Literal["birth"] = "birth"
    device_id: str
    seq: int = 0
    bdseq: int
    groups: list[str] = field(default_factory=list)
    agent_version: str
    runtime: str
    runtime_version: str
    ops: list[str] = field(default_factory=list)
    ram_total_bytes: int = 0
    ram_free_bytes: int = 0
    disk_free_bytes: int = 0
    model_version: str | None = None
    model_sha256: str | None = None

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("bdseq", _int(ge=0)),
        ("groups", _TEXTS),
        ("agent_version", _TEXT),
        ("runtime", _TEXT),
        ("runtime_version", _TEXT),
        ("ops", _TEXTS),
        ("ram_total_bytes", _INT),
        ("ram_free_bytes", _INT),
        ("disk_free_bytes", _INT),
        ("model_version", _OPT_TEXT),
        ("model_sha256", _OPT_TEXT),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Death(_Base):
    """The device's Last Will; ``bdseq`` matches the birth it ends."""

    kind: Literal["death"] = "death"
    device_id: str
    bdseq: int

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("bdseq", _int(ge=0)),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class State(_Base):
    """One rollout execution's status on one device; ``version_number`` only grows."""

    kind: Literal["state"] = "state"
    device_id: str
    seq: int = 0
    rollout_id: str
    status: ExecStatus
    version_number: int
    details: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    model_version: str | None = None

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("rollout_id", _IDENT),
        ("status", _status),
        ("version_number", _int(ge=0)),
        ("details", _dict(_TEXT)),
        ("reason", _OPT_TEXT),
        ("model_version", _OPT_TEXT),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Health(_Base):
    """Periodic health: resources, inference counters and latency of the active model."""

    kind: Literal["health"] = "health"
    device_id: str
    seq: int = 0
    uptime_s: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    disk_free_bytes: int = 0
    inference_count: int = 0
    error_count: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    model_version: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("uptime_s", _FLOAT),
        ("cpu_percent", _FLOAT),
        ("rss_bytes", _INT),
        ("disk_free_bytes", _INT),
        ("inference_count", _INT),
        ("error_count", _INT),
        ("latency_p50_ms", _OPT_FLOAT),
        ("latency_p95_ms", _OPT_FLOAT),
        ("model_version", _OPT_TEXT),
        ("counters", _dict(_INT)),
        ("last_error", _OPT_TEXT),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Results(_Base):
    """A batch of inference outputs."""

    kind: Literal["results"] = "results"
    device_id: str
    seq: int = 0
    model_version: str | None = None
    outputs: list[list[float]] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("model_version", _OPT_TEXT),
        ("outputs", _FLOAT_ROWS),
        ("latency_ms", _list(_FLOAT)),
        ("errors", _INT),
        ("first_ts", _FLOAT),
        ("last_ts", _FLOAT),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch(_Base):
    """A device's repair request: the chunks it holds, as a bitmap, and how many it can take now."""

    kind: Literal["fetch"] = "fetch"
    device_id: str
    seq: int = 0
    sha256: str
    chunk_count: int
    bitmap: bytes
    window: int = 8

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("sha256", _SHA256),
        ("chunk_count", _int(ge=1)),
        ("bitmap", _bytes),
        ("window", _int(ge=1, le=1024)),
    )


@_message
@dataclass(frozen=True, slots=True, kw_only=True)
class Shadow(_Base):
    """How often a candidate model, run beside the active one, agreed with it."""

    kind: Literal["shadow"] = "shadow"
    device_id: str
    seq: int = 0
    rollout_id: str
    candidate_version: str
    samples: int
    agreed: int

    CHECKS: ClassVar[tuple[tuple[str, _Check], ...]] = (
        ("device_id", _IDENT),
        ("seq", _SEQ),
        ("rollout_id", _IDENT),
        ("candidate_version", _TEXT),
        ("samples", _int(ge=0)),
        ("agreed", _int(ge=0)),
    )


@dataclass(frozen=True, slots=True)
class Unread:
    """A message of the contract that is not for a device (aggregate, rollout_*): kind only."""

    kind: str


Message = (
    Manifest | Deploy | Chunk | Rebirth | Cancel | Birth | Death | State | Health | Results | Fetch | Shadow
)
PlainMessage = Message | Unread

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Manifest,
    Deploy,
    Chunk,
    Rebirth,
    Cancel,
    Birth,
    Death,
    State,
    Health,
    Results,
    Fetch,
    Shadow,
)
_BY_KIND: dict[str, type[Message]] = {
    str(cls.__dataclass_fields__["kind"].default): cls for cls in MESSAGE_TYPES
}

_C = TypeVar("_C", bound=_Checked)
# Per class: the field names in order, and those a payload must carry.
_FIELDS: dict[type[Any], tuple[tuple[str, ...], tuple[str, ...]]] = {
    cls: (
        tuple(f.name for f in fields(cls)),
        tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING),
    )
    for cls in (*MESSAGE_TYPES, TensorSig, GoldenCase)
}

M = TypeVar("M", bound=_Base)


# --- codec ------------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """Serialise a message to msgpack bytes, identical to schemas.codec.encode of its pydantic twin."""
    packed: bytes = msgpack.packb(_wire(message), use_bin_type=True)
    return packed


def _wire(record: _Checked) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS[type(record)][0]:
        value = getattr(record, name)
        if type(value) is list and value and isinstance(value[0], _Checked):
            value = [_wire(item) for item in value]
        elif isinstance(value, ExecStatus):
            value = value.value
        out[name] = value
    return out


def unpack(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The envelope checks both codecs make (this one and schemas.codec): the payload's size, that
    it is msgpack, a map, of a known kind, with a schema version this side understands.  Returns the
    map; DecodeError (MessageTooLarge over the limit) with a sentence a person can act on if not."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(
            f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit; "
            "use smaller chunks or raise max_bytes on both ends"
        )
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a dozen unrelated types for bad input
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"payload is a msgpack {type(raw).__name__}, expected a map with a 'kind' key")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise DecodeError(f"unknown message kind {kind!r}; this fleetbus knows {', '.join(sorted(KINDS))}")
    version = raw.get("v", SCHEMA_VERSION)
    if type(version) is not int or version < 1:
        raise DecodeError(f"{kind} message has schema version {version!r}; expected a positive integer")
    if version > SCHEMA_VERSION:
        raise DecodeError(
            f"{kind} message uses schema version {version}, newer than this fleetbus understands "
            f"({SCHEMA_VERSION}); upgrade fleetbus on this side"
        )
    return raw


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PlainMessage:
    """Turn bytes into a message, or raise DecodeError with a sentence a person can act on."""
    raw = unpack(payload, max_bytes)
    kind = raw["kind"]
    cls = _BY_KIND.get(kind)
    if cls is None:
        return Unread(kind=kind)
    try:
        return _build(cls, raw)
    except _Invalid as exc:
        raise DecodeError(f"invalid {kind} message: {exc}") from None


def decode_as(payload: bytes, cls: type[M], max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Decode and insist on one message type (e.g. a Manifest inside a Deploy)."""
    return insist(decode(payload, max_bytes), cls)


T = TypeVar("T")


def insist(message: object, cls: type[T]) -> T:
    """``message`` if it is a ``cls``, else DecodeError naming both (for both codecs' decode_as)."""
    if not isinstance(message, cls):
        raise DecodeError(f"expected a {cls.__name__} message, got kind {getattr(message, 'kind', None)!r}")
    return message


def verify(deploy: Deploy, pinned: Mapping[str, PinnedKey]) -> Manifest:
    """Return the manifest inside ``deploy`` if a pinned key signed it; raise SignatureError if not."""
    signing.check_signature(deploy, pinned)
    manifest = decode_as(deploy.manifest, Manifest)
    signing.check_rollout_id(deploy, manifest.rollout_id)
    return manifest
