"""The versioned topic tree: every topic fleetbus uses is built and parsed here, nowhere else.

The tree splits by direction so that access rules are prefixes (broker/acl.py):

    fleetbus/v1/
      cmd/dev/{device}            operator -> one device: transient commands (rebirth, cancel)
      cmd/grp/{group}             operator -> a group: transient commands
      desired/dev/{device}        operator -> one device: retained deploy (the model it should run)
      desired/grp/{group}         operator -> a group: retained deploy
      manifest/{rollout}          operator -> backends: retained signed manifest of a rollout
      blob/{sha256}/{index}       operator -> fleet: one chunk, sent once for every device
      push/{group}/{sha256}/{index}
                                  operator -> a group: the first chunks of a live group deploy
      repair/{device}/{sha256}/{index}
                                  operator -> one device: a chunk that device asked for again
      dev/{device}/{stream}       device -> world: birth, death, state, health, results, fetch, shadow
      agg/{scope}[/{name}]        aggregator -> backends: retained aggregates (fleet, group, rollout)
      rollout/{rollout}/control   operator -> rollout service: pause, resume, cancel
      rollout/{rollout}/status    rollout service -> operators and backends: retained wave progress

Everything a device publishes sits under ``dev/{device}/`` and everything it receives sits
elsewhere, so a device can never forge a command, a deploy or a chunk.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TypeVar

from schemas.errors import TopicError

ROOT = "fleetbus"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

MAX_ID_LENGTH = 64
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class DeviceStream(str, enum.Enum):
    """What a device publishes, one topic each."""

    BIRTH = "birth"
    DEATH = "death"
    STATE = "state"
    HEALTH = "health"
    RESULTS = "results"
    FETCH = "fetch"
    SHADOW = "shadow"


class AggregateScope(str, enum.Enum):
    FLEET = "fleet"
    GROUP = "group"
    ROLLOUT = "rollout"


def validate_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is safe as one topic level, else raise TopicError saying why."""
    if not isinstance(value, str) or not value:
        raise TopicError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise TopicError(f"{what} {value[:20]!r}... is {len(value)} characters; the limit is {MAX_ID_LENGTH}")
    if not _ID_RE.match(value):
        raise TopicError(
            f"{what} {value!r} may hold only letters, digits and . _ : - (and must start with a letter "
            "or digit); '+', '#', '/' and spaces are MQTT syntax"
        )
    return value


def validate_sha(value: str) -> str:
    if not _SHA_RE.match(value):
        raise TopicError(f"{value!r} is not a lowercase hex SHA-256 (64 characters)")
    return value


def _index(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TopicError(f"chunk index must be a non-negative integer, got {value!r}")
    return value


# --- builders -------------------------------------------------------------------------------------


def device_cmd(device: str) -> str:
    return f"{PREFIX}/cmd/dev/{validate_id(device)}"


def group_cmd(group: str) -> str:
    return f"{PREFIX}/cmd/grp/{validate_id(group, 'group')}"


def device_desired(device: str) -> str:
    return f"{PREFIX}/desired/dev/{validate_id(device)}"


def device_desired_filter() -> str:
    """Every device's retained deploy (an observer's subscription; a device subscribes to its own)."""
    return f"{PREFIX}/desired/dev/+"


def group_desired(group: str) -> str:
    return f"{PREFIX}/desired/grp/{validate_id(group, 'group')}"


def manifest(rollout: str) -> str:
    return f"{PREFIX}/manifest/{validate_id(rollout, 'rollout id')}"


def manifest_filter() -> str:
    return f"{PREFIX}/manifest/+"


def blob(sha256: str, index: int) -> str:
    return f"{PREFIX}/blob/{validate_sha(sha256)}/{_index(index)}"


def blob_filter(sha256: str) -> str:
    return f"{PREFIX}/blob/{validate_sha(sha256)}/+"


def push(group: str, sha256: str, index: int) -> str:
    return f"{PREFIX}/push/{validate_id(group, 'group')}/{validate_sha(sha256)}/{_index(index)}"


def push_filter(group: str) -> str:
    """Every chunk pushed to ``group`` (a member's standing subscription)."""
    return f"{PREFIX}/push/{validate_id(group, 'group')}/+/+"


def repair(device: str, sha256: str, index: int) -> str:
    return f"{PREFIX}/repair/{validate_id(device)}/{validate_sha(sha256)}/{_index(index)}"


def repair_filter(device: str) -> str:
    return f"{PREFIX}/repair/{validate_id(device)}/#"


def device_stream(device: str, stream: DeviceStream) -> str:
    return f"{PREFIX}/dev/{validate_id(device)}/{DeviceStream(stream).value}"


def device_stream_filter(stream: DeviceStream | None = None, device: str | None = None) -> str:
    """A subscription filter over device streams: one stream of all devices, or all of one."""
    dev = "+" if device is None else validate_id(device)
    tail = "+" if stream is None else DeviceStream(stream).value
    return f"{PREFIX}/dev/{dev}/{tail}"


def aggregate(scope: AggregateScope, name: str | None = None) -> str:
    scope = AggregateScope(scope)
    if scope is AggregateScope.FLEET:
        if name is not None:
            raise TopicError("the fleet aggregate has no name")
        return f"{PREFIX}/agg/fleet"
    if name is None:
        raise TopicError(f"the {scope.value} aggregate needs a name")
    what = "group" if scope is AggregateScope.GROUP else "rollout id"
    return f"{PREFIX}/agg/{scope.value}/{validate_id(name, what)}"


def rollout_control(rollout: str) -> str:
    return f"{PREFIX}/rollout/{validate_id(rollout, 'rollout id')}/control"


def rollout_status(rollout: str) -> str:
    return f"{PREFIX}/rollout/{validate_id(rollout, 'rollout id')}/status"


def rollout_filter(leaf: str) -> str:
    """All rollouts' ``control`` or ``status`` topics."""
    if leaf not in ("control", "status"):
        raise TopicError(f"rollout topics end in control or status, not {leaf!r}")
    return f"{PREFIX}/rollout/+/{leaf}"


def aggregate_filter() -> str:
    return f"{PREFIX}/agg/#"


def shared(group: str, topic_filter: str) -> str:
    """A shared-subscription filter (MQTT 5 `$share`, also honoured by Mosquitto for 3.1.1 clients)."""
    return f"$share/{validate_id(group, 'share group')}/{topic_filter}"


# --- parser ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    """A parsed fleetbus topic. ``kind`` names the branch; unused fields are None."""

    # cmd_dev cmd_grp desired_dev desired_grp manifest blob push repair dev agg rollout_control
    # rollout_status
    kind: str
    device: str | None = None
    group: str | None = None
    rollout: str | None = None
    sha256: str | None = None
    index: int | None = None
    stream: DeviceStream | None = None
    scope: AggregateScope | None = None

    def build(self) -> str:
        """Rebuild the topic string (parse and build are inverse)."""
        match self.kind:
            case "cmd_dev":
                return device_cmd(_req(self.device))
            case "cmd_grp":
                return group_cmd(_req(self.group))
            case "desired_dev":
                return device_desired(_req(self.device))
            case "desired_grp":
                return group_desired(_req(self.group))
            case "manifest":
                return manifest(_req(self.rollout))
            case "blob":
                return blob(_req(self.sha256), _req(self.index))
            case "push":
                return push(_req(self.group), _req(self.sha256), _req(self.index))
            case "repair":
                return repair(_req(self.device), _req(self.sha256), _req(self.index))
            case "dev":
                return device_stream(_req(self.device), _req(self.stream))
            case "rollout_control":
                return rollout_control(_req(self.rollout))
            case "rollout_status":
                return rollout_status(_req(self.rollout))
            case "agg":
                scope = _req(self.scope)
                name = self.group if scope is AggregateScope.GROUP else self.rollout
                return aggregate(scope, name)
        raise TopicError(f"unknown topic kind {self.kind!r}")


_T = TypeVar("_T")


def _req(value: _T | None) -> _T:
    if value is None:
        raise TopicError("topic field is missing")
    return value


def _parse_index(text: str, topic: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise TopicError(f"{topic!r}: chunk index {text!r} is not a canonical non-negative integer")
    return int(text)


def parse(topic: str) -> Topic:
    """Parse a concrete fleetbus topic, or raise TopicError saying what is wrong with it."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise TopicError(f"{topic!r} is not a fleetbus topic (it must start with {PREFIX}/)")
    if parts[1] != VERSION:
        raise TopicError(f"{topic!r} uses topic tree {parts[1]!r}; this fleetbus speaks {VERSION!r}")
    rest = parts[2:]
    head, n = rest[0], len(rest)
    try:
        if head == "cmd" and n == 3 and rest[1] in ("dev", "grp"):
            if rest[1] == "dev":
                return Topic("cmd_dev", device=validate_id(rest[2]))
            return Topic("cmd_grp", group=validate_id(rest[2], "group"))
        if head == "desired" and n == 3 and rest[1] in ("dev", "grp"):
            if rest[1] == "dev":
                return Topic("desired_dev", device=validate_id(rest[2]))
            return Topic("desired_grp", group=validate_id(rest[2], "group"))
        if head == "manifest" and n == 2:
            return Topic("manifest", rollout=validate_id(rest[1], "rollout id"))
        if head == "blob" and n == 3:
            return Topic("blob", sha256=validate_sha(rest[1]), index=_parse_index(rest[2], topic))
        if head == "push" and n == 4:
            return Topic(
                "push",
                group=validate_id(rest[1], "group"),
                sha256=validate_sha(rest[2]),
                index=_parse_index(rest[3], topic),
            )
        if head == "repair" and n == 4:
            return Topic(
                "repair",
                device=validate_id(rest[1]),
                sha256=validate_sha(rest[2]),
                index=_parse_index(rest[3], topic),
            )
        if head == "rollout" and n == 3 and rest[2] in ("control", "status"):
            return Topic(f"rollout_{rest[2]}", rollout=validate_id(rest[1], "rollout id"))
        if head == "dev" and n == 3:
            return Topic("dev", device=validate_id(rest[1]), stream=DeviceStream(rest[2]))
        if head == "agg" and n == 2 and rest[1] == "fleet":
            return Topic("agg", scope=AggregateScope.FLEET)
        if head == "agg" and n == 3 and rest[1] == "group":
            return Topic("agg", scope=AggregateScope.GROUP, group=validate_id(rest[2], "group"))
        if head == "agg" and n == 3 and rest[1] == "rollout":
            return Topic("agg", scope=AggregateScope.ROLLOUT, rollout=validate_id(rest[2], "rollout id"))
    except ValueError:
        raise TopicError(f"{topic!r}: unknown device stream {rest[-1]!r}") from None
    raise TopicError(f"{topic!r} matches no branch of the {PREFIX} topic tree")


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic-filter matching (section 4.7), including the `$` rule for wildcards."""
    fparts = topic_filter.split("/")
    tparts = topic.split("/")
    if tparts and tparts[0].startswith("$") and fparts and fparts[0] in ("+", "#"):
        return False
    for i, f in enumerate(fparts):
        if f == "#":
            return True
        if i >= len(tparts):
            return False
        if f != "+" and f != tparts[i]:
            return False
    return len(fparts) == len(tparts)
