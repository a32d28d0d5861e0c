"""Random filters and topics, three judges: acl.decide, the embedded broker and Mosquitto must agree.

Hypothesis draws principals, filters and topics from the real topic tree (ids of the principal, of
others, wildcards at any level); each example is sent over a real paho connection and the broker's
answer (SUBACK code, or whether the publish was delivered) is compared with ``acl.decide``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import acl
from schemas import topics
from schemas.topics import DeviceStream
from tests.broker.conftest import (
    DEVICE_GROUPS,
    OPERATOR,
    READER,
    BrokerUnderTest,
    Client,
    connect_as,
)

SHA = "ef" * 32
PRINCIPALS = ("d1", OPERATOR, READER)
ROLE = {"d1": "device", OPERATOR: "operator", READER: "reader"}
NAMES = ("d1", "d2", "g1", "g2", "r1")
_marker = itertools.count()


def _tree_topics() -> list[str]:
    out = [topics.blob(SHA, 0), topics.aggregate(topics.AggregateScope.FLEET)]
    for name in NAMES:
        out += [
            topics.device_cmd(name),
            topics.device_desired(name),
            topics.group_cmd(name),
            topics.group_desired(name),
            topics.manifest(name),
            topics.repair(name, SHA, 2),
            topics.aggregate(topics.AggregateScope.GROUP, name),
            *(topics.device_stream(name, s) for s in DeviceStream),
        ]
    return out


TREE = _tree_topics()


@st.composite
def filters(draw: st.DrawFn) -> str:
    """A well-formed filter made from a tree topic by replacing levels with + or ending it with #."""
    levels = draw(st.sampled_from(TREE)).split("/")
    out: list[str] = []
    for i, level in enumerate(levels):
        choice = draw(st.sampled_from(["same", "same", "same", "plus", "hash"]))
        if choice == "hash":
            out.append("#")
            break
        out.append("+" if choice == "plus" else level)
        if i == len(levels) - 1 and draw(st.integers(0, 5)) == 0:
            out.append("#")
    return "/".join(out)


@pytest.fixture(scope="module")
def sessions(broker_under_test: BrokerUnderTest) -> Iterator[dict[str, Client]]:
    """One connected client per principal, plus an operator watcher on the whole tree."""
    b = broker_under_test
    made: list[Client] = []
    clients = {p: connect_as(made, b.port, b.creds, p, client_id=f"{p}") for p in PRINCIPALS}
    clients["watcher"] = connect_as(made, b.port, b.creds, OPERATOR, client_id="diff-watcher")
    assert clients["watcher"].subscribe("fleetbus/v1/#") == 1
    yield clients
    for c in made:
        c.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(principal=st.sampled_from(PRINCIPALS), topic_filter=filters(), shared=st.booleans())
def test_subscribe_answers_agree_with_decide(
    sessions: dict[str, Client], principal: str, topic_filter: str, shared: bool
) -> None:
    """For random filters (plain and $share), SUBACK 0x80 comes exactly when decide() denies."""
    if shared:
        topic_filter = topics.shared("grp", topic_filter)
    groups = DEVICE_GROUPS.get(principal, ())
    allowed = acl.decide(ROLE[principal], principal, groups, "subscribe", topic_filter).allowed
    code = sessions[principal].subscribe(topic_filter, qos=1)
    assert (code != 0x80) is allowed, (principal, topic_filter, code)
    if allowed:
        sessions[principal].paho.unsubscribe(topic_filter)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(principal=st.sampled_from(PRINCIPALS), topic=st.sampled_from(TREE))
def test_publish_outcomes_agree_with_decide(sessions: dict[str, Client], principal: str, topic: str) -> None:
    """For random tree topics, a publish reaches the watcher exactly when decide() allows it."""
    groups = DEVICE_GROUPS.get(principal, ())
    allowed = acl.decide(ROLE[principal], principal, groups, "publish", topic).allowed
    payload = f"diff-{next(_marker)}".encode()
    sessions[principal].publish(topic, payload, qos=1)
    marker = payload + b"-marker"
    sessions["watcher"].publish(topics.device_cmd("zz-marker"), marker, qos=1)
    seen = [(m.topic, m.payload) for m in sessions["watcher"].wait_for(marker)]
    assert ((topic, payload) in seen) is allowed, (principal, topic)
