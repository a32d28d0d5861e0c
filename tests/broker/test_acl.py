"""broker.acl.decide: the pure access function, driven directly (no broker)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import acl
from schemas import topics
from schemas.topics import DeviceStream

SHA = "ab" * 32
ids = st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,15}"), fullmatch=True)
levels = st.one_of(
    st.sampled_from(
        ["fleetbus", "v1", "dev", "cmd", "desired", "grp", "blob", "push", "repair", "agg", "manifest", SHA]
    ),
    st.sampled_from([s.value for s in DeviceStream]),
    ids,
    st.just(""),
)


def d1(action: acl.Action, topic: str) -> bool:
    return acl.decide("device", "d1", ["g1"], action, topic).allowed


@pytest.mark.parametrize("stream", list(DeviceStream))
def test_device_publishes_each_of_its_own_streams(stream: DeviceStream) -> None:
    """A device may publish every stream under its own dev/{id}/ subtree."""
    assert d1("publish", topics.device_stream("d1", stream))


@pytest.mark.parametrize(
    "topic",
    [
        topics.device_stream("d2", DeviceStream.STATE),
        topics.device_cmd("d1"),
        topics.device_desired("d1"),
        topics.group_cmd("g1"),
        topics.group_desired("g1"),
        topics.manifest("r1"),
        topics.blob(SHA, 0),
        topics.push("g1", SHA, 0),
        topics.repair("d1", SHA, 0),
        topics.aggregate(topics.AggregateScope.FLEET),
        "fleetbus/v1/dev/d1/state/extra",
        "fleetbus/v1/dev/d1",
        "other/topic",
        "$SYS/broker/uptime",
    ],
)
def test_device_cannot_publish_outside_its_subtree(topic: str) -> None:
    """A device can never forge a command, a deploy, a chunk, an aggregate or another device's stream."""
    decision = acl.decide("device", "d1", ["g1"], "publish", topic)
    assert not decision.allowed
    assert decision.reason


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        (topics.device_cmd("d1"), True),
        (topics.device_desired("d1"), True),
        (topics.group_cmd("g1"), True),
        (topics.group_desired("g1"), True),
        (topics.blob_filter(SHA), True),
        (topics.blob(SHA, 7), True),
        ("fleetbus/v1/blob/+/+", True),
        (topics.push_filter("g1"), True),
        (topics.push("g1", SHA, 3), True),
        (topics.push_filter("g2"), False),
        ("fleetbus/v1/push/+/+/+", False),
        ("fleetbus/v1/push/#", False),
        (topics.repair_filter("d1"), True),
        (f"fleetbus/v1/repair/d1/{SHA}/+", True),
        ("fleetbus/v1/repair/d1", True),
        (topics.manifest("r1"), True),
        (topics.shared("grp", topics.device_cmd("d1")), True),
        (topics.device_cmd("d2"), False),
        (topics.group_cmd("g2"), False),
        (topics.group_desired("g2"), False),
        ("fleetbus/v1/cmd/grp/+", False),
        ("fleetbus/v1/cmd/+/d1", False),
        ("fleetbus/v1/cmd/#", False),
        ("fleetbus/v1/desired/#", False),
        (topics.repair_filter("d2"), False),
        ("fleetbus/v1/repair/+/#", False),
        ("fleetbus/v1/repair/#", False),
        ("fleetbus/v1/blob/#", False),
        ("fleetbus/v1/manifest/#", False),
        ("fleetbus/v1/dev/+/state", False),
        ("fleetbus/v1/dev/d1/state", False),
        ("fleetbus/v1/#", False),
        ("#", False),
        ("+/v1/cmd/dev/d1", False),
        (topics.shared("grp", "fleetbus/v1/dev/+/health"), False),
        ("$SYS/#", False),
    ],
)
def test_device_subscriptions(topic_filter: str, allowed: bool) -> None:
    """A device subscribes to its own and its groups' commands and desired state, chunks and manifests."""
    assert d1("subscribe", topic_filter) is allowed


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("publish", topics.device_cmd("d1"), True),
        ("publish", topics.group_cmd("g1"), True),
        ("publish", topics.device_desired("d1"), True),
        ("publish", topics.group_desired("g9"), True),
        ("publish", topics.manifest("r1"), True),
        ("publish", topics.blob(SHA, 3), True),
        ("publish", topics.push("g1", SHA, 3), True),
        ("publish", topics.repair("d1", SHA, 3), True),
        ("publish", topics.aggregate(topics.AggregateScope.GROUP, "g1"), True),
        ("publish", topics.device_stream("d1", DeviceStream.STATE), False),
        ("publish", "other/topic", False),
        ("subscribe", "fleetbus/v1/#", True),
        ("subscribe", topics.device_stream_filter(DeviceStream.FETCH), True),
        ("subscribe", topics.shared("agg", topics.device_stream_filter(DeviceStream.HEALTH)), True),
        ("subscribe", "#", False),
        ("subscribe", "fleetbus/#", False),
        ("subscribe", "$SYS/#", False),
    ],
)
def test_operator_rights(action: acl.Action, topic: str, allowed: bool) -> None:
    """An operator publishes rollouts, commands, chunks and aggregates, and reads the whole tree."""
    assert acl.decide("operator", "ops", (), action, topic).allowed is allowed


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("subscribe", topics.device_stream_filter(), True),
        ("subscribe", "fleetbus/v1/dev/#", True),
        ("subscribe", topics.device_stream("d1", DeviceStream.HEALTH), True),
        ("subscribe", topics.aggregate_filter(), True),
        ("subscribe", "fleetbus/v1/manifest/#", True),
        ("subscribe", topics.shared("r", topics.device_stream_filter(DeviceStream.RESULTS)), True),
        ("subscribe", "fleetbus/v1/cmd/#", False),
        ("subscribe", "fleetbus/v1/desired/dev/d1", False),
        ("subscribe", "fleetbus/v1/#", False),
        ("subscribe", "fleetbus/v1/+/d1/state", False),
        ("publish", topics.aggregate(topics.AggregateScope.FLEET), False),
        ("publish", topics.device_stream("d1", DeviceStream.STATE), False),
    ],
)
def test_reader_rights(action: acl.Action, topic: str, allowed: bool) -> None:
    """A reader subscribes to telemetry, aggregates and manifests, and publishes nothing."""
    assert acl.decide("reader", "backend", (), action, topic).allowed is allowed


@pytest.mark.parametrize(
    ("action", "text"),
    [
        ("publish", ""),
        ("subscribe", ""),
        ("publish", "fleetbus/v1/dev/d1/+"),
        ("publish", "fleetbus/v1/dev/d1/#"),
        ("subscribe", "fleetbus/v1/cmd/dev/d1#"),
        ("subscribe", "fleetbus/v1/#/dev"),
        ("subscribe", "fleetbus/v1/cmd/dev/d+"),
        ("subscribe", "$share/g"),
        ("subscribe", "$share//fleetbus/v1/cmd/dev/d1"),
        ("subscribe", "$share/+/fleetbus/v1/cmd/dev/d1"),
        ("subscribe", "$share/g/"),
        ("publish", "fleetbus/v1/dev/d1/state\x00"),
    ],
)
def test_malformed_topics_and_filters_are_refused(action: acl.Action, text: str) -> None:
    """Empty topics and filters, misplaced wildcards and broken $share filters are denied to everyone."""
    assert not acl.decide("operator", "ops", (), action, text).allowed
    assert not acl.decide("device", "d1", ["g1"], action, text).allowed


def test_unknown_role_and_bad_ids_are_denied() -> None:
    """An unknown role, an id with MQTT syntax or a bad group name gets no rights at all."""
    assert not acl.decide("admin", "x", (), "subscribe", "fleetbus/v1/#").allowed
    assert not acl.decide("device", "d+", (), "publish", "fleetbus/v1/dev/d+/state").allowed
    assert not acl.decide("device", "d1", ["g/1"], "subscribe", topics.device_cmd("d1")).allowed
    assert not acl.decide("device", "d1", ["g1"], "delete", topics.device_cmd("d1")).allowed  # type: ignore[arg-type]


def test_covers_follows_mqtt_matching_for_topic_names() -> None:
    """covers() of a rule and a concrete topic is plain MQTT matching, including 'a/#' matching 'a'."""
    assert acl.covers("a/#", "a")
    assert acl.covers("a/+/c", "a/b/c")
    assert acl.covers("a/+", "a/")
    assert not acl.covers("a/+", "a")
    assert not acl.covers("a/b", "a/b/c")
    assert acl.covers("a/#", "a/+/#")
    assert not acl.covers("a/+/#", "a/#")


@given(device=ids, other=ids, stream=st.sampled_from(list(DeviceStream)), groups=st.lists(ids, max_size=3))
def test_device_never_publishes_into_another_subtree(
    device: str, other: str, stream: DeviceStream, groups: list[str]
) -> None:
    """For any ids, a device may publish another device's stream only if the ids are equal."""
    topic = topics.device_stream(other, stream)
    assert acl.decide("device", device, groups, "publish", topic).allowed is (device == other)


@given(device=ids, groups=st.lists(ids, max_size=3), parts=st.lists(levels, min_size=1, max_size=7))
def test_device_publish_rights_stay_in_its_subtree(device: str, groups: list[str], parts: list[str]) -> None:
    """Whatever topic a device publishes to, it is allowed only if it is one of its own streams."""
    topic = "/".join(parts)
    allowed = acl.decide("device", device, groups, "publish", topic).allowed
    own = {topics.device_stream(device, s) for s in DeviceStream}
    assert allowed is (topic in own)


def _tree_topic(draw: st.DrawFn, who: str, groups: list[str]) -> list[str]:
    """Levels of a topic from the real tree, naming ``who`` and its groups often, or random levels."""
    name = draw(st.sampled_from([who, *groups, "zz9", "d2"]))
    stream = draw(st.sampled_from(list(DeviceStream)))
    topic = draw(
        st.sampled_from(
            [
                topics.device_stream(who, stream),
                topics.device_stream(name, stream),
                topics.device_cmd(name),
                topics.device_desired(name),
                topics.group_cmd(name),
                topics.group_desired(name),
                topics.manifest(name),
                topics.blob(SHA, 3),
                topics.repair(name, SHA, 1),
                topics.aggregate(topics.AggregateScope.GROUP, name),
                topics.aggregate(topics.AggregateScope.FLEET),
            ]
        )
    )
    if draw(st.integers(0, 4)) == 0:
        return draw(st.lists(levels, min_size=1, max_size=7))
    return topic.split("/")


@st.composite
def _principal_filter_topic(draw: st.DrawFn) -> tuple[str, str, list[str], str, str]:
    """A principal, a filter (with + and #) and a concrete topic the filter matches."""
    role = draw(st.sampled_from(acl.ROLES))
    who = draw(ids)
    groups = draw(st.lists(ids, max_size=2))
    topic_levels = _tree_topic(draw, who, groups)
    filter_levels: list[str] = []
    for i, level in enumerate(topic_levels):
        choice = draw(st.sampled_from(["same", "same", "same", "plus", "hash"]))
        if choice == "hash":
            filter_levels.append("#")
            break
        filter_levels.append("+" if choice == "plus" else level)
        if i == len(topic_levels) - 1 and draw(st.booleans()):
            filter_levels.append("#")  # 'a/#' also matches 'a'
    return role, who, groups, "/".join(filter_levels), "/".join(topic_levels)


@settings(max_examples=1000)
@given(case=_principal_filter_topic())
def test_an_allowed_filter_only_matches_allowed_topics(case: tuple[str, str, list[str], str, str]) -> None:
    """If decide() allows a filter, every topic it matches is allowed too (checked on a random match)."""
    role, who, groups, topic_filter, topic = case
    assert topics.matches(topic_filter, topic)
    if acl.decide(role, who, groups, "subscribe", topic_filter).allowed:
        assert acl.decide(role, who, groups, "subscribe", topic).allowed


@given(case=_principal_filter_topic())
def test_share_prefix_is_decided_on_the_inner_filter(case: tuple[str, str, list[str], str, str]) -> None:
    """$share/{group}/{filter} gets exactly the decision of {filter}."""
    role, who, groups, topic_filter, _ = case
    plain = acl.decide(role, who, groups, "subscribe", topic_filter).allowed
    shared = acl.decide(role, who, groups, "subscribe", f"$share/grp/{topic_filter}").allowed
    assert shared is plain


@given(device=ids, groups=st.lists(ids, max_size=3))
def test_every_rule_of_a_principal_is_allowed_by_decide(device: str, groups: list[str]) -> None:
    """The rules exported to Mosquitto are exactly filters that decide() allows (same source of truth)."""
    group_names = tuple(sorted(set(groups)))
    for role in acl.ROLES:
        for action in ("publish", "subscribe"):
            for rule in acl.rules(role, device, group_names, action):
                if action == "publish" and ("#" in rule or "+" in rule):
                    continue  # a publish rule with wildcards grants topics, it is not a topic
                assert acl.decide(role, device, group_names, action, rule).allowed
