"""The rollout document: what to roll out, to whom, in which waves, and when to stop.

A document is a set of pydantic models, so a script builds it as Python objects and a person writes it
as TOML (or YAML when PyYAML is installed). Checking happens in two steps, both before anything is
published:

* the models check what the document alone can tell (a threshold over 100 %, waves whose percentages
  do not increase or do not end at 100 %, an unknown field);
* ``check_document`` checks it against the fleet the planner sees (unknown devices and groups, counts
  larger than the targets, a ``min_executed`` that could never be reached) and that the model file
  exists.

Every problem becomes one line that names the field and says what to change (``ConfigError``).
Targets are ranked by ``sha256(seed, device id)``: the order only depends on the seed and the ids, so
the same document picks the same canary on any machine, and adding a device never reorders the others.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from publisher.errors import ConfigError
from schemas.messages import Ident

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
#: Room left in a 64-character topic level for an execution suffix (":shadow", ":r11").
MAX_ROLLOUT_ID = 56
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

Percent = Annotated[float, Field(gt=0, le=100)]
# No ":" in a rollout id: it separates the id from an attempt suffix (publisher.rollout_events).
RolloutId = Annotated[
    str, Field(min_length=1, max_length=MAX_ROLLOUT_ID, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class FailureType(str, enum.Enum):
    """What an abort criterion counts, as in AWS IoT Jobs' ``criteriaList``."""

    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    ALL = "ALL"


class RetryType(str, enum.Enum):
    """The failures a device execution may be retried after."""

    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"


class _Doc(BaseModel):
    # forbid: a misspelt key ("min_soak") must be refused, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Doc):
    """The model file and the version it is rolled out as."""

    path: str = Field(min_length=1)
    version: str = Field(min_length=1, max_length=64)
    name: str = Field(default="model", min_length=1, max_length=64)


class Targets(_Doc):
    """Who may receive the rollout: device ids and groups, optionally thinned to a share.

    ``percent`` keeps that share of the union of ``devices`` and ``groups``, chosen by the document's
    seed (the first ``ceil(percent% * n)`` devices in seed order).
    """

    devices: list[Ident] = Field(default_factory=list)
    groups: list[Ident] = Field(default_factory=list)
    percent: Percent | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Targets:
        if not self.devices and not self.groups:
            raise ValueError("name at least one device in targets.devices or one group in targets.groups")
        return self


class SuccessCondition(_Doc):
    """What a wave must show before the next one starts.

    ``min_succeeded_pct`` is the share of the wave's notified devices that reached SUCCEEDED. The KPI
    gate compares the candidate's figures on the wave's devices with the previous model's figures on
    those same devices (captured before each switched): it fails when candidate/previous exceeds a
    ``max_*_ratio``. ``min_samples`` inferences are needed on each side before it is judged. An error
    rate below ``error_rate_floor`` counts as the floor, so 0 errors before and 1 after is not a ratio
    of infinity.
    """

    min_succeeded_pct: Annotated[float, Field(ge=0, le=100)] = 100.0
    max_error_rate_ratio: Annotated[float, Field(gt=0)] | None = None
    max_p95_latency_ratio: Annotated[float, Field(gt=0)] | None = None
    min_samples: Annotated[int, Field(ge=1)] = 100
    error_rate_floor: Annotated[float, Field(ge=0, le=1)] = 0.001
    on_fail: Literal["abort", "pause"] = "abort"

    @property
    def has_kpi_gate(self) -> bool:
        return self.max_error_rate_ratio is not None or self.max_p95_latency_ratio is not None


class Wave(_Doc):
    """One step of the rollout; ``percent`` and ``count`` are cumulative (devices reached so far)."""

    percent: Percent | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    min_soak_s: Annotated[float, Field(ge=0)] = 0.0
    success: SuccessCondition = Field(default_factory=SuccessCondition)

    @model_validator(mode="after")
    def _one_size(self) -> Wave:
        if (self.percent is None) == (self.count is None):
            raise ValueError(
                "give each wave exactly one of percent (cumulative share) or count (cumulative devices)"
            )
        return self

    @property
    def label(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return f"{self.count} device{'s' if self.count != 1 else ''}"

    def size(self, eligible: int) -> int:
        """How many eligible devices have been reached once this wave has started (at least 1)."""
        if eligible == 0:
            return 0
        if self.count is not None:
            return min(self.count, eligible)
        assert self.percent is not None
        # Exact arithmetic: 10 % of 20 must be 2, never 2.0000000000000004 rounded up to 3.
        return max(1, min(eligible, math.ceil(Fraction(str(self.percent)) * eligible / 100)))


class AbortCriterion(_Doc):
    """Abort when ``threshold_pct`` % of the executed devices ended in ``failure_type``.

    Executed devices are those in a final state (SUCCEEDED, or a failure with no retry left); the
    criterion is only judged once ``min_executed`` of them exist. It trips at exactly the threshold:
    10 % of 20 executed trips at 2 failures.
    """

    failure_type: FailureType = FailureType.ALL
    threshold_pct: Percent
    min_executed: Annotated[int, Field(ge=1)] = 1

    def tripped(self, failures: int, executed: int) -> bool:
        if executed < self.min_executed or executed == 0:
            return False
        return failures * 100 >= Fraction(str(self.threshold_pct)) * executed


class MaintenanceWindow(_Doc):
    """A daily UTC window, ``start`` to ``end`` as HH:MM; it may wrap midnight (22:00 to 04:00)."""

    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"write the time as HH:MM in UTC, e.g. 02:30 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal, so the window would be empty; drop it or widen it")
        return self

    @staticmethod
    def _minutes(hhmm: str) -> int:
        hours, minutes = hhmm.split(":")
        return int(hours) * 60 + int(minutes)

    def next_open(self, now: float) -> float:
        """``now`` when inside the window, else the Unix time the window next opens."""
        if self.contains(now):
            return now
        day = math.floor(now / 86400) * 86400
        opening = day + self._minutes(self.start) * 60
        return opening if opening > now else opening + 86400

    def contains(self, now: float) -> bool:
        """Whether the Unix time ``now`` falls inside the window (start inclusive, end exclusive)."""
        moment = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
        minute = moment.hour * 60 + moment.minute
        start, end = self._minutes(self.start), self._minutes(self.end)
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end


class ShadowConfig(_Doc):
    """Run the candidate beside the active model first; switch a wave only when they agree enough."""

    min_samples: Annotated[int, Field(ge=1)] = 100
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.99


def _default_waves() -> list[Wave]:
    return [Wave(percent=100)]


class RolloutDocument(_Doc):
    """A whole rollout: model, targets, waves, abort criteria, timing and the action on abort."""

    id: RolloutId | None = None
    model: ModelRef
    targets: Targets
    seed: str | None = None
    waves: list[Wave] = Field(default_factory=_default_waves, min_length=1)
    abort: list[AbortCriterion] = Field(default_factory=list)
    in_progress_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    retries: dict[RetryType, Annotated[int, Field(ge=0, le=10)]] = Field(default_factory=dict)
    maintenance: MaintenanceWindow | None = None
    on_abort: Literal["stop", "rollback"] = "stop"
    shadow: ShadowConfig | None = None

    @field_validator("retries", mode="before")
    @classmethod
    def _upper_retry_keys(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        keys = {(k.value if isinstance(k, enum.Enum) else str(k).upper()): v for k, v in value.items()}
        # AWS's retryCriteria has ALL: a default for every failure type not named on its own.
        every = keys.pop("ALL", None)
        if every is not None:
            for kind in RetryType:
                keys.setdefault(kind.value, every)
        return keys

    @model_validator(mode="after")
    def _waves_add_up(self) -> RolloutDocument:
        problems: list[str] = []
        last = self.waves[-1]
        if last.percent != 100:
            problems.append(
                f"waves[{len(self.waves) - 1}]: the last wave must be {{ percent = 100 }} so every target "
                f"is reached (it is {last.label}); add a final wave with percent = 100"
            )
        previous_pct: tuple[int, float] | None = None
        previous_count: tuple[int, int] | None = None
        for i, wave in enumerate(self.waves):
            if wave.percent is not None:
                if previous_pct is not None and wave.percent <= previous_pct[1]:
                    problems.append(
                        f"waves[{i}].percent = {wave.percent:g} does not increase on waves[{previous_pct[0]}]"
                        f" ({previous_pct[1]:g}); percentages are cumulative, so make each larger than the "
                        "last"
                    )
                previous_pct = (i, wave.percent)
            if wave.count is not None:
                if previous_pct is not None:
                    problems.append(
                        f"waves[{i}].count follows a percent wave; put count waves first (a fixed canary), "
                        "then percentages"
                    )
                if previous_count is not None and wave.count <= previous_count[1]:
                    problems.append(
                        f"waves[{i}].count = {wave.count} does not increase on waves[{previous_count[0]}]"
                        f" ({previous_count[1]}); counts are cumulative, so make each larger than the last"
                    )
                previous_count = (i, wave.count)
        if problems:
            # One line per problem; _describe turns each line into its own entry of the refusal.
            raise ValueError("\n".join(problems))
        return self

    @property
    def rollout_id(self) -> str:
        """``id``, or one derived from the model and a hash of the document, stable across runs."""
        if self.id is not None:
            return self.id
        # The file's name, not its folder: the same document gives the same id wherever it is loaded.
        content = self.model_dump(mode="json", exclude={"id"})
        content["model"]["path"] = Path(self.model.path).name
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
        stem = _UNSAFE_ID_CHARS.sub("-", f"{self.model.name}-{self.model.version}").strip("-._:")
        return f"{stem[: MAX_ROLLOUT_ID - 9] or 'rollout'}-{digest}"

    @property
    def ranking_seed(self) -> str:
        """The seed that orders targets: ``seed``, or the model version so each version differs."""
        return self.seed if self.seed is not None else self.model.version

    def retries_for(self, failure: RetryType) -> int:
        return self.retries.get(failure, 0)


# --- ranking and targets --------------------------------------------------------------------------


def rank_key(seed: str, device_id: str) -> str:
    """The position of a device in seed order; a NUL separates seed and id so no pair collides."""
    return hashlib.sha256(f"{seed}\x00{device_id}".encode()).hexdigest()


def rank(seed: str, device_ids: Iterable[str]) -> list[str]:
    """Device ids in seed order (ties impossible: ids are distinct and the hash is the key)."""
    return sorted(set(device_ids), key=lambda d: (rank_key(seed, d), d))


def resolve_targets(doc: RolloutDocument, fleet_groups: Mapping[str, Collection[str]]) -> list[str]:
    """The targeted device ids in seed order: listed devices plus group members, thinned by percent.

    ``fleet_groups`` maps every known device id to its groups. Unknown ids and groups are not an error
    here (``check_document`` reports them); they simply select nothing.
    """
    wanted_groups = set(doc.targets.groups)
    chosen = {d for d in doc.targets.devices if d in fleet_groups}
    chosen.update(d for d, groups in fleet_groups.items() if wanted_groups.intersection(groups))
    ordered = rank(doc.ranking_seed, chosen)
    if doc.targets.percent is not None and ordered:
        keep = max(1, math.ceil(Fraction(str(doc.targets.percent)) * len(ordered) / 100))
        ordered = ordered[:keep]
    return ordered


# --- checking -------------------------------------------------------------------------------------


def check_document(
    doc: RolloutDocument,
    fleet_groups: Mapping[str, Collection[str]] | None = None,
    *,
    check_file: bool = True,
) -> list[str]:
    """Every problem that would make this rollout go wrong, one line each; empty when it is sound.

    ``fleet_groups`` (device id -> its groups) is the fleet as the planner sees it; without it only the
    model file is checked.
    """
    problems: list[str] = []
    if check_file:
        path = Path(doc.model.path)
        if not path.is_file():
            problems.append(
                f"model.path: no model file at {path}; check the path (relative paths are read from the "
                "document's folder)"
            )
    if fleet_groups is None:
        return problems
    known_groups = {g for groups in fleet_groups.values() for g in groups}
    for device in doc.targets.devices:
        if device not in fleet_groups:
            problems.append(
                f"targets.devices: unknown device {device!r}; check the id, or let it connect once so "
                "its birth registers it"
            )
    for group in doc.targets.groups:
        if group not in known_groups:
            listed = ", ".join(sorted(known_groups)[:10]) or "none"
            problems.append(f"targets.groups: no device is in group {group!r}; known groups: {listed}")
    targets = len(resolve_targets(doc, fleet_groups))
    if targets == 0:
        problems.append("targets: they select no device; name devices or groups that exist")
        return problems
    for i, wave in enumerate(doc.waves):
        if wave.count is not None and wave.count > targets:
            problems.append(
                f"waves[{i}].count = {wave.count} exceeds the {targets} targeted devices; lower it or use "
                "percent"
            )
    for i, criterion in enumerate(doc.abort):
        if criterion.min_executed > targets:
            problems.append(
                f"abort[{i}].min_executed = {criterion.min_executed} exceeds the {targets} targeted "
                f"devices, so it could never trip; lower it to at most {targets}"
            )
    return problems


def validate_document(
    doc: RolloutDocument,
    fleet_groups: Mapping[str, Collection[str]] | None = None,
    *,
    check_file: bool = True,
) -> RolloutDocument:
    """``doc`` when ``check_document`` finds nothing; otherwise ``ConfigError`` listing every problem."""
    problems = check_document(doc, fleet_groups, check_file=check_file)
    if problems:
        raise ConfigError(_refusal(doc.id or doc.model.path, problems))
    return doc


def _refusal(what: str | None, problems: Sequence[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    name = f"rollout document {what}" if what else "rollout document"
    return f"{name} refused, nothing was published:\n{lines}"


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check its spelling against docs/rollouts.md"
        elif item["type"] == "missing":
            message = "missing; this field is required"
        elif "input" in item and not isinstance(item["input"], (Mapping, list)):
            message = f"{message} (got {item['input']!r})"
        if not where:
            problems.extend(message.split("\n"))  # document-wide checks name their own fields
        else:
            problems.append(f"{where or 'document'}: {message}")
    return problems


# --- loading --------------------------------------------------------------------------------------


def document_from_mapping(data: Mapping[str, Any], *, base_dir: Path | None = None) -> RolloutDocument:
    """Build a document from parsed TOML/YAML/JSON; a relative model path is read from ``base_dir``."""
    try:
        doc = RolloutDocument.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_refusal(None, _describe(exc))) from None
    if base_dir is not None and not Path(doc.model.path).is_absolute():
        model = doc.model.model_copy(update={"path": str(base_dir / doc.model.path)})
        doc = doc.model_copy(update={"model": model})
    return doc


def parse_document(
    text: str, *, fmt: Literal["toml", "yaml"] = "toml", base_dir: Path | None = None
) -> RolloutDocument:
    """Parse a TOML or YAML rollout document from text."""
    data: Any
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"rollout document is not valid TOML: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                "YAML rollout documents need PyYAML: pip install pyyaml, or write TOML"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"rollout document is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("a rollout document must be a table of keys (model, targets, waves, ...)")
    return document_from_mapping(data, base_dir=base_dir)


def load_document(path: str | Path) -> RolloutDocument:
    """Read a ``.toml`` or ``.yaml``/``.yml`` rollout document; the model path is relative to it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rollout document {path}: {exc.strerror}") from None
    fmt: Literal["toml", "yaml"] = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml"
    return parse_document(text, fmt=fmt, base_dir=path.parent)


def one_wave_document(
    model_path: str,
    version: str,
    *,
    devices: Sequence[str] = (),
    groups: Sequence[str] = (),
    rollout_id: str | None = None,
    timeout_s: float = 600.0,
) -> RolloutDocument:
    """The document behind the shorthand ``rollout push MODEL --version V --to ...``: one 100 % wave."""
    try:
        return RolloutDocument(
            id=rollout_id,
            model=ModelRef(path=model_path, version=version),
            targets=Targets(devices=list(devices), groups=list(groups)),
            in_progress_timeout_s=timeout_s,
        )
    except ValidationError as exc:
        raise ConfigError(_refusal(model_path, _describe(exc))) from None
