"""The topic tree: builders and parser are inverse, and ids that would break MQTT are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import topics
from schemas.errors import TopicError

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
shas = st.from_regex(r"\A[0-9a-f]{64}\Z")
indexes = st.integers(min_value=0, max_value=10**6)


@given(
    device=ids, group=ids, rollout=ids, sha=shas, index=indexes, stream=st.sampled_from(topics.DeviceStream)
)
def test_every_builder_round_trips_through_the_parser(
    device: str, group: str, rollout: str, sha: str, index: int, stream: topics.DeviceStream
) -> None:
    """parse(build(x)).build() == build(x) for every branch of the tree."""
    built = [
        topics.device_cmd(device),
        topics.group_cmd(group),
        topics.device_desired(device),
        topics.group_desired(group),
        topics.manifest(rollout),
        topics.blob(sha, index),
        topics.push(group, sha, index),
        topics.repair(device, sha, index),
        topics.device_stream(device, stream),
        topics.aggregate(topics.AggregateScope.FLEET),
        topics.aggregate(topics.AggregateScope.GROUP, group),
        topics.aggregate(topics.AggregateScope.ROLLOUT, rollout),
        topics.rollout_control(rollout),
        topics.rollout_status(rollout),
    ]
    for topic in built:
        assert topics.parse(topic).build() == topic


def test_parser_extracts_fields() -> None:
    """The parser names the device, stream, sha and index of a topic."""
    sha = "ab" * 32
    assert topics.parse(topics.repair("dev-1", sha, 7)) == topics.Topic(
        "repair", device="dev-1", sha256=sha, index=7
    )
    assert topics.parse(topics.push("g-1", sha, 3)) == topics.Topic("push", group="g-1", sha256=sha, index=3)
    assert topics.matches(topics.push_filter("g-1"), topics.push("g-1", sha, 3))
    parsed = topics.parse(topics.device_stream("d.2", topics.DeviceStream.HEALTH))
    assert (parsed.device, parsed.stream) == ("d.2", topics.DeviceStream.HEALTH)


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "a#", "#", "+", " x", "x y", "a" * 65, "-leading", "\x00", "é"]
)
def test_invalid_ids_are_refused_by_every_builder(bad: str) -> None:
    """Ids with MQTT syntax, spaces, non-ASCII, empty or overlong values raise TopicError."""
    for build in (topics.device_cmd, topics.group_cmd, topics.device_desired, topics.manifest):
        with pytest.raises(TopicError):
            build(bad)
    with pytest.raises(TopicError):
        topics.device_stream(bad, topics.DeviceStream.STATE)


@pytest.mark.parametrize(
    "topic",
    [
        "fleetbus/v2/dev/a/state",
        "other/v1/dev/a/state",
        "fleetbus/v1/dev/a/unknown",
        "fleetbus/v1/dev/a/state/extra",
        "fleetbus/v1/blob/" + "a" * 64 + "/01",
        "fleetbus/v1/blob/" + "a" * 64 + "/-1",
        "fleetbus/v1/blob/notasha/1",
        "fleetbus/v1/agg/fleet/x",
        "fleetbus/v1/cmd/dev/+",
        "fleetbus/v1",
    ],
)
def test_parser_refuses_topics_outside_the_tree(topic: str) -> None:
    """A topic that no builder makes is a TopicError, not a half-parsed result."""
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_negative_or_bool_chunk_index_is_refused() -> None:
    """Chunk indexes are non-negative integers only."""
    with pytest.raises(TopicError):
        topics.blob("a" * 64, -1)
    with pytest.raises(TopicError):
        topics.blob("a" * 64, True)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("fleetbus/v1/dev/+/state", "fleetbus/v1/dev/a/state", True),
        ("fleetbus/v1/dev/+/state", "fleetbus/v1/dev/a/health", False),
        ("fleetbus/v1/#", "fleetbus/v1/dev/a/state", True),
        ("fleetbus/v1/dev/#", "fleetbus/v1/dev", True),
        ("#", "$SYS/broker", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_matching_follows_mqtt_311(flt: str, topic: str, expected: bool) -> None:
    """matches() implements MQTT 3.1.1 section 4.7 wildcards, including the '$' rule."""
    assert topics.matches(flt, topic) is expected


def test_shared_subscription_filter() -> None:
    """shared() wraps a filter in $share/GROUP/ and validates the group."""
    assert topics.shared("agg", "fleetbus/v1/dev/+/health") == "$share/agg/fleetbus/v1/dev/+/health"
    with pytest.raises(TopicError):
        topics.shared("a/b", "x")


def test_device_desired_filter_matches_every_device_deploy_and_no_group_one() -> None:
    """device_desired_filter() matches each device's desired topic, not a group's."""
    flt = topics.device_desired_filter()
    assert topics.matches(flt, topics.device_desired("cam-01"))
    assert not topics.matches(flt, topics.group_desired("cam-01"))
