"""schemas.plain, the device's pydantic-free messages, held to the pydantic contract byte for byte."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import codec, constants, messages, plain, signing
from schemas.errors import DecodeError, MessageTooLarge

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef" * 4
PAIRS: list[tuple[type[Any], type[BaseModel]]] = [
    (cls, getattr(messages, cls.__name__))
    for cls in (*plain.MESSAGE_TYPES, plain.TensorSig, plain.GoldenCase)
]


# --- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("plain_cls", "model"), PAIRS, ids=[p.__name__ for p, _ in PAIRS])
def test_fields_order_and_defaults_match_the_pydantic_model(
    plain_cls: type[Any], model: type[BaseModel]
) -> None:
    """Each plain class has its model's field names, in its order, with equal defaults."""
    ours = dataclasses.fields(plain_cls)
    assert [f.name for f in ours] == list(model.model_fields)
    for f in ours:
        info = model.model_fields[f.name]
        if f.default_factory is not dataclasses.MISSING:
            assert info.default_factory is not None, f.name
            assert type(f.default_factory()) is type(info.default_factory()), f.name  # type: ignore[call-arg]
        elif f.default is dataclasses.MISSING:
            assert info.is_required(), f.name
        else:
            assert not info.is_required(), f.name
            assert f.default == info.default, f.name
            assert type(f.default) is type(info.default), f.name


@pytest.mark.parametrize("plain_cls", [p for p, _ in PAIRS], ids=[p.__name__ for p, _ in PAIRS])
def test_every_field_has_exactly_one_check(plain_cls: type[Any]) -> None:
    """A class's CHECKS table names each of its fields once, in field order."""
    assert [name for name, _ in plain_cls.CHECKS] == [f.name for f in dataclasses.fields(plain_cls)]


def test_kinds_and_constants_are_the_contracts() -> None:
    """plain knows every kind of the contract, and messages re-exports the constants' very objects."""
    assert plain.KINDS == messages.KINDS
    assert {c.__name__ for c in plain.MESSAGE_TYPES} < {m.__name__ for m in messages.MESSAGE_TYPES}
    assert messages.ExecStatus is constants.ExecStatus
    assert (messages.SCHEMA_VERSION, messages.MAX_CHUNK_SIZE, messages.MIN_CHUNK_SIZE) == (
        constants.SCHEMA_VERSION,
        constants.MAX_CHUNK_SIZE,
        constants.MIN_CHUNK_SIZE,
    )
    assert (messages.MQTT_PORT, messages.MQTTS_PORT) == (constants.MQTT_PORT, constants.MQTTS_PORT)
    assert codec.DEFAULT_MAX_BYTES == constants.DEFAULT_MAX_BYTES
    assert constants.ExecStatus.FAILED.terminal
    assert not constants.ExecStatus.IN_PROGRESS.terminal


def test_chunk_count_and_frozen() -> None:
    """A plain Manifest counts its chunks like the model, and no plain message can be changed."""
    manifest = plain.Manifest(
        rollout_id="r1", version="1", model_sha256=SHA, size=1, chunk_size=1024, chunk_sha256=[SHA, SHA]
    )
    assert manifest.chunk_count == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "code",
    [
        "import schemas.plain",
        "import schemas.signing",
        "import schemas, schemas.constants, schemas.topics",
    ],
)
def test_device_imports_leave_pydantic_out(code: str) -> None:
    """Importing plain, signing or the package itself loads no pydantic module."""
    check = (
        f"{code}; import sys; bad = [m for m in sys.modules if m.startswith('pydantic')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


_DEVICE_PATH = """
import sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from schemas import plain, signing
private = Ed25519PrivateKey.generate()
public = private.public_key()
kid = signing.key_id(public.public_bytes_raw().hex())
sha = "ab" * 32
body = plain.encode(plain.Manifest(
    rollout_id="r1", version="1", model_sha256=sha, size=1, chunk_size=1024, chunk_sha256=[sha]
))
wire = plain.encode(plain.Deploy(rollout_id="r1", manifest=body, signature=private.sign(body), key_id=kid))
manifest = plain.verify(plain.decode_as(wire, plain.Deploy), {kid: public})
assert manifest.version == "1", manifest
assert not [m for m in sys.modules if m.split(".")[0] == "pydantic"]
"""


def test_the_device_path_runs_without_pydantic() -> None:
    """Encoding, decoding and verifying a signed deploy with plain never imports pydantic."""
    subprocess.run([sys.executable, "-c", _DEVICE_PATH], cwd=REPO, check=True)


# --- differential: random valid pydantic messages --------------------------------------------------

_i64 = st.integers(-(2**63), 2**63 - 1)
_u = st.integers(0, 2**63 - 1)
_float = st.one_of(st.floats(allow_nan=False), st.integers(-(2**53), 2**53))
_pos = st.one_of(st.floats(min_value=0.0, exclude_min=True), st.integers(1, 2**53))
_text = st.text(max_size=12)
_ident = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_sha = st.from_regex(r"\A[0-9a-f]{64}\Z")
_seq = st.integers(0, 255)
_short = st.text(min_size=1, max_size=64)
_blob = st.binary(max_size=64)
_opt_text = st.none() | _text
_opt_float = st.none() | _float
_rows = st.lists(st.lists(_float, max_size=4), max_size=3)
_base = {"v": st.just(constants.SCHEMA_VERSION), "ts": _float}
_tensor = st.fixed_dictionaries(
    {"name": _text, "shape": st.lists(_i64, max_size=4), "dtype": _text},
    optional={"scale": _opt_float, "zero_point": st.none() | _i64},
)
_golden = st.fixed_dictionaries(
    {"inputs": _rows, "expected": _rows}, optional={"atol": _float, "rtol": _float}
)


def _kind(
    model: type[BaseModel], required: dict[str, Any], optional: dict[str, Any] | None = None
) -> st.SearchStrategy[BaseModel]:
    fields = st.fixed_dictionaries(required, optional={**_base, **(optional or {})})
    return fields.map(lambda kw: model(**kw))


VALID: dict[str, st.SearchStrategy[BaseModel]] = {
    "manifest": _kind(
        messages.Manifest,
        {
            "rollout_id": _ident,
            "version": _short,
            "model_sha256": _sha,
            "size": st.integers(1, 2**63 - 1),
            "chunk_size": st.integers(constants.MIN_CHUNK_SIZE, constants.MAX_CHUNK_SIZE),
            "chunk_sha256": st.lists(_sha, max_size=3),
        },
        {
            "name": _text,
            "inputs": st.lists(_tensor, max_size=2),
            "outputs": st.lists(_tensor, max_size=2),
            "ops": st.lists(_text, max_size=3),
            "arena_bytes": st.none() | _u,
            "golden": st.lists(_golden, max_size=2),
            "latency_budget_ms": st.none() | _pos,
            "arena_budget_bytes": st.none() | st.integers(1, 2**63 - 1),
            "rollback": st.booleans(),
            "shadow": st.booleans(),
            "timeout_s": _pos,
        },
    ),
    "deploy": _kind(
        messages.Deploy,
        {"rollout_id": _ident, "manifest": _blob, "signature": _blob, "key_id": _short, "pushed": _u},
    ),
    "chunk": _kind(messages.Chunk, {"sha256": _sha, "index": _u, "data": _blob}),
    "rebirth": _kind(messages.Rebirth, {}),
    "cancel": _kind(messages.Cancel, {"rollout_id": _ident}),
    "birth": _kind(
        messages.Birth,
        {
            "device_id": _ident,
            "bdseq": _u,
            "agent_version": _text,
            "runtime": _text,
            "runtime_version": _text,
        },
        {
            "seq": _seq,
            "groups": st.lists(_text, max_size=3),
            "ops": st.lists(_text, max_size=3),
            "ram_total_bytes": _i64,
            "ram_free_bytes": _i64,
            "disk_free_bytes": _i64,
            "model_version": _opt_text,
            "model_sha256": _opt_text,
        },
    ),
    "death": _kind(messages.Death, {"device_id": _ident, "bdseq": _u}),
    "state": _kind(
        messages.State,
        {
            "device_id": _ident,
            "rollout_id": _ident,
            "status": st.sampled_from(constants.ExecStatus)
            | st.sampled_from([s.value for s in constants.ExecStatus]),
            "version_number": _u,
        },
        {
            "seq": _seq,
            "details": st.dictionaries(_text, _text, max_size=3),
            "reason": _opt_text,
            "model_version": _opt_text,
        },
    ),
    "health": _kind(
        messages.Health,
        {"device_id": _ident},
        {
            "seq": _seq,
            "uptime_s": _float,
            "cpu_percent": _float,
            "rss_bytes": _i64,
            "disk_free_bytes": _i64,
            "inference_count": _i64,
            "error_count": _i64,
            "latency_p50_ms": _opt_float,
            "latency_p95_ms": _opt_float,
            "model_version": _opt_text,
            "counters": st.dictionaries(_text, _i64, max_size=3),
            "last_error": _opt_text,
        },
    ),
    "results": _kind(
        messages.Results,
        {"device_id": _ident},
        {
            "seq": _seq,
            "model_version": _opt_text,
            "outputs": _rows,
            "latency_ms": st.lists(_float, max_size=4),
            "errors": _i64,
            "first_ts": _float,
            "last_ts": _float,
        },
    ),
    "fetch": _kind(
        messages.Fetch,
        {"device_id": _ident, "sha256": _sha, "chunk_count": st.integers(1, 2**63 - 1), "bitmap": _blob},
        {"seq": _seq, "window": st.integers(1, 1024)},
    ),
    "shadow": _kind(
        messages.Shadow,
        {"device_id": _ident, "rollout_id": _ident, "candidate_version": _text, "samples": _u, "agreed": _u},
        {"seq": _seq},
    ),
}


def test_the_strategies_cover_every_plain_kind() -> None:
    """The differential test below draws every kind plain decodes."""
    assert set(VALID) == set(plain._BY_KIND)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(VALID)).flatmap(lambda kind: VALID[kind]))
def test_plain_and_pydantic_agree_on_every_valid_message(model: BaseModel) -> None:
    """A valid message decodes to equal fields in plain, and both encode it to the same bytes."""
    wire = codec.encode(model)
    ours = plain.decode(wire)
    assert type(ours).__name__ == type(model).__name__
    assert dataclasses.asdict(ours) == model.model_dump()
    assert plain.encode(ours) == wire  # type: ignore[arg-type]
    assert codec.decode(plain.encode(ours)) == model  # type: ignore[arg-type]
    rebuilt = type(ours)(**{k: v for k, v in msgpack.unpackb(wire).items()})
    assert rebuilt == ours


# --- refusals: what pydantic refuses, plain refuses -------------------------------------------------

SAMPLES: dict[str, dict[str, Any]] = {
    "manifest": {
        "kind": "manifest",
        "rollout_id": "r1",
        "version": "1.0",
        "model_sha256": SHA,
        "size": 10,
        "chunk_size": 1024,
        "chunk_sha256": [SHA],
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "golden": [{"inputs": [[1.0]], "expected": [[2.0]]}],
    },
    "deploy": {"kind": "deploy", "rollout_id": "r1", "manifest": b"m", "signature": b"s", "key_id": "k"},
    "chunk": {"kind": "chunk", "sha256": SHA, "index": 0, "data": b"x"},
    "cancel": {"kind": "cancel", "rollout_id": "r1"},
    "birth": {
        "kind": "birth",
        "device_id": "d1",
        "bdseq": 0,
        "agent_version": "0.1",
        "runtime": "litert",
        "runtime_version": "2.3",
    },
    "death": {"kind": "death", "device_id": "d1", "bdseq": 1},
    "state": {
        "kind": "state",
        "device_id": "d1",
        "rollout_id": "r1",
        "status": "QUEUED",
        "version_number": 1,
    },
    "health": {"kind": "health", "device_id": "d1"},
    "results": {"kind": "results", "device_id": "d1"},
    "fetch": {"kind": "fetch", "device_id": "d1", "sha256": SHA, "chunk_count": 2, "bitmap": b"\x01"},
    "shadow": {
        "kind": "shadow",
        "device_id": "d1",
        "rollout_id": "r1",
        "candidate_version": "2",
        "samples": 3,
        "agreed": 2,
    },
}

_DROP = object()
BAD: list[tuple[str, str, object]] = [
    # pattern
    ("manifest", "model_sha256", "XYZ"),
    ("manifest", "model_sha256", SHA.upper()),
    ("manifest", "model_sha256", SHA + "\n"),
    ("manifest", "chunk_sha256", [SHA[:-1]]),
    ("manifest", "rollout_id", "-r1"),
    ("birth", "device_id", "d 1"),
    ("chunk", "sha256", "ab"),
    # ge / le / gt
    ("manifest", "size", 0),
    ("manifest", "chunk_size", constants.MIN_CHUNK_SIZE - 1),
    ("manifest", "chunk_size", constants.MAX_CHUNK_SIZE + 1),
    ("manifest", "arena_bytes", -1),
    ("manifest", "timeout_s", 0.0),
    ("manifest", "latency_budget_ms", -1.5),
    ("manifest", "latency_budget_ms", float("nan")),
    ("manifest", "arena_budget_bytes", 0),
    ("chunk", "index", -1),
    ("birth", "seq", 256),
    ("birth", "bdseq", -1),
    ("state", "version_number", -1),
    ("fetch", "chunk_count", 0),
    ("fetch", "window", 0),
    ("fetch", "window", 1025),
    ("shadow", "samples", -1),
    ("deploy", "pushed", -1),
    ("health", "seq", -1),
    # min / max length
    ("manifest", "version", ""),
    ("manifest", "version", "v" * 65),
    ("deploy", "key_id", ""),
    ("deploy", "key_id", "k" * 65),
    ("cancel", "rollout_id", ""),
    ("death", "device_id", "d" * 65),
    # required
    ("manifest", "chunk_sha256", _DROP),
    ("deploy", "signature", _DROP),
    ("chunk", "data", _DROP),
    ("cancel", "rollout_id", _DROP),
    ("birth", "runtime", _DROP),
    ("state", "status", _DROP),
    ("fetch", "bitmap", _DROP),
    ("shadow", "agreed", _DROP),
    ("death", "device_id", _DROP),
    # wrong type
    ("manifest", "size", "big"),
    ("manifest", "ops", "ADD"),
    ("manifest", "rollback", "maybe"),
    ("manifest", "chunk_sha256", SHA),
    ("manifest", "timeout_s", "soon"),
    ("deploy", "manifest", [1, 2]),
    ("chunk", "data", None),
    ("chunk", "index", 1.5),
    ("state", "status", "NOPE"),
    ("state", "details", {"a": 1}),
    ("state", "details", ["a"]),
    ("health", "counters", {"a": "x"}),
    ("health", "latency_p50_ms", "fast"),
    ("results", "outputs", [["a"]]),
    ("results", "outputs", [1.0]),
    ("results", "latency_ms", {"a": 1.0}),
    ("birth", "groups", [1]),
    ("birth", "model_version", 3),
    # nested wrong type
    ("manifest", "inputs", ["x"]),
    ("manifest", "inputs", [{"name": "x", "dtype": "f"}]),
    ("manifest", "inputs", [{"name": "x", "shape": ["a"], "dtype": "f"}]),
    ("manifest", "outputs", [{"name": "x", "shape": [1], "dtype": "f", "scale": "big"}]),
    ("manifest", "golden", [{"inputs": "no", "expected": []}]),
    ("manifest", "golden", [{"inputs": [[1.0]]}]),
    ("manifest", "golden", [{"inputs": [], "expected": [], "atol": []}]),
]


def _payload(kind: str, name: str, value: object) -> bytes:
    raw = dict(SAMPLES[kind])
    if value is _DROP:
        del raw[name]
    else:
        raw[name] = value
    packed: bytes = msgpack.packb(raw, use_bin_type=True)
    return packed


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_refusal_samples_are_valid_to_both(kind: str) -> None:
    """Each baseline the refusals start from is accepted by pydantic and plain, to the same message."""
    wire = msgpack.packb({**SAMPLES[kind], "ts": 1.5}, use_bin_type=True)
    assert plain.encode(plain.decode(wire)) == codec.encode(codec.decode(wire))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "name", "value"), BAD, ids=[f"{k}.{n}={v!r:.20}" for k, n, v in BAD])
def test_what_pydantic_refuses_plain_refuses(kind: str, name: str, value: object) -> None:
    """A payload breaking one constraint is a DecodeError from pydantic and from plain, naming the field."""
    wire = _payload(kind, name, value)
    with pytest.raises(DecodeError):
        codec.decode(wire)
    with pytest.raises(DecodeError, match=rf"^invalid {kind} message: {name}\b"):
        plain.decode(wire)


@pytest.mark.parametrize(
    ("kind", "name"), [("chunk", "index"), ("birth", "seq"), ("health", "rss_bytes"), ("fetch", "window")]
)
def test_plain_refuses_a_bool_where_an_int_is_required(kind: str, name: str) -> None:
    """true is not 1 on this wire: plain refuses a bool in an int field."""
    with pytest.raises(DecodeError, match=rf"{name}: Input should be a valid integer"):
        plain.decode(_payload(kind, name, True))


def test_constructing_an_invalid_message_raises_value_error() -> None:
    """Building a plain message by hand checks it as pydantic would, with a ValueError."""
    with pytest.raises(ValueError, match="index: Input should be greater than or equal to 0"):
        plain.Chunk(sha256=SHA, index=-1, data=b"")
    with pytest.raises(ValueError, match=r"inputs\.1\.shape\.1: Input should be a valid integer"):
        plain.Manifest(
            rollout_id="r1",
            version="1",
            model_sha256=SHA,
            size=1,
            chunk_size=1024,
            chunk_sha256=[],
            inputs=[
                plain.TensorSig(name="x", shape=[1], dtype="f"),
                {"name": "y", "shape": [1, "2"], "dtype": "f"},  # type: ignore[list-item]
            ],
        )


def test_extra_keys_are_ignored_and_floats_stored_as_floats() -> None:
    """Unknown keys are dropped like pydantic's extra="ignore", and an int for a float becomes a float."""
    wire = _payload("health", "uptime_s", 5)
    raw = msgpack.unpackb(wire)
    raw["future_field"] = {"x": 1}
    raw["ts"] = 2.5
    ours = plain.decode(msgpack.packb(raw, use_bin_type=True))
    assert isinstance(ours, plain.Health)
    assert type(ours.uptime_s) is float
    assert plain.encode(ours) == codec.encode(codec.decode(msgpack.packb(raw, use_bin_type=True)))


# --- envelope ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2]), "msgpack list"),
        (msgpack.packb({"kind": "bogus"}), "unknown message kind 'bogus'"),
        (msgpack.packb({"data": 1}), "unknown message kind None"),
        (msgpack.packb({"kind": "rebirth", "v": 0}), "expected a positive integer"),
        (msgpack.packb({"kind": "rebirth", "v": True}), "expected a positive integer"),
        (msgpack.packb({"kind": "rebirth", "v": constants.SCHEMA_VERSION + 1}), "newer than this fleetbus"),
    ],
)
def test_envelope_errors_match_the_codec(payload: bytes, match: str) -> None:
    """Bad bytes, a non-map, an unknown kind or a bad version fail in plain as in codec."""
    with pytest.raises(DecodeError, match=match) as ours:
        plain.decode(payload)
    with pytest.raises(DecodeError) as theirs:
        codec.decode(payload)
    assert str(ours.value) == str(theirs.value)


def test_oversized_payload_is_refused_unread() -> None:
    """A payload over max_bytes is MessageTooLarge before any parsing."""
    wire = plain.encode(plain.Chunk(sha256=SHA, index=0, data=b"x" * 2000))
    with pytest.raises(MessageTooLarge, match="over the 1000-byte limit"):
        plain.decode(wire, max_bytes=1000)
    assert isinstance(plain.decode(wire, max_bytes=len(wire)), plain.Chunk)


@pytest.mark.parametrize(
    "model",
    [
        messages.Aggregate(scope="fleet"),
        messages.RolloutControl(rollout_id="r1", action="pause"),
        messages.RolloutStatus(rollout_id="r1", version="2", state="RUNNING"),
    ],
    ids=lambda m: m.kind,
)
def test_publisher_kinds_decode_to_unread(model: BaseModel) -> None:
    """A contract kind that is not for a device decodes to Unread with its kind, unvalidated."""
    assert plain.decode(codec.encode(model)) == plain.Unread(kind=model.kind)  # type: ignore[attr-defined]
    assert plain.decode(msgpack.packb({"kind": "aggregate", "scope": 42})) == plain.Unread(kind="aggregate")


def test_decode_as_insists_on_the_type() -> None:
    """decode_as returns the asked type and refuses another kind, Unread included."""
    wire = plain.encode(plain.Cancel(rollout_id="r1"))
    assert plain.decode_as(wire, plain.Cancel).rollout_id == "r1"
    with pytest.raises(DecodeError, match="expected a Deploy message, got kind 'cancel'"):
        plain.decode_as(wire, plain.Deploy)
    with pytest.raises(DecodeError, match="got kind 'aggregate'"):
        plain.decode_as(codec.encode(messages.Aggregate(scope="fleet")), plain.Cancel)


# --- verify -----------------------------------------------------------------------------------------


def _manifest(rollout_id: str = "r1") -> messages.Manifest:
    return messages.Manifest(
        rollout_id=rollout_id, version="1.0.0", model_sha256=SHA, size=10, chunk_size=1024, chunk_sha256=[SHA]
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, str, Any, str, dict[str, Any]]:
    """A pinned key pair and an unpinned one."""
    good_priv, good_pub = signing.write_keypair(tmp_path, "good")
    other_priv, _ = signing.write_keypair(tmp_path, "other")
    private, kid = signing.load_private_key(good_priv)
    other, other_kid = signing.load_private_key(other_priv)
    return private, kid, other, other_kid, signing.pin_keys([str(good_pub)])


def _plain_deploy(deploy: messages.Deploy) -> plain.Deploy:
    return plain.decode_as(codec.encode(deploy), plain.Deploy)


def test_plain_verify_accepts_what_signing_signed(keys: tuple[Any, str, Any, str, dict[str, Any]]) -> None:
    """A deploy signed by a pinned key yields the signed manifest, equal to pydantic's verify."""
    private, kid, _, _, pinned = keys
    deploy = signing.sign(_manifest(), private, kid)
    ours = plain.verify(_plain_deploy(deploy), pinned)
    assert isinstance(ours, plain.Manifest)
    assert plain.encode(ours) == codec.encode(signing.verify(deploy, pinned)) == deploy.manifest


def test_plain_verify_refuses_bad_deploys(keys: tuple[Any, str, Any, str, dict[str, Any]]) -> None:
    """Tampered, wrongly signed, unpinned, unsigned and mismatched deploys raise SignatureError."""
    private, kid, other, other_kid, pinned = keys
    good = _plain_deploy(signing.sign(_manifest(), private, kid))
    tampered = dataclasses.replace(good, manifest=good.manifest.replace(b"1.0.0", b"9.0.0"))
    forged = _plain_deploy(signing.sign(_manifest(), other, kid))
    unpinned = _plain_deploy(signing.sign(_manifest(), other, other_kid))
    unsigned = dataclasses.replace(good, signature=b"")
    moved = dataclasses.replace(good, rollout_id="r2")
    for deploy, match in [
        (tampered, "bad signature"),
        (forged, "bad signature"),
        (unpinned, "does not pin"),
        (unsigned, "unsigned"),
        (moved, "deploy says rollout r2 but its signed manifest says r1"),
    ]:
        with pytest.raises(signing.SignatureError, match=match):
            plain.verify(deploy, pinned)
        pydantic_twin = codec.decode_as(plain.encode(deploy), messages.Deploy)
        with pytest.raises(signing.SignatureError, match=match):
            signing.verify(pydantic_twin, pinned)
