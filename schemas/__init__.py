"""fleetbus's wire contract: the versioned topic tree, the message models and the msgpack codec."""

from schemas.codec import DEFAULT_MAX_BYTES, decode, decode_as, encode
from schemas.errors import DecodeError, MessageTooLarge, SchemaError, TopicError
from schemas.messages import SCHEMA_VERSION, ExecStatus, Message

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
