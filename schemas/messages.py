"""Every message on the bus: pydantic models in one union discriminated by ``kind``.

Each message carries ``v`` (the schema version it was written with) and ``ts`` (Unix seconds when it
was made). Device-originated messages also carry ``seq``, 0-255 wrapping, as in Sparkplug B, so a
reader can tell a gap or a replay.

Adding a field with a default is backward compatible and keeps ``SCHEMA_VERSION``; removing or
retyping one bumps it, and older readers then refuse the message with a clear error (codec.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.constants import (
    IDENT_MAX,
    IDENT_PATTERN,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MQTT_PORT,
    MQTTS_PORT,
    SCHEMA_VERSION,
    SHA256_PATTERN,
    ExecStatus,
)

__all__ = [
    "KINDS",
    "MAX_CHUNK_SIZE",
    "MESSAGE_ADAPTER",
    "MESSAGE_TYPES",
    "MIN_CHUNK_SIZE",
    "MQTTS_PORT",
    "MQTT_PORT",
    "SCHEMA_VERSION",
    "Aggregate",
    "Birth",
    "Cancel",
    "Chunk",
    "Death",
    "Deploy",
    "ExecStatus",
    "Fetch",
    "GoldenCase",
    "Health",
    "Manifest",
    "Message",
    "Rebirth",
    "Results",
    "RolloutControl",
    "RolloutStatus",
    "Shadow",
    "State",
    "TensorSig",
    "WaveProgress",
]

Sha256Hex = Annotated[str, Field(pattern=SHA256_PATTERN)]
Ident = Annotated[str, Field(min_length=1, max_length=IDENT_MAX, pattern=IDENT_PATTERN)]
Seq = Annotated[int, Field(ge=0, le=255)]


def _now() -> float:
    return time.time()


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)

    v: Annotated[int, Field(ge=1)] = SCHEMA_VERSION
    ts: float = Field(default_factory=_now)


# --- parts ----------------------------------------------------------------------------------------


class TensorSig(BaseModel):
    """One input or output tensor of a model: the contract the commit gate checks."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


class GoldenCase(BaseModel):
    """Inputs and the outputs the model must produce from them, within tolerances."""

    model_config = ConfigDict(frozen=True)

    inputs: list[list[float]]
    expected: list[list[float]]
    atol: float = 1e-5
    rtol: float = 1e-4


# --- operator -> device ---------------------------------------------------------------------------


class Manifest(_Base):
    """What a device needs to fetch, verify, gate and activate one model version.

    It travels signed, as bytes inside a ``Deploy``, so the signature covers exactly what was sent.
    """

    kind: Literal["manifest"] = "manifest"
    rollout_id: Ident
    name: str = "model"
    version: str = Field(min_length=1, max_length=64)
    model_sha256: Sha256Hex
    size: int = Field(ge=1)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunk_sha256: list[Sha256Hex]
    inputs: list[TensorSig] = Field(default_factory=list)
    outputs: list[TensorSig] = Field(default_factory=list)
    ops: list[str] = Field(default_factory=list)
    arena_bytes: int | None = Field(default=None, ge=0)
    golden: list[GoldenCase] = Field(default_factory=list)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    arena_budget_bytes: int | None = Field(default=None, gt=0)
    rollback: bool = False
    shadow: bool = False
    timeout_s: float = Field(default=600.0, gt=0)

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)


class Deploy(_Base):
    """A signed manifest addressed to a device or a group, published retained on its desired topic."""

    kind: Literal["deploy"] = "deploy"
    rollout_id: Ident
    manifest: bytes
    signature: bytes
    key_id: str = Field(min_length=1, max_length=64)
    # Chunks 0..pushed-1 follow this deploy on push/{group}/{sha}/{i} when it reaches a member live
    # (retain flag 0): that member waits for them instead of fetching.  Outside the signature: a
    # forged count can only delay the member's first fetch by its fetch timeout.
    pushed: int = Field(default=0, ge=0)


class Chunk(_Base):
    """One piece of a model file, addressed by the file's SHA-256 and its index."""

    kind: Literal["chunk"] = "chunk"
    sha256: Sha256Hex
    index: int = Field(ge=0)
    data: bytes


class Rebirth(_Base):
    """Asks a device to publish its birth again."""

    kind: Literal["rebirth"] = "rebirth"


class Cancel(_Base):
    """Stops a rollout on the devices that have not committed it."""

    kind: Literal["cancel"] = "cancel"
    rollout_id: Ident


# --- device -> world ------------------------------------------------------------------------------


class Birth(_Base):
    """Published on connect and on Rebirth: what the device is, can do and runs."""

    kind: Literal["birth"] = "birth"
    device_id: Ident
    seq: Seq = 0
    bdseq: int = Field(ge=0)
    groups: list[str] = Field(default_factory=list)
    agent_version: str
    runtime: str
    runtime_version: str
    ops: list[str] = Field(default_factory=list)
    ram_total_bytes: int = 0
    ram_free_bytes: int = 0
    disk_free_bytes: int = 0
    model_version: str | None = None
    model_sha256: str | None = None


class Death(_Base):
    """The device's Last Will; ``bdseq`` matches the birth it ends, so a stale will is ignored."""

    kind: Literal["death"] = "death"
    device_id: Ident
    bdseq: int = Field(ge=0)


class State(_Base):
    """One rollout execution's status on one device; ``version_number`` only grows."""

    kind: Literal["state"] = "state"
    device_id: Ident
    seq: Seq = 0
    rollout_id: Ident
    status: ExecStatus
    version_number: int = Field(ge=0)
    details: dict[str, str] = Field(default_factory=dict)
    reason: str | None = None
    model_version: str | None = None


class Health(_Base):
    """Periodic health: resources, inference counters and latency of the active model."""

    kind: Literal["health"] = "health"
    device_id: Ident
    seq: Seq = 0
    uptime_s: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    disk_free_bytes: int = 0
    inference_count: int = 0
    error_count: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    model_version: str | None = None
    counters: dict[str, int] = Field(default_factory=dict)
    last_error: str | None = None


class Results(_Base):
    """A batch of inference outputs, so a device costs the broker about one message a second."""

    kind: Literal["results"] = "results"
    device_id: Ident
    seq: Seq = 0
    model_version: str | None = None
    outputs: list[list[float]] = Field(default_factory=list)
    latency_ms: list[float] = Field(default_factory=list)
    errors: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0


class Fetch(_Base):
    """A device's repair request: the chunks it holds, as a bitmap, and how many it can take now."""

    kind: Literal["fetch"] = "fetch"
    device_id: Ident
    seq: Seq = 0
    sha256: Sha256Hex
    chunk_count: int = Field(ge=1)
    bitmap: bytes
    window: int = Field(default=8, ge=1, le=1024)


class Shadow(_Base):
    """How often a candidate model, run beside the active one, agreed with it."""

    kind: Literal["shadow"] = "shadow"
    device_id: Ident
    seq: Seq = 0
    rollout_id: Ident
    candidate_version: str
    samples: int = Field(ge=0)
    agreed: int = Field(ge=0)


# --- aggregator -> backends -----------------------------------------------------------------------


class Aggregate(_Base):
    """A rolled-up view for backends, published retained under ``agg/``."""

    kind: Literal["aggregate"] = "aggregate"
    scope: Literal["fleet", "group", "rollout"]
    name: str | None = None
    devices: int = 0
    online: int = 0
    versions: dict[str, int] = Field(default_factory=dict)
    states: dict[str, int] = Field(default_factory=dict)
    kpis: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


# --- operator <-> rollout service -----------------------------------------------------------------


class RolloutControl(_Base):
    """An operator's command to the service that drives a rollout (``fleetbus rollout pause`` ...).

    ``fleetbus serve`` applies it to the rollout's controller; a command that makes no sense in the
    rollout's current state (resume of a running rollout) is refused in the next ``rollout_status``.
    """

    kind: Literal["rollout_control"] = "rollout_control"
    rollout_id: Ident
    action: Literal["pause", "resume", "cancel"]
    by: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=256)


class WaveProgress(BaseModel):
    """One wave's progress inside a ``rollout_status``."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    state: str
    devices: int = 0
    notified: int = 0
    states: dict[str, int] = Field(default_factory=dict)
    succeeded_pct: float = 0.0
    started_at: float | None = None
    kpis: dict[str, float] = Field(default_factory=dict)
    gate: str | None = None
    shadow_agreement: float | None = None


class RolloutStatus(_Base):
    """Where one rollout stands, published retained by ``fleetbus serve`` after every change."""

    kind: Literal["rollout_status"] = "rollout_status"
    rollout_id: Ident
    version: str = Field(min_length=1, max_length=64)
    state: str
    reason: str | None = None
    wave: int = Field(default=0, ge=0)
    waves: list[WaveProgress] = Field(default_factory=list)
    states: dict[str, int] = Field(default_factory=dict)
    devices: int = 0
    skipped: int = 0
    deferred: int = 0
    anomalies: int = 0


Message = Annotated[
    Manifest
    | Deploy
    | Chunk
    | Rebirth
    | Cancel
    | Birth
    | Death
    | State
    | Health
    | Results
    | Fetch
    | Shadow
    | Aggregate
    | RolloutControl
    | RolloutStatus,
    Field(discriminator="kind"),
]

MESSAGE_TYPES: tuple[type[_Base], ...] = (
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
    Aggregate,
    RolloutControl,
    RolloutStatus,
)
KINDS: frozenset[str] = frozenset(t.model_fields["kind"].default for t in MESSAGE_TYPES)

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
