"""The schemas package's exception tree.

SchemaError                 anything wrong with fleetbus's wire contract
 ├── TopicError             a topic or id that is not part of the topic tree
 └── DecodeError            bytes that are not a message this fleetbus understands
      └── MessageTooLarge   bytes over the codec's size limit
"""

from __future__ import annotations


class SchemaError(Exception):
    """Base of every error raised by ``schemas``."""


class TopicError(SchemaError, ValueError):
    """A topic, topic level or id that the topic tree does not allow."""


class DecodeError(SchemaError):
    """Payload bytes that cannot be turned into a message; the text says what to do about it."""


class MessageTooLarge(DecodeError):
    """A payload over the configured size limit; it was not parsed."""
