"""The fleetbus amqtt plugins, live: revocation, denial logging and counters, client-id and Will rules.

Each test runs on stock amqtt with only our plugins (what the plugins do on their own) and on
fleetbus's embedded broker (what users run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.plugins import COUNTERS, plugin_config
from broker.registry import Registry
from schemas import topics
from schemas.topics import DeviceStream
from tests.broker.conftest import (
    CONNECT_TIMEOUT,
    OPERATOR,
    READER,
    REFUSED,
    Client,
    Credentials,
    amqtt_config,
    connect_as,
    make_registry,
    start_amqtt,
    start_stock_amqtt,
)
from tests.helpers import free_port


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    return make_registry(tmp_path)


@pytest.fixture(params=["stock", "fleetbus"])
def amqtt_port(request: pytest.FixtureRequest, creds: Credentials) -> Iterator[int]:
    COUNTERS.reset()
    start = start_stock_amqtt if request.param == "stock" else start_amqtt
    with start(creds.registry) as port:
        yield port


def test_revoked_device_is_disconnected_at_once_and_refused(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """Revoking a connected device (from another process's Registry) drops it without a broker restart."""
    device = connect_as(clients, amqtt_port, creds, "d1")
    assert device.subscribe(topics.device_cmd("d1")) == 1
    other = connect_as(clients, amqtt_port, creds, "d2")
    Registry.load(creds.registry).revoke("d1")
    assert device.disconnected.wait(CONNECT_TIMEOUT)
    assert COUNTERS.revoked_disconnects == 1
    again = Client(amqtt_port, "d1", "d1", creds.passwords["d1"])
    clients.append(again)
    assert again.connect() in REFUSED
    assert COUNTERS.revoked_refused == 1
    assert not other.disconnected.is_set()
    assert other.subscribe(topics.device_cmd("d2")) == 1


def test_rotated_password_replaces_the_old_one_live(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """After rotate, the old password is refused and the new one accepted, without a restart."""
    connect_as(clients, amqtt_port, creds, "d2").close()
    new = Registry.load(creds.registry).rotate("d2")
    old_client = Client(amqtt_port, "d2", "d2", creds.passwords["d2"])
    clients.append(old_client)
    assert old_client.connect() in REFUSED
    new_client = Client(amqtt_port, "d2", "d2", new)
    clients.append(new_client)
    assert new_client.connect() == 0


def test_denied_publish_is_acked_but_logged_and_counted(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """amqtt PUBACKs a denied publish; we log it with client id and topic and count it."""
    watcher = connect_as(clients, amqtt_port, creds, OPERATOR, client_id="watcher")
    assert watcher.subscribe("fleetbus/v1/#") == 1
    device = connect_as(clients, amqtt_port, creds, "d1")
    forged = topics.group_cmd("g1")
    with capture_logs() as logs:
        device.publish(forged, b"forged", qos=1)  # returns only once the PUBACK came back
        # The broker checks publishes in order after acking them: once this one is routed, so was that.
        device.publish(topics.device_stream("d1", DeviceStream.HEALTH), b"ok", qos=1)
        assert b"forged" not in [m.payload for m in watcher.wait_for(b"ok")]
    assert COUNTERS.publish_denied == 1
    denied = [e for e in logs if e["event"] == "publish_denied"]
    assert denied
    assert (denied[0]["client_id"], denied[0]["topic"]) == ("d1", forged)


def test_denied_subscribe_gets_0x80_and_is_logged_and_counted(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """A denied SUBSCRIBE gets return code 0x80, a log line with client id and filter, and a count."""
    reader = connect_as(clients, amqtt_port, creds, READER, client_id="svc-1")
    with capture_logs() as logs:
        assert reader.subscribe("fleetbus/v1/cmd/#") == 0x80
        assert reader.subscribe(topics.aggregate_filter()) == 1
    assert COUNTERS.subscribe_denied == 1
    denied = [e for e in logs if e["event"] == "subscribe_denied"]
    assert (denied[0]["client_id"], denied[0]["topic"]) == ("svc-1", "fleetbus/v1/cmd/#")


@pytest.mark.parametrize(
    ("principal", "client_id"),
    [("d1", "not-d1"), ("d1", "d2"), (OPERATOR, "d2"), (READER, "d1")],
)
def test_client_ids_of_devices_cannot_be_borrowed(
    amqtt_port: int, creds: Credentials, clients: list[Client], principal: str, client_id: str
) -> None:
    """A device connects only as itself, and nobody else may use a device's id as client id."""
    client = Client(amqtt_port, client_id, principal, creds.passwords[principal])
    clients.append(client)
    assert client.connect() in REFUSED
    assert COUNTERS.client_id_refused == 1


def test_a_persistent_session_cannot_be_resumed_by_another_principal(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """A reader reusing an operator's client id never inherits its subscriptions or queued messages."""
    # Stock amqtt would hand the stored session over, so the plugin refuses the CONNECT; fleetbus's
    # broker gives the other user a fresh session instead. Either way nothing of the owner's leaks.
    owner = connect_as(clients, amqtt_port, creds, OPERATOR, client_id="svc-shared", clean_session=False)
    assert owner.subscribe("fleetbus/v1/#") == 1
    owner.close()
    intruder = Client(amqtt_port, "svc-shared", READER, creds.passwords[READER], clean_session=False)
    clients.append(intruder)
    if intruder.connect() in REFUSED:
        return
    assert intruder.subscribe(topics.aggregate_filter()) == 1
    ops = connect_as(clients, amqtt_port, creds, OPERATOR, client_id="ops-2")
    ops.publish(topics.device_cmd("d1"), b"for-the-owner")
    ops.publish(topics.aggregate(topics.AggregateScope.FLEET), b"marker")
    assert [m.payload for m in intruder.wait_for(b"marker")] == [b"marker"]


def test_will_on_a_forbidden_topic_is_refused_at_connect_on_amqtt(
    amqtt_port: int, creds: Credentials, clients: list[Client]
) -> None:
    """amqtt publishes Wills unchecked, so a device whose Will targets a command topic is refused."""
    client = Client(amqtt_port, "d1", "d1", creds.passwords["d1"])
    client.paho.will_set(topics.group_cmd("g1"), b"forged", qos=1)
    clients.append(client)
    assert client.connect() in REFUSED
    assert COUNTERS.will_denied == 1
    ok = Client(amqtt_port, "d1", "d1", creds.passwords["d1"])
    ok.paho.will_set(topics.device_stream("d1", DeviceStream.DEATH), b"dead", qos=1, retain=True)
    clients.append(ok)
    assert ok.connect() == 0


@pytest.mark.parametrize("kind", ["stock", "fleetbus"])
def test_allow_anonymous_gives_reader_rights_only(
    creds: Credentials, clients: list[Client], kind: str
) -> None:
    """With allow_anonymous, a client without username may read telemetry but publish nothing."""
    if kind == "stock":
        port = free_port()
        config = amqtt_config(port, creds.registry)
        config["plugins"] = plugin_config(creds.registry, allow_anonymous=True)
        broker = start_stock_amqtt(creds.registry, port=port, config=config)
    else:
        broker = start_amqtt(creds.registry, allow_anonymous=True)
    with broker as bound:
        anon = Client(bound, "anon-1", None, None)
        clients.append(anon)
        assert anon.connect() == 0
        assert anon.subscribe(topics.device_stream_filter()) == 1
        assert anon.subscribe(topics.device_cmd("d1")) == 0x80
        device = connect_as(clients, bound, creds, "d1")
        anon.publish(topics.device_stream("d1", DeviceStream.STATE), b"anon-forged")
        device.publish(topics.device_stream("d1", DeviceStream.HEALTH), b"marker")
        assert b"anon-forged" not in [m.payload for m in anon.wait_for(b"marker")]


def test_authenticated_persistent_session_survives_a_restart_under_the_acl(
    tmp_path: Path, creds: Credentials, clients: list[Client]
) -> None:
    """A device's stored session and QoS 1 queue survive a restart, and the ACL still knows whose it is."""
    # The restored session carries only a username; the ACL looks the principal up by it.
    data = tmp_path / "data"
    with start_amqtt(creds.registry, data_dir=data) as port:
        d1 = connect_as(clients, port, creds, "d1", clean_session=False)
        assert d1.subscribe(topics.device_cmd("d1")) == 1
        d1.close()
    with start_amqtt(creds.registry, data_dir=data) as port:
        ops = connect_as(clients, port, creds, OPERATOR)
        ops.publish(topics.device_cmd("d1"), b"queued-for-d1")
    with start_amqtt(creds.registry, data_dir=data) as port:
        d1 = connect_as(clients, port, creds, "d1", clean_session=False)
        assert [m.payload for m in d1.wait_for(b"queued-for-d1")] == [b"queued-for-d1"]
