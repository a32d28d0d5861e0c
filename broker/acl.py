"""Who may publish or subscribe where: one pure function over the topic tree of schemas/topics.py.

Every right is a topic filter in plain MQTT syntax (``+``, ``#``, literal levels), built by the
builders in ``schemas.topics``; ``rules()`` lists them per role and action, ``decide()`` applies them,
and ``broker/mosquitto.py`` writes the very same filters into a Mosquitto ACL file, so the embedded
broker and Mosquitto take the same decisions.

    device   publish    fleetbus/v1/dev/{own id}/{birth,death,state,health,results,fetch,shadow}
             subscribe  fleetbus/v1/cmd/dev/{own id}         fleetbus/v1/desired/dev/{own id}
                        fleetbus/v1/cmd/grp/{each group}     fleetbus/v1/desired/grp/{each group}
                        fleetbus/v1/push/{each group}/+/+
                        fleetbus/v1/blob/+/+                 fleetbus/v1/repair/{own id}/#
                        fleetbus/v1/manifest/+
    operator publish    fleetbus/v1/{cmd,desired,manifest,blob,push,repair,agg}/#
             subscribe  fleetbus/v1/#
    reader   publish    nothing
             subscribe  fleetbus/v1/dev/#   fleetbus/v1/agg/#   fleetbus/v1/manifest/#

A publish topic is allowed when one rule matches it. A subscription filter is allowed when one rule
*contains* it: every topic the filter can match is matched by that rule (``+`` in the filter needs
``+`` or ``#`` in the rule at that level, ``#`` in the filter needs ``#`` in the rule). That is the
rule Mosquitto's acl_file applies to subscriptions, it is sound (a filter allowed here never matches
a topic that is denied), and our rules never need a union of two rules to cover one filter.
``$share/{group}/{filter}`` is decided on ``{filter}``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas import topics
from schemas.topics import DeviceStream

Action = Literal["publish", "subscribe"]
ROLES = ("device", "operator", "reader")
SHARE_PREFIX = "$share/"

# The operator publishes into every branch a device receives from, plus aggregates; never into dev/.
_OPERATOR_PUBLISH_BRANCHES = ("cmd", "desired", "manifest", "blob", "push", "repair", "agg")
_READER_SUBSCRIBE_BRANCHES = ("dev", "agg", "manifest")


@dataclass(frozen=True)
class Decision:
    """The answer of decide(): allowed or not, and a sentence saying why (logged on denial)."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@functools.lru_cache(maxsize=4096)
def rules(role: str, principal_id: str, groups: tuple[str, ...], action: Action) -> tuple[str, ...]:
    """The topic filters granting ``action`` to this principal (empty when it has none)."""
    p = topics.PREFIX
    if role == "device":
        if action == "publish":
            return tuple(topics.device_stream(principal_id, s) for s in DeviceStream)
        return (
            topics.device_cmd(principal_id),
            topics.device_desired(principal_id),
            *(topics.group_cmd(g) for g in groups),
            *(topics.group_desired(g) for g in groups),
            *(topics.push_filter(g) for g in groups),
            f"{p}/blob/+/+",
            topics.repair_filter(principal_id),
            f"{p}/manifest/+",
        )
    if role == "operator":
        if action == "publish":
            return tuple(f"{p}/{branch}/#" for branch in _OPERATOR_PUBLISH_BRANCHES)
        return (f"{p}/#",)
    if role == "reader":
        if action == "publish":
            return ()
        return tuple(f"{p}/{branch}/#" for branch in _READER_SUBSCRIBE_BRANCHES)
    return ()


def _syntax_problem(text: str, action: Action) -> str | None:
    """Why ``text`` is not a valid MQTT 3.1.1 topic name (publish) or filter (subscribe), or None."""
    if not text:
        return "empty topic" if action == "publish" else "empty topic filter"
    if "\x00" in text:
        return "topic contains U+0000"
    if len(text.encode("utf-8", "surrogatepass")) > 65535:
        return "topic longer than 65535 bytes"
    if action == "publish":
        if "+" in text or "#" in text:
            return "wildcards are not allowed in a publish topic"
        return None
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def covers(rule: str, topic_filter: str) -> bool:
    """True when every topic that ``topic_filter`` matches is also matched by ``rule``.

    For a topic name (no wildcards) this is ordinary MQTT matching.
    """
    r_levels = rule.split("/")
    f_levels = topic_filter.split("/")
    for i, f in enumerate(f_levels):
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return True
        if f == "#":
            # The filter also matches the parent level and any depth below; only a '#' rule covers that.
            return False
        if r == "+":
            continue
        if f == "+" or f != r:
            return False
    if len(r_levels) == len(f_levels):
        return True
    # 'a/#' matches 'a' itself (MQTT 3.1.1 section 4.7.1.2).
    return len(r_levels) == len(f_levels) + 1 and r_levels[-1] == "#"


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/{group}/{filter}`` into (group, filter); (None, filter) for a plain filter."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    rest = topic_filter[len(SHARE_PREFIX) :]
    group, sep, inner = rest.partition("/")
    if not sep:
        return group, ""
    return group, inner


def decide(
    principal_role: str,
    principal_id: str,
    groups: Iterable[str],
    action: Action,
    topic_or_filter: str,
) -> Decision:
    """May this principal publish to the topic, or subscribe to the filter? Pure and total."""
    if principal_role not in ROLES:
        return Decision(False, f"unknown role {principal_role!r}")
    if action not in ("publish", "subscribe"):
        return Decision(False, f"unknown action {action!r}")
    try:
        group_names = tuple(sorted({topics.validate_id(g, "group") for g in groups}))
        topics.validate_id(principal_id, "principal id")
    except ValueError as exc:
        return Decision(False, str(exc))

    target = topic_or_filter
    if action == "subscribe" and target.startswith(SHARE_PREFIX):
        share_group, target = split_shared(target)
        if not share_group or "+" in share_group or "#" in share_group:
            return Decision(False, "a $share group must be one level without wildcards")
    elif action == "publish" and target.startswith("$"):
        return Decision(False, "topics starting with '$' are reserved for the broker")

    problem = _syntax_problem(target, action)
    if problem is not None:
        return Decision(False, problem)

    granted = rules(principal_role, principal_id, group_names, action)
    for rule in granted:
        if covers(rule, target):
            return Decision(True, f"{principal_role} may {action} {target} (rule {rule})")
    if not granted:
        return Decision(False, f"a {principal_role} may not {action} at all")
    verb = "publish to" if action == "publish" else "subscribe to"
    return Decision(False, f"{principal_role} {principal_id!r} may not {verb} {target!r}: no rule covers it")
