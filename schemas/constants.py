"""The wire contract's constants and the execution-status enum, importable without pydantic.

``schemas.messages`` (pydantic) and ``schemas.plain`` (the device's pydantic-free messages) both take
these from here, so the two can never disagree on a limit, a pattern or a status.
"""

from __future__ import annotations

import enum

SCHEMA_VERSION = 1
MAX_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
# IANA-assigned MQTT ports: the defaults wherever a config or address leaves the port out.
MQTT_PORT = 1883
MQTTS_PORT = 8883

SHA256_PATTERN = r"^[0-9a-f]{64}$"
IDENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
IDENT_MAX = 64

# The largest message we make is a 256 KiB chunk; a manifest with golden data stays far below this.
DEFAULT_MAX_BYTES = 1024 * 1024


class ExecStatus(str, enum.Enum):
    """Per-device execution states reported to the publisher (AWS IoT Jobs, plus INCOMPATIBLE)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    INCOMPATIBLE = "INCOMPATIBLE"

    @property
    def terminal(self) -> bool:
        return self not in (ExecStatus.QUEUED, ExecStatus.IN_PROGRESS)
