"""fleetbus's wire contract: the versioned topic tree, the message models and the msgpack codec.

The pydantic codec is loaded on first use of one of its names, not on ``import schemas``: the device
agent imports ``schemas.plain`` and ``schemas.topics`` and must not pay for pydantic (docs/device.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from schemas.constants import SCHEMA_VERSION, ExecStatus
from schemas.errors import DecodeError, MessageTooLarge, SchemaError, TopicError

if TYPE_CHECKING:
    from schemas.codec import DEFAULT_MAX_BYTES, decode, decode_as, encode
    from schemas.messages import Message

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SCHEMA_VERSION",
    "DecodeError",
    "ExecStatus",
    "Message",
    "MessageTooLarge",
    "SchemaError",
    "TopicError",
    "decode",
    "decode_as",
    "encode",
]

_LAZY = {
    "DEFAULT_MAX_BYTES": "schemas.codec",
    "decode": "schemas.codec",
    "decode_as": "schemas.codec",
    "encode": "schemas.codec",
    "Message": "schemas.messages",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
