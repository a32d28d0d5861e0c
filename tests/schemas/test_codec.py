"""The msgpack codec: every kind round-trips, and any bytes give a message or a DecodeError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.errors import DecodeError, MessageTooLarge
from schemas.messages import (
    KINDS,
    SCHEMA_VERSION,
    Aggregate,
    Birth,
    Cancel,
    Chunk,
    Death,
    Deploy,
    ExecStatus,
    Fetch,
    GoldenCase,
    Health,
    Manifest,
    Rebirth,
    Results,
    RolloutControl,
    RolloutStatus,
    Shadow,
    State,
    TensorSig,
    WaveProgress,
)

SHA = "0123456789abcdef" * 4

SAMPLES = [
    Manifest(
        rollout_id="r1",
        version="1.2.0",
        model_sha256=SHA,
        size=100_000,
        chunk_size=65536,
        chunk_sha256=[SHA, SHA],
        inputs=[TensorSig(name="x", shape=[1, 4], dtype="float32")],
        outputs=[TensorSig(name="y", shape=[1, 3], dtype="int8", scale=0.5, zero_point=-3)],
        ops=["FULLY_CONNECTED", "ADD"],
        golden=[GoldenCase(inputs=[[1.0, 2.0, 3.0, 4.0]], expected=[[0.5, 0.0, 1.5]])],
        latency_budget_ms=5.0,
    ),
    Deploy(rollout_id="r1", manifest=b"\x81\xa4kind", signature=b"s" * 64, key_id="abcd"),
    Chunk(sha256=SHA, index=3, data=bytes(range(256)) * 4),
    Rebirth(),
    Cancel(rollout_id="r1"),
    Birth(device_id="d1", bdseq=4, agent_version="0.1", runtime="litert", runtime_version="2.3", ops=["ADD"]),
    Death(device_id="d1", bdseq=4),
    State(
        device_id="d1",
        rollout_id="r1",
        status=ExecStatus.IN_PROGRESS,
        version_number=3,
        details={"step": "x"},
    ),
    Health(device_id="d1", seq=255, rss_bytes=1 << 20, latency_p95_ms=1.5, counters={"decode_errors": 2}),
    Results(device_id="d1", outputs=[[0.1, 0.2]], latency_ms=[0.3]),
    Fetch(device_id="d1", sha256=SHA, chunk_count=10, bitmap=b"\x01\x00", window=8),
    Shadow(device_id="d1", rollout_id="r1", candidate_version="2", samples=10, agreed=9),
    Aggregate(scope="group", name="g", devices=3, online=2, versions={"1.0": 3}),
    RolloutControl(rollout_id="r1", action="pause", by="ops"),
    RolloutStatus(
        rollout_id="r1",
        version="2",
        state="RUNNING",
        waves=[WaveProgress(index=0, state="ACTIVE", devices=2, states={"SUCCEEDED": 1})],
    ),
]


def test_samples_cover_every_kind() -> None:
    """The round-trip samples include one message of every kind in the union."""
    assert {m.kind for m in SAMPLES} == KINDS


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.kind)
def test_round_trip(message: object) -> None:
    """decode(encode(m)) == m for every kind."""
    assert codec.decode(codec.encode(message)) == message  # type: ignore[arg-type]


def test_wire_form_is_a_plain_msgpack_map() -> None:
    """Another language reads kind, v and ts straight from the msgpack map."""
    raw = msgpack.unpackb(codec.encode(Cancel(rollout_id="r9")))
    assert raw["kind"] == "cancel"
    assert raw["v"] == SCHEMA_VERSION
    assert isinstance(raw["ts"], float)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"kind": "teleport"}), "unknown message kind 'teleport'"),
        (msgpack.packb({"kind": "cancel", "v": 99, "rollout_id": "r"}), "newer than this fleetbus"),
        (msgpack.packb({"kind": "cancel", "v": 0, "rollout_id": "r"}), "schema version"),
        (msgpack.packb({"kind": "cancel", "rollout_id": "a/b"}), "rollout_id"),
        (msgpack.packb({"kind": "chunk", "sha256": "x", "index": -1, "data": b""}), "invalid chunk"),
    ],
)
def test_bad_payloads_raise_decode_error_with_a_reason(payload: bytes, needle: str) -> None:
    """Each kind of bad payload gives DecodeError whose text names the problem."""
    with pytest.raises(DecodeError, match=needle):
        codec.decode(payload)


def test_oversized_payload_is_refused_before_parsing() -> None:
    """Bytes over max_bytes raise MessageTooLarge (a DecodeError)."""
    payload = codec.encode(Chunk(sha256=SHA, index=0, data=b"x" * 2000))
    with pytest.raises(MessageTooLarge):
        codec.decode(payload, max_bytes=1000)


def test_decode_as_insists_on_the_type() -> None:
    """decode_as refuses a valid message of another kind."""
    with pytest.raises(DecodeError, match="expected a Manifest"):
        codec.decode_as(codec.encode(Rebirth()), Manifest)


@settings(max_examples=400)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_message_or_decode_error(payload: bytes) -> None:
    """No input makes the decoder raise anything but DecodeError."""
    with contextlib.suppress(DecodeError):
        codec.decode(payload)


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400)
@given(kind=st.sampled_from(sorted(KINDS)), fields=st.dictionaries(st.text(max_size=12), _values, max_size=8))
def test_maps_with_a_known_kind_give_a_message_or_decode_error(kind: str, fields: dict[str, object]) -> None:
    """Structured garbage under a valid kind never escapes as another exception type."""
    payload = msgpack.packb({**fields, "kind": kind}, use_bin_type=True)
    with contextlib.suppress(DecodeError):
        codec.decode(payload)
