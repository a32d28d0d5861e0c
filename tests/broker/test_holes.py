"""Each amqtt 0.12.1 hole closed by broker/hardening.py, shown with real paho clients over loopback.

Every behaviour has two tests with the same body: ``test_<behaviour>`` runs it against the hardened
embedded broker and asserts the correct outcome; ``test_stock_amqtt_<hole>`` runs it against an
unmodified amqtt (tests/helpers.stock_amqtt) and asserts the hole is there, which proves the first
test can fail. Absence of a message is observed with a marker round trip, not with a sleep.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.testing import (
    PINGREQ,
    PahoClient,
    RawClient,
    ack_packet,
    connect_packet,
    embedded_broker,
    publish_packet,
    subscribe_packet,
    wait_offline,
)
from tests.helpers import stock_amqtt

Start = Callable[[], contextlib.AbstractContextManager[int]]


@contextlib.contextmanager
def hardened(**settings: object) -> Iterator[int]:
    with embedded_broker(**settings) as handle:  # type: ignore[arg-type]
        yield handle.port


@contextlib.contextmanager
def stock() -> Iterator[int]:
    with stock_amqtt() as port:
        yield port


# ------------------------------------------------------------------ retained leak


def retained_leaked_to_unsubscribed(port: int) -> list[str]:
    """Topics a client that subscribed to nothing of them receives right after connecting."""
    with (
        PahoClient(port, "watcher", subscribe=[("fleetbus/v1/dev/+/state", 1)]),
        PahoClient(port, "d1") as d1,
    ):
        d1.publish("fleetbus/v1/dev/d1/state", b"secret", qos=1, retain=True)
        with PahoClient(port, "stranger") as stranger:
            return [m.topic for m in stranger.ping_self("stranger/marker")]


def test_retained_reaches_only_matching_subscribers() -> None:
    """A client that subscribed to no matching filter gets no retained message on CONNECT."""
    with hardened() as port:
        assert retained_leaked_to_unsubscribed(port) == []


def test_stock_amqtt_leaks_retained() -> None:
    """Stock amqtt sends another device's retained message to a client that never subscribed."""
    with stock() as port:
        assert "fleetbus/v1/dev/d1/state" in retained_leaked_to_unsubscribed(port)


def retained_received_when_acl_denies(port: int) -> list[str]:
    with PahoClient(port, "d1") as d1:
        d1.publish("fleetbus/v1/dev/d1/state", b"secret", qos=1, retain=True)
        with PahoClient(port, "reader") as reader:
            reader.subscribe([("fleetbus/v1/dev/#", 1)])
            return [m.topic for m in reader.ping_self("reader/marker")]


def test_retained_messages_pass_the_receive_acl() -> None:
    """A retained message the topic plugin denies (Action.RECEIVE) is not sent to a new subscriber."""
    plugin = {"broker.testing.DenyReceivePlugin": {"deny_receive": ["fleetbus/v1/dev/+/state"]}}
    with embedded_broker(extra_plugins=plugin) as handle:
        assert retained_received_when_acl_denies(handle.port) == []
        assert handle.stats["receive_denied"] >= 1


# ------------------------------------------------------------------ QoS downgrade


def delivered_qos(port: int) -> list[tuple[int, int, int]]:
    """(publish QoS, subscription QoS, delivered QoS) for each combination."""
    seen = []
    for sub_qos in (0, 1, 2):
        with (
            PahoClient(port, f"s{sub_qos}", subscribe=[(f"q/{sub_qos}", sub_qos)]) as sub,
            PahoClient(port, f"p{sub_qos}") as pub,
        ):
            for pub_qos in (0, 1, 2):
                pub.publish(f"q/{sub_qos}", b"x", qos=pub_qos)
                seen.append((pub_qos, sub_qos, sub.get().qos))
    return seen


def test_delivered_qos_is_the_minimum() -> None:
    """Delivered QoS is min(publish QoS, subscription QoS) [MQTT-3.3.5-1]."""
    with hardened() as port:
        assert all(got == min(p, s) for p, s, got in delivered_qos(port))


def test_stock_amqtt_upgrades_qos() -> None:
    """Stock amqtt delivers at the subscription's QoS even when the publish had a lower one."""
    with stock() as port:
        assert (0, 1, 1) in delivered_qos(port)


def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() -> None:
    """Two matching filters of one client give one copy at the higher granted QoS [MQTT-3.3.5-1]."""
    with hardened() as port, PahoClient(port, "o", subscribe=[("a/#", 0), ("a/+", 1)]) as sub:
        with PahoClient(port, "p") as pub:
            pub.publish("a/b", b"x", qos=1)
        got = sub.ping_self("o/marker")
        assert [(m.topic, m.qos) for m in got] == [("a/b", 1)]


# ------------------------------------------------------------------ persistent sessions


def queued_while_offline(port: int) -> list[tuple[bytes, bool]]:
    """(payload, retain flag) of QoS 1 messages published while a persistent session was offline."""
    device = PahoClient(port, "dev-7", clean=False, username="dev-7", subscribe=[("cmd/dev-7", 1)])
    device.close()
    with PahoClient(port, "ops", username="ops") as ops:
        for i in range(3):
            ops.publish("cmd/dev-7", f"c{i}".encode(), qos=1)
    with PahoClient(port, "dev-7", clean=False, username="dev-7") as device:
        got = []
        with contextlib.suppress(queue.Empty):
            for _ in range(3):
                message = device.get(timeout=3)
                got.append((message.payload, message.retain))
        return got


def test_persistent_session_queues_qos1_while_offline() -> None:
    """A clean_session=0 client gets the QoS 1 messages sent while it was away, with retain=0."""
    with hardened() as port:
        assert queued_while_offline(port) == [(b"c0", False), (b"c1", False), (b"c2", False)]


def test_stock_amqtt_drops_offline_queue() -> None:
    """Stock amqtt (anonymous auth) purges the persistent session, so nothing is queued."""
    with stock() as port:
        assert queued_while_offline(port) != [(b"c0", False), (b"c1", False), (b"c2", False)]


def test_stock_amqtt_queued_messages_arrive_retained() -> None:
    """Stock amqtt, when it does queue (a non-anonymous session), sends queued messages with retain=1."""
    from tests.helpers import free_port

    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
    }
    with stock_amqtt(port, config):
        got = queued_while_offline(port)
    assert got
    assert all(retain for _, retain in got)


def test_persistent_session_and_queue_survive_restart(tmp_path: Path) -> None:
    """Subscriptions and queued QoS 1 messages of a persistent session survive a broker restart."""
    with embedded_broker(data_dir=tmp_path) as handle:
        port = handle.port
        PahoClient(port, "dev-8", clean=False, username="dev-8", subscribe=[("cmd/dev-8", 1)]).close()
        wait_offline(handle, "dev-8")
        with PahoClient(port, "ops") as ops:
            ops.publish("cmd/dev-8", b"before", qos=1)
    with hardened(data_dir=tmp_path) as port:
        with PahoClient(port, "ops") as ops:
            ops.publish("cmd/dev-8", b"after", qos=1)
        with PahoClient(port, "dev-8", clean=False, username="dev-8") as device:
            assert device.session_present
            got = [device.get(), device.get()]
    assert sorted((m.payload, m.retain) for m in got) == [(b"after", False), (b"before", False)]


def test_restored_session_of_another_user_is_not_handed_over(tmp_path: Path) -> None:
    """A stored session belongs to its user: the same client id with another username starts fresh."""
    with hardened(data_dir=tmp_path) as port:
        PahoClient(port, "dev-9", clean=False, username="alice", subscribe=[("cmd/dev-9", 1)]).close()
        with PahoClient(port, "ops") as ops:
            ops.publish("cmd/dev-9", b"for alice", qos=1)
        with PahoClient(port, "dev-9", clean=False, username="mallory") as intruder:
            assert not intruder.session_present
            assert intruder.ping_self("dev-9/marker") == []


def test_stock_amqtt_forgets_everything_on_restart() -> None:
    """Stock amqtt without the persistence plugin loses retained messages on restart."""
    from tests.helpers import free_port

    port = free_port()
    with stock_amqtt(port), PahoClient(port, "p") as pub:
        pub.publish("r/x", b"kept?", qos=1, retain=True)
    with stock_amqtt(port), PahoClient(port, "s") as sub:
        sub.subscribe([("r/#", 1)])
        assert sub.ping_self("s/marker") == []


def test_retained_survives_clean_restart(tmp_path: Path) -> None:
    """A retained message is delivered by a broker restarted on the same data_dir."""
    with hardened(data_dir=tmp_path) as port, PahoClient(port, "p") as pub:
        pub.publish("fleetbus/v1/desired/dev/d1", b"deploy", qos=1, retain=True)
        pub.publish("fleetbus/v1/desired/dev/d2", b"gone", qos=1, retain=True)
        pub.publish("fleetbus/v1/desired/dev/d2", b"", qos=1, retain=True)
    with hardened(data_dir=tmp_path) as port, PahoClient(port, "s") as sub:
        sub.subscribe([("fleetbus/v1/desired/dev/+", 1)])
        got = sub.ping_self("s/marker")
    assert [(m.topic, m.payload, m.retain) for m in got] == [("fleetbus/v1/desired/dev/d1", b"deploy", True)]


# ------------------------------------------------------------------ keepalive


def will_after_silence(port: int, wait: float) -> bytes | None:
    """The Will of a raw client that connects with keepalive 1 and then says nothing."""
    with PahoClient(port, "watch", subscribe=[("fleetbus/v1/dev/k1/death", 1)]) as watcher:
        raw = RawClient(port)
        assert raw.connect("k1", keepalive=1, will=("fleetbus/v1/dev/k1/death", b"dead", 1, False)) == 0
        try:
            return watcher.get(timeout=wait).payload
        except queue.Empty:
            return None
        finally:
            raw.close()


def test_silent_client_is_dropped_and_its_will_published() -> None:
    """A client silent for 1.5 x keepalive is disconnected and its Will published [MQTT-3.1.2-24]."""
    with embedded_broker() as handle:
        assert will_after_silence(handle.port, wait=10) == b"dead"
        assert handle.stats["keepalive_timeout"] == 1


def test_stock_amqtt_never_enforces_keepalive() -> None:
    """Stock amqtt keeps a silent client forever: its Will never fires (checked for 4 s = 4 x keepalive)."""
    with stock() as port:
        assert will_after_silence(port, wait=4) is None


def test_half_packet_does_not_hold_the_keepalive_open() -> None:
    """A client that sends half a packet and stalls is dropped on keepalive like a silent one."""
    with embedded_broker() as handle, PahoClient(handle.port, "w", subscribe=[("w/k2", 1)]) as watcher:
        raw = RawClient(handle.port)
        assert raw.connect("k2", keepalive=1, will=("w/k2", b"gone", 1, False)) == 0
        raw.send(publish_packet("a/b", b"x" * 100)[:20])
        assert watcher.get(timeout=10).payload == b"gone"
        assert raw.closed_by_broker()


# ------------------------------------------------------------------ in-flight redelivery


def redelivered_after_reconnect(port: int, qos: int = 1) -> tuple[bytes, bool] | None:
    """(payload, DUP) of the unacknowledged PUBLISH resent after a persistent client reconnects."""
    raw = RawClient(port)
    assert raw.connect("inflight", clean=False) == 0
    raw.send(subscribe_packet(1, [("chunks/x", qos)]))
    assert raw.read() is not None  # SUBACK
    with PahoClient(port, "pub") as pub:
        pub.publish("chunks/x", b"chunk-0", qos=qos)
    first = raw.read()
    assert first is not None
    assert first.publish[1] == b"chunk-0"
    raw.close()  # no PUBACK
    again = RawClient(port)
    try:
        assert again.connect("inflight", clean=False) == 0
        packet = again.read(timeout=3)
        if packet is None or packet.packet_type != 3:
            return None
        _, payload, got_qos, _, dup, packet_id = packet.publish
        assert packet_id is not None
        assert got_qos == qos
        again.send(ack_packet(4 if qos == 1 else 5, packet_id))
        return payload, dup
    except TimeoutError:
        return None
    finally:
        again.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_inflight_message_redelivered_with_dup(qos: int) -> None:
    """An unacknowledged QoS 1/2 message is resent with DUP=1 when the session reconnects [MQTT-4.4.0-1]."""
    with hardened() as port:
        assert redelivered_after_reconnect(port, qos) == (b"chunk-0", True)


def test_stock_amqtt_loses_inflight_messages() -> None:
    """Stock amqtt does not resend an unacknowledged QoS 1 message after a reconnect."""
    with stock() as port:
        assert redelivered_after_reconnect(port) is None


# ------------------------------------------------------------------ topic validation


@pytest.mark.parametrize(
    "bad",
    [
        publish_packet("", b"x"),
        publish_packet("a/+/b", b"x"),
        publish_packet("a/#", b"x", qos=1),
        subscribe_packet(1, [("", 0)]),
        subscribe_packet(1, [("a/#/b", 1)]),
        subscribe_packet(1, [("a/b+", 0)]),
    ],
    ids=["empty-topic", "plus-in-topic", "hash-in-topic", "empty-filter", "hash-not-last", "plus-in-level"],
)
def test_invalid_topics_close_the_connection(bad: bytes) -> None:
    """Empty topics, empty filters and misplaced wildcards are protocol violations: the connection closes."""
    with embedded_broker() as handle:
        with RawClient(handle.port) as raw:
            assert raw.connect("v") == 0
            raw.send(bad)
            assert raw.closed_by_broker()
        assert handle.stats["malformed_packet"] == 1


def accepts_empty_topics(port: int) -> tuple[bool, int | None]:
    """(connection still open after PUBLISH to "", SUBACK code for the filter "")."""
    with RawClient(port) as raw:
        assert raw.connect("v") == 0
        raw.send(subscribe_packet(1, [("", 0)]))
        suback = raw.read(timeout=3)
        code = suback.body[2] if suback is not None and suback.packet_type == 9 else None
    with RawClient(port) as raw:
        assert raw.connect("w") == 0
        raw.send(publish_packet("", b"x", qos=1))
        reply = raw.read(timeout=3)
        open_after = reply is not None
    return open_after, code


def test_stock_amqtt_accepts_empty_filter() -> None:
    """Stock amqtt grants a subscription to the empty topic filter."""
    with stock() as port:
        _, code = accepts_empty_topics(port)
        assert code == 0


# ------------------------------------------------------------------ payload limit


def oversized_delivered(port: int, size: int) -> bool:
    with PahoClient(port, "big-sub", subscribe=[("big/x", 1)]) as sub:
        raw = RawClient(port)
        assert raw.connect("big-pub") == 0
        raw.send(publish_packet("big/x", b"\0" * size, qos=1, packet_id=7))
        with contextlib.suppress(TimeoutError):
            raw.read(timeout=10)  # PUBACK, or None when the broker closes the connection
        raw.close()
        return any(m.topic == "big/x" for m in sub.ping_self("big-sub/marker"))


def test_payload_over_the_limit_is_refused() -> None:
    """A PUBLISH over max_payload_bytes closes the connection and reaches nobody; one at the limit passes."""
    limit = 64 * 1024
    with embedded_broker(max_payload_bytes=limit) as handle:
        assert not oversized_delivered(handle.port, limit + 1)
        assert handle.stats["packet_too_large"] == 1
        assert oversized_delivered(handle.port, limit)


def test_oversized_remaining_length_is_refused_before_the_body() -> None:
    """A header announcing 200 MB is refused at once: the broker does not wait for (or buffer) the body."""
    with embedded_broker(max_payload_bytes=64 * 1024) as handle, RawClient(handle.port) as raw:
        assert raw.connect("huge") == 0
        raw.send(bytes([0x30]) + bytes([0xFF, 0xFF, 0xFF, 0x5F]))
        assert raw.closed_by_broker()
        assert handle.stats["packet_too_large"] == 1


def test_stock_amqtt_has_no_size_limit() -> None:
    """Stock amqtt forwards a 2 MiB payload (over our default limit's 1 MiB codec bound)."""
    with stock() as port:
        assert oversized_delivered(port, 2 * 1024 * 1024)


def test_default_limit_admits_the_largest_chunk() -> None:
    """The default max_payload_bytes fits a 256 KiB chunk message plus the codec's headroom."""
    from broker.server import DEFAULT_MAX_PAYLOAD
    from schemas.codec import DEFAULT_MAX_BYTES
    from schemas.messages import MAX_CHUNK_SIZE

    assert DEFAULT_MAX_PAYLOAD > DEFAULT_MAX_BYTES > MAX_CHUNK_SIZE


# ------------------------------------------------------------------ CONNECT rules


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (connect_packet("x", level=5), 0x01),
        (connect_packet("x", protocol="MQIsdp", level=3), 0x01),
        (connect_packet("", clean=False), 0x02),
    ],
    ids=["mqtt5", "mqtt31", "empty-id-persistent"],
)
def test_connect_refused_with_the_right_code(packet: bytes, code: int) -> None:
    """Unsupported protocol levels get CONNACK 0x01, an empty id with clean_session=0 gets 0x02."""
    with embedded_broker() as handle, RawClient(handle.port) as raw:
        raw.send(packet)
        reply = raw.read()
        assert reply is not None
        assert (reply.packet_type, reply.body) == (2, bytes([0, code]))
        assert raw.closed_by_broker()


@pytest.mark.parametrize(
    "packet",
    [
        connect_packet("x", extra_flags=0x01),
        connect_packet("x", will=("w/t", b"m", 3, False)),
        connect_packet("x", extra_flags=0x40),
        connect_packet("x", will=("w/+", b"m", 0, False)),
        connect_packet("x", protocol="HTTP"),
        connect_packet(b"\xff\xfe"),
        connect_packet("x")[:-1],
        publish_packet("a", b"x"),
        bytes([0x11]) + connect_packet("x")[1:],
    ],
    ids=[
        "reserved-flag",
        "will-qos-3",
        "password-without-user",
        "wildcard-will",
        "bad-protocol-name",
        "client-id-not-utf8",
        "truncated",
        "publish-first",
        "connect-flags-bits",
    ],
)
def test_malformed_connect_is_closed_without_connack(packet: bytes) -> None:
    """A malformed CONNECT, or a first packet that is not CONNECT, closes the connection [MQTT-3.1.0-1]."""
    with embedded_broker() as handle, RawClient(handle.port) as raw:
        raw.send(packet)
        if packet == connect_packet("x")[:-1]:
            raw.sock.shutdown(1)  # the truncated packet ends at EOF
        assert raw.read() is None


def test_second_connect_closes_the_connection() -> None:
    """A second CONNECT on one connection is a protocol violation [MQTT-3.1.0-2]."""
    with embedded_broker() as handle, RawClient(handle.port) as raw:
        assert raw.connect("twice") == 0
        raw.send(connect_packet("twice"))
        assert raw.closed_by_broker()


def test_connection_without_connect_is_closed() -> None:
    """A socket that never sends CONNECT is closed after connect_timeout."""
    with embedded_broker(connect_timeout=0.5) as handle, RawClient(handle.port) as raw:
        assert raw.read(timeout=10) is None
        assert handle.stats["connect_timeout"] == 1


def test_takeover_closes_the_older_connection() -> None:
    """A second connection with the same client id closes the first [MQTT-3.1.4-2]."""
    with embedded_broker() as handle, RawClient(handle.port) as first:
        assert first.connect("same") == 0
        with RawClient(handle.port) as second:
            assert second.connect("same") == 0
            assert first.closed_by_broker()
            second.send(subscribe_packet(3, [("x", 0)]))
            reply = second.read()
            assert reply is not None
            assert reply.packet_type == 9


def test_qos2_is_delivered_once_even_if_repeated() -> None:
    """A QoS 2 PUBLISH sent twice before PUBREL is delivered once, and every PUBREL gets a PUBCOMP."""
    with embedded_broker() as handle, PahoClient(handle.port, "q2", subscribe=[("q2/t", 2)]) as sub:
        with RawClient(handle.port) as raw:
            assert raw.connect("q2pub") == 0
            raw.send(publish_packet("q2/t", b"once", qos=2, packet_id=5))
            raw.send(publish_packet("q2/t", b"once", qos=2, packet_id=5, dup=True))
            assert [raw.read().packet_type, raw.read().packet_type] == [5, 5]  # type: ignore[union-attr]
            raw.send(ack_packet(6, 5))
            raw.send(ack_packet(6, 9))  # unknown id
            assert [raw.read().body, raw.read().body] == [b"\x00\x05", b"\x00\x09"]  # type: ignore[union-attr]
        got = sub.ping_self("q2/marker")
        assert [m.payload for m in got] == [b"once"]


# ------------------------------------------------------------------ connection scale


def connect_fleet(port: int, n: int) -> None:
    """n raw clients, each connected with one subscription of its own (kept open while counting)."""
    clients = []
    try:
        for i in range(n):
            raw = RawClient(port)
            clients.append(raw)
            raw.send(connect_packet(f"c{i}") + subscribe_packet(1, [(f"fleetbus/v1/cmd/dev/c{i}", 1)]))
            assert raw.read() is not None  # CONNACK
            assert raw.read() is not None  # SUBACK
    finally:
        for raw in clients:
            raw.close()


class Calls:
    """Counts calls of a method patched on a class, whatever thread the broker runs in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        self.count = 0
        original = getattr(cls, name)

        def counting(*args: object, **kwargs: object) -> object:
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counting)


FLEET = 300


def test_connecting_costs_no_scan_of_other_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 clients with one subscription each: no per-CONNECT filter scan, no subscription-table repr."""
    from amqtt.session import Session

    from broker.hardening import HardenedBroker

    retained_lookups = Calls(monkeypatch, HardenedBroker, "_publish_retained_messages_for_subscription")
    reprs = Calls(monkeypatch, Session, "__repr__")
    with hardened() as port:
        connect_fleet(port, FLEET)
    assert retained_lookups.count == FLEET  # one per SUBSCRIBE, none per CONNECT
    assert reprs.count == 0


def test_stock_amqtt_connect_scales_quadratically(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock amqtt scans every existing filter on each CONNECT and reprs the whole table on each SUBSCRIBE."""
    from amqtt.broker import Broker
    from amqtt.session import Session

    retained_lookups = Calls(monkeypatch, Broker, "_publish_retained_messages_for_subscription")
    reprs = Calls(monkeypatch, Session, "__repr__")
    with stock() as port:
        connect_fleet(port, FLEET)
    pairs = FLEET * (FLEET - 1) // 2
    assert retained_lookups.count >= pairs
    assert reprs.count >= pairs


# ------------------------------------------------------------------ shared subscriptions


def shared_split(port: int, n: int = 20) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Payloads received by two members of $share/agg/tele/# and by one ordinary subscriber."""
    with (
        PahoClient(port, "agg-1", subscribe=[("$share/agg/tele/#", 1)]) as one,
        PahoClient(port, "agg-2", subscribe=[("$share/agg/tele/#", 1)]) as two,
        PahoClient(port, "all", subscribe=[("tele/#", 1)]) as everything,
    ):
        with PahoClient(port, "dev") as dev:
            for i in range(n):
                dev.publish(f"tele/d{i % 3}", str(i).encode(), qos=1)
        return [
            [m.payload for m in client.ping_self(f"{client.client._client_id.decode()}/marker")]
            for client in (one, two, everything)
        ]  # type: ignore[return-value]


def test_shared_subscription_splits_messages_between_members() -> None:
    """Each message on a $share/{group}/{filter} goes to exactly one member, round-robin."""
    with hardened() as port:
        one, two, everything = shared_split(port)
    expected = sorted(str(i).encode() for i in range(20))
    assert sorted(one + two) == expected
    assert len(one) == len(two) == 10
    assert sorted(everything) == expected


def test_stock_amqtt_treats_share_as_a_literal_topic() -> None:
    """Stock amqtt has no shared subscriptions: members of $share/... receive nothing."""
    with stock() as port:
        one, two, everything = shared_split(port)
    assert one == two == []
    assert len(everything) == 20


def test_subscriber_that_stops_reading_cannot_grow_the_broker() -> None:
    """Deliveries to a client that stops reading are capped (max_pending_bytes), dropped and counted."""
    with embedded_broker(max_pending_bytes=1024 * 1024) as handle:
        slow = RawClient(handle.port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert slow.connect("slow") == 0
        slow.send(subscribe_packet(1, [("slow/t", 0)]))
        assert slow.read() is not None  # SUBACK; from now on it never reads
        with RawClient(handle.port) as pub:
            assert pub.connect("fast-pub") == 0
            pub.send(publish_packet("slow/t", b"\0" * 16_384) * 2000)  # 32 MB
            with PahoClient(handle.port, "probe") as probe:
                probe.ping_self("probe/marker")  # the broker still routes for others
        assert handle.stats["dropped_slow_subscriber"] > 0
        slow.close()


def test_pings_keep_a_quiet_client_connected() -> None:
    """A client that only sends PINGREQ within its keepalive is not dropped, and gets PINGRESPs."""
    with embedded_broker() as handle, RawClient(handle.port) as raw:
        assert raw.connect("pinger", keepalive=1) == 0
        for _ in range(6):  # 3 s = 2 x the 1.5 s deadline
            raw.send(PINGREQ)
            reply = raw.read()
            assert reply is not None
            assert reply.packet_type == 13
            time.sleep(0.5)
        assert handle.stats.get("keepalive_timeout", 0) == 0


def test_persistent_session_expires(tmp_path: Path) -> None:
    """A persistent session unused for session_expiry_s is removed, also from the store."""
    with embedded_broker(data_dir=tmp_path, session_expiry_s=1) as handle:
        PahoClient(handle.port, "short", clean=False, subscribe=[("s/t", 1)]).close()
        wait_offline(handle, "short")
        assert handle.broker is not None
        sessions = handle.broker.amqtt.sessions
        deadline = time.monotonic() + 10
        while "short" in sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "short" not in sessions
        assert handle.stats["session_expired"] == 1
    with embedded_broker(data_dir=tmp_path) as handle, PahoClient(handle.port, "short", clean=False) as again:
        assert not again.session_present


def test_lagging_qos1_subscriber_slows_the_publisher_instead_of_losing() -> None:
    """A QoS 1 subscriber that falls behind for a while gets everything; the publisher waits instead."""
    count = 2000
    with embedded_broker(max_pending_bytes=1024 * 1024) as handle:
        sub = RawClient(handle.port, timeout=20)
        assert sub.connect("lagging") == 0
        sub.send(subscribe_packet(1, [("lag/t", 1)]))
        assert sub.read() is not None  # SUBACK
        flood = b"".join(
            publish_packet("lag/t", struct.pack("!I", i) + bytes(1020), qos=1, packet_id=i + 1)
            for i in range(count)
        )
        with RawClient(handle.port) as pub:
            assert pub.connect("flooder") == 0
            sender = threading.Thread(target=pub.send, args=(flood,))
            sender.start()
            time.sleep(1.0)  # the subscriber reads nothing for a second: ~1,000 deliveries pile up
            received = []
            while len(received) < count:
                packet = sub.read(timeout=20)
                assert packet is not None
                _, payload, _, _, _, packet_id = packet.publish
                assert packet_id is not None
                sub.send(ack_packet(4, packet_id))
                received.append(struct.unpack("!I", payload[:4])[0])
            sender.join(20)
        sub.close()
        assert received == list(range(count))
        assert handle.stats["dropped_slow_subscriber"] == 0
