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
from schemas.errors import DecodeError
from schemas.messages import MESSAGE_ADAPTER, Message

# The envelope checks (size, msgpack, a map, the kind, the version) are shared with the device's
# pydantic-free codec, so both refuse the same payloads with the same sentences.
from schemas.plain import insist, unpack

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
    return _from_raw(unpack(payload, max_bytes))


def _from_raw(raw: dict[str, Any]) -> Message:
    kind = raw["kind"]
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
    return insist(decode(payload, max_bytes), cls)
