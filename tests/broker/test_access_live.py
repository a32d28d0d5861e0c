"""The same access table against both brokers, with real paho-mqtt clients over loopback.

Each case runs on the embedded amqtt broker (fleetbus plugins) and on a real Mosquitto configured by
``export-mosquitto`` from the same registry, and each expected outcome is also what
``broker.acl.decide`` says, so the three agree.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import time

import pytest

from broker import acl
from schemas import topics
from schemas.topics import DeviceStream
from tests.broker.conftest import (
    CONNECT_TIMEOUT,
    DEVICE_GROUPS,
    OPERATOR,
    READER,
    REFUSED,
    BrokerUnderTest,
    Client,
    connect_as,
)

SHA = "cd" * 32
ROLE = {"d1": "device", "d2": "device", OPERATOR: "operator", READER: "reader"}

SUBSCRIBE_CASES = [
    ("d1", topics.device_cmd("d1"), True),
    ("d1", topics.device_desired("d1"), True),
    ("d1", topics.group_cmd("g1"), True),
    ("d1", topics.group_desired("g1"), True),
    ("d1", topics.blob_filter(SHA), True),
    ("d1", topics.repair_filter("d1"), True),
    ("d1", topics.manifest("r1"), True),
    ("d1", topics.device_cmd("d2"), False),
    ("d1", topics.group_cmd("g2"), False),
    ("d1", "fleetbus/v1/cmd/grp/+", False),
    ("d1", topics.repair_filter("d2"), False),
    ("d1", "fleetbus/v1/repair/+/#", False),
    ("d1", topics.device_stream_filter(DeviceStream.STATE), False),
    ("d1", "fleetbus/v1/#", False),
    ("d1", "#", False),
    (OPERATOR, "fleetbus/v1/#", True),
    (OPERATOR, topics.device_stream_filter(DeviceStream.FETCH), True),
    (OPERATOR, "#", False),
    (READER, topics.device_stream_filter(), True),
    (READER, topics.aggregate_filter(), True),
    (READER, "fleetbus/v1/manifest/#", True),
    (READER, "fleetbus/v1/cmd/#", False),
    (READER, topics.device_desired("d1"), False),
]

PUBLISH_CASES = [
    ("d1", topics.device_stream("d1", DeviceStream.STATE), True),
    ("d1", topics.device_stream("d1", DeviceStream.HEALTH), True),
    ("d1", topics.device_stream("d2", DeviceStream.STATE), False),
    ("d1", topics.device_cmd("d2"), False),
    ("d1", topics.group_desired("g1"), False),
    ("d1", topics.blob(SHA, 0), False),
    ("d1", topics.aggregate(topics.AggregateScope.FLEET), False),
    (OPERATOR, topics.group_desired("g1"), True),
    (OPERATOR, topics.blob(SHA, 0), True),
    (OPERATOR, topics.device_stream("d1", DeviceStream.BIRTH), False),
    (READER, topics.aggregate(topics.AggregateScope.FLEET), False),
    (READER, topics.device_stream("d1", DeviceStream.STATE), False),
]
_payloads = itertools.count()


def _groups(principal: str) -> tuple[str, ...]:
    return DEVICE_GROUPS.get(principal, ())


@pytest.mark.parametrize(("principal", "topic_filter", "allowed"), SUBSCRIBE_CASES)
def test_subscribe_decisions(
    broker_under_test: BrokerUnderTest,
    clients: list[Client],
    principal: str,
    topic_filter: str,
    allowed: bool,
) -> None:
    """An allowed subscription is granted at its QoS; a denied one gets SUBACK 0x80, on both brokers."""
    assert (
        acl.decide(ROLE[principal], principal, _groups(principal), "subscribe", topic_filter).allowed
        is allowed
    )
    b = broker_under_test
    client = connect_as(clients, b.port, b.creds, principal, client_id=f"{principal}")
    code = client.subscribe(topic_filter, qos=1)
    assert code == (1 if allowed else 0x80)


@pytest.mark.parametrize(("principal", "topic", "allowed"), PUBLISH_CASES)
def test_publish_decisions(
    broker_under_test: BrokerUnderTest, clients: list[Client], principal: str, topic: str, allowed: bool
) -> None:
    """An allowed publish reaches a subscriber; a denied one never does (amqtt still PUBACKs it)."""
    assert acl.decide(ROLE[principal], principal, _groups(principal), "publish", topic).allowed is allowed
    b = broker_under_test
    watcher = connect_as(clients, b.port, b.creds, OPERATOR, client_id="watcher")
    assert watcher.subscribe("fleetbus/v1/#") == 1
    sender = connect_as(clients, b.port, b.creds, principal, client_id=principal)
    payload = f"case-{next(_payloads)}".encode()
    sender.publish(topic, payload, qos=1)
    # A marker published after the case shows that everything sent before it has been routed.
    marker = payload + b"-marker"
    if ROLE[principal] == "device":
        sender.publish(topics.device_stream(principal, DeviceStream.HEALTH), marker, qos=1)
    elif ROLE[principal] == "operator":
        sender.publish(topics.device_cmd("d1"), marker, qos=1)
    else:
        watcher.publish(topics.device_cmd("d1"), marker, qos=1)
    seen = [(m.topic, m.payload) for m in watcher.wait_for(marker)]
    assert ((topic, payload) in seen) is allowed


def test_anonymous_clients_are_refused(broker_under_test: BrokerUnderTest, clients: list[Client]) -> None:
    """A client without a username is refused at CONNACK."""
    client = Client(broker_under_test.port, "anon", None, None)
    clients.append(client)
    assert client.connect() in REFUSED


@pytest.mark.parametrize("principal", ["d1", OPERATOR, "nobody"])
def test_wrong_passwords_are_refused(
    broker_under_test: BrokerUnderTest, clients: list[Client], principal: str
) -> None:
    """A wrong password or an unknown username is refused with a non-zero CONNACK."""
    client = Client(broker_under_test.port, principal, principal, "not-the-password")
    clients.append(client)
    assert client.connect() in REFUSED


def test_devices_receive_only_what_they_subscribed_and_may(
    broker_under_test: BrokerUnderTest, clients: list[Client]
) -> None:
    """A group command reaches the device in that group and not the device in another group."""
    b = broker_under_test
    d1 = connect_as(clients, b.port, b.creds, "d1")
    d2 = connect_as(clients, b.port, b.creds, "d2")
    assert d1.subscribe(topics.group_cmd("g1")) == 1
    assert d2.subscribe(topics.group_cmd("g2")) == 1
    ops = connect_as(clients, b.port, b.creds, OPERATOR)
    ops.publish(topics.group_cmd("g1"), b"to-g1")
    ops.publish(topics.group_cmd("g2"), b"to-g2")
    assert [m.payload for m in d1.wait_for(b"to-g1")] == [b"to-g1"]
    assert [m.payload for m in d2.wait_for(b"to-g2")] == [b"to-g2"]


@pytest.mark.parametrize("client_id", ["not-d1", "d2"])
def test_a_device_connects_only_with_its_own_client_id(
    broker_under_test: BrokerUnderTest, clients: list[Client], client_id: str
) -> None:
    """A device's credentials are refused under any client id but its own (so it cannot take over d2)."""
    client = Client(broker_under_test.port, client_id, "d1", broker_under_test.creds.passwords["d1"])
    clients.append(client)
    assert client.connect() in REFUSED


def test_a_will_on_a_forbidden_topic_is_never_published(
    broker_under_test: BrokerUnderTest, clients: list[Client]
) -> None:
    """A device cannot plant a command as its Will: it is refused at CONNECT or the Will is dropped."""
    b = broker_under_test
    watcher = connect_as(clients, b.port, b.creds, OPERATOR, client_id="watcher")
    assert watcher.subscribe("fleetbus/v1/#") == 1
    device = Client(b.port, "d1", "d1", b.creds.passwords["d1"])
    device.paho.will_set(topics.group_cmd("g1"), b"forged-will", qos=1)
    clients.append(device)
    if device.connect() == 0:
        device.paho.loop_stop()
        sock = device.paho.socket()
        assert sock is not None
        sock.close()  # an abrupt close: a broker would now publish the Will
    watcher.publish(topics.device_cmd("d2"), b"marker")
    assert b"forged-will" not in [m.payload for m in watcher.wait_for(b"marker")]


def test_readers_split_telemetry_with_a_shared_subscription(
    broker_under_test: BrokerUnderTest, clients: list[Client]
) -> None:
    """Two readers on $share/agg/... each get part of the telemetry and together all of it, once."""
    b = broker_under_test
    shared = topics.shared("agg", topics.device_stream_filter(DeviceStream.HEALTH))
    readers = [connect_as(clients, b.port, b.creds, READER, client_id=f"agg-{i}") for i in range(2)]
    for r in readers:
        assert r.subscribe(shared) == 1
    device = connect_as(clients, b.port, b.creds, "d1")
    sent = [f"h{i}".encode() for i in range(40)]
    for payload in sent:
        device.publish(topics.device_stream("d1", DeviceStream.HEALTH), payload)
    per_reader: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while sum(map(len, per_reader)) < len(sent) and time.monotonic() < deadline:
        for i, r in enumerate(readers):
            with contextlib.suppress(queue.Empty):
                per_reader[i].append(bytes(r.messages.get(timeout=0.05).payload))
    assert sorted(per_reader[0] + per_reader[1]) == sorted(sent)
    assert per_reader[0]
    assert per_reader[1]
