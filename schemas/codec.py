"""msgpack <-> messages, with a size limit and one error type for everything undecodable.

The wire form of a message is the msgpack map of its fields, ``kind`` and ``v`` included: there is no
outer envelope, so a backend in another language decodes it with any msgpack library and the JSON
Schemas from ``fleetbus schema export``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from schemas import constants
from schemas.errors import DecodeError, MessageTooLarge
from schemas.messages import KINDS, MESSAGE_ADAPTER, SCHEMA_VERSION, Message

DEFAULT_MAX_BYTES = constants.DEFAULT_MAX_BYTES

M = TypeVar("M", bound=BaseModel)

# The adapter's core validator, called directly: TypeAdapter.validate_python's Python wrapper was
# 0.3 us of the aggregator's ~5 us per message (bench/ingest.py), the same validation either way.
_validate = MESSAGE_ADAPTER.validator.validate_python


def encode(message: BaseModel) -> bytes:
    """Serialise a message to msgpack bytes."""
    data = message.model_dump(mode="python")
    packed: bytes = msgpack.packb(data, use_bin_type=True, default=_default)
    return packed


def _default(obj: object) -> object:
    # Enums subclass str; tuples from frozen models are lists on the wire.
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Turn bytes into a message, or raise DecodeError with a sentence a person can act on."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(
            f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit; "
            "use smaller chunks or raise max_bytes on both ends"
        )
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a dozen unrelated types for bad input
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from None
    return _from_raw(raw)


def _from_raw(raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise DecodeError(f"payload is a msgpack {type(raw).__name__}, expected a map with a 'kind' key")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise DecodeError(f"unknown message kind {kind!r}; this fleetbus knows {', '.join(sorted(KINDS))}")
    version = raw.get("v", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DecodeError(f"{kind} message has schema version {version!r}; expected a positive integer")
    if version > SCHEMA_VERSION:
        raise DecodeError(
            f"{kind} message uses schema version {version}, newer than this fleetbus understands "
            f"({SCHEMA_VERSION}); upgrade fleetbus on this side"
        )
    try:
        message: Message = _validate(raw)
        return message
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise DecodeError(f"invalid {kind} message: {problems}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"invalid {kind} message: {exc}") from None


def decode_as(payload: bytes, cls: type[M], max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Decode and insist on one message type (e.g. a Manifest inside a Deploy)."""
    msg = decode(payload, max_bytes)
    if not isinstance(msg, cls):
        raise DecodeError(f"expected a {cls.__name__} message, got kind {msg.kind!r}")
    return msg
