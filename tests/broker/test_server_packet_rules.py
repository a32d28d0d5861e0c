"""broker/packet_rules.py: MQTT 3.1.1 input checks, driven without a network (pure)."""

from __future__ import annotations

import pytest

from broker import packet_rules as rules
from broker.errors import MalformedPacket
from broker.testing import connect_packet, publish_packet, remaining_length, subscribe_packet


def body_of(packet: bytes) -> bytes:
    """The bytes after the fixed header."""
    index = 1
    while packet[index] & 0x80:
        index += 1
    return packet[index + 1 :]


@pytest.mark.parametrize("n", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_remaining_length_round_trips(n: int) -> None:
    """Every encodable remaining length decodes to itself, at the boundaries of each byte count."""
    assert rules.decode_remaining_length(remaining_length(n)) == n


def test_remaining_length_waits_for_more_bytes_then_rejects_a_fifth() -> None:
    """A continuation bit asks for more bytes; a fifth length byte is malformed."""
    assert rules.decode_remaining_length(b"\x80\x80") is None
    with pytest.raises(MalformedPacket, match="four bytes"):
        rules.decode_remaining_length(b"\xff\xff\xff\xff\x01")


def test_connect_fields_are_parsed() -> None:
    """A full CONNECT yields every field."""
    packet = connect_packet(
        "dev-1",
        clean=False,
        keepalive=30,
        will=("w/t", b"bye", 1, True),
        username="u",
        password="p",  # noqa: S106
    )
    request = rules.parse_connect(body_of(packet))
    assert request == rules.ConnectRequest("dev-1", False, 30, "w/t", b"bye", 1, True, "u", "p")


@pytest.mark.parametrize(
    ("packet", "rule"),
    [
        (connect_packet("x", extra_flags=0x01), "3.1.2-3"),
        (connect_packet("x", will=("w", b"m", 3, False)), "3.1.2-14"),
        (connect_packet("x", extra_flags=0x20), "3.1.2-11"),
        (connect_packet("x", extra_flags=0x08), "3.1.2-11"),
        (connect_packet("x", extra_flags=0x40), "3.1.2-22"),
        (connect_packet("x", protocol="HTTP"), "3.1.2-1"),
        (connect_packet(b"a\x00b"), "1.5.3-2"),
        (connect_packet(b"\xc3"), "1.5.3-1"),
        (connect_packet("x") + b"extra", "after its last field"),
        (connect_packet("x")[:-2], "truncated"),
    ],
)
def test_malformed_connect_names_the_rule(packet: bytes, rule: str) -> None:
    """Each CONNECT rule broken raises MalformedPacket that cites it."""
    body = body_of(packet)
    if packet.endswith(b"extra"):
        body = body_of(connect_packet("x")) + b"extra"
    with pytest.raises(MalformedPacket, match=rule):
        rules.parse_connect(body)


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (connect_packet("x", level=3), 1),
        (connect_packet("x", level=5), 1),
        (connect_packet("", clean=False), 2),
    ],
)
def test_refused_connect_gets_a_return_code(packet: bytes, code: int) -> None:
    """Protocol level other than 4 -> 0x01; empty client id with clean session 0 -> 0x02."""
    result = rules.parse_connect(body_of(packet))
    assert isinstance(result, rules.ConnectRefused)
    assert result.return_code == code


def test_empty_client_id_with_clean_session_is_accepted() -> None:
    """The server assigns an id to an empty one when clean session is 1 [MQTT-3.1.3-6]."""
    result = rules.parse_connect(body_of(connect_packet("", clean=True)))
    assert isinstance(result, rules.ConnectRequest)
    assert result.client_id == ""


def test_publish_is_parsed() -> None:
    """PUBLISH flags, topic, packet id and payload come out as sent."""
    packet = publish_packet("a/b", b"data", qos=1, retain=True, dup=True, packet_id=9)
    assert rules.parse_publish(packet[0] & 0x0F, body_of(packet)) == rules.Publish(
        "a/b", 1, True, True, 9, b"data"
    )


@pytest.mark.parametrize(
    ("packet", "rule"),
    [
        (publish_packet("", b""), "4.7.3-1"),
        (publish_packet("a/#", b""), "3.3.2-2"),
        (publish_packet("a", b"", qos=1, packet_id=0), "2.3.1-1"),
        (publish_packet("a", b"", qos=0, dup=True), "3.3.1-2"),
        (bytes([0x36]) + publish_packet("a", b"")[1:], "3.3.1-4"),
    ],
)
def test_bad_publish_names_the_rule(packet: bytes, rule: str) -> None:
    """A PUBLISH with a bad topic, packet id, DUP or QoS is malformed."""
    with pytest.raises(MalformedPacket, match=rule):
        rules.parse_publish(packet[0] & 0x0F, body_of(packet))


def test_subscribe_rules() -> None:
    """SUBSCRIBE needs a pair, requested QoS 0-2 and valid filters."""
    assert rules.parse_subscribe(body_of(subscribe_packet(1, [("a/+", 2)]))).topics == (("a/+", 2),)
    with pytest.raises(MalformedPacket, match=r"3\.8\.3-3"):
        rules.parse_subscribe(b"\x00\x01")
    with pytest.raises(MalformedPacket, match=r"3\.8\.3-4"):
        rules.parse_subscribe(body_of(subscribe_packet(1, [("a", 3)])))
    with pytest.raises(MalformedPacket, match=r"4\.7\.1-2"):
        rules.parse_subscribe(body_of(subscribe_packet(1, [("a/#/b", 0)])))


@pytest.mark.parametrize(
    ("first", "connected", "rule"),
    [
        (0x30, False, "3.1.0-1"),
        (0x11, False, "2.2.2-2"),
        (0x10, True, "3.1.0-2"),
        (0x20, True, "4.8.0-1"),
        (0x90, True, "4.8.0-1"),
        (0x80, True, "2.2.2-2"),
        (0x60, True, "2.2.2-2"),
        (0xC1, True, "2.2.2-2"),
        (0x36, True, "3.3.1-4"),
        (0xF0, True, "4.8.0-1"),
    ],
)
def test_fixed_header_rules(first: int, connected: bool, rule: str) -> None:
    """Packet types and flags a client may not send are refused from the first byte."""
    with pytest.raises(MalformedPacket, match=rule):
        rules.check_fixed_header(first, connected=connected)


def test_ack_and_empty_packets() -> None:
    """Acks carry exactly a non-zero packet id; PINGREQ and DISCONNECT carry nothing."""
    assert rules.parse_packet_id(rules.PUBACK, b"\x00\x05") == 5
    for body in (b"", b"\x00", b"\x00\x00", b"\x00\x01\x02"):
        with pytest.raises(MalformedPacket):
            rules.parse_packet_id(rules.PUBACK, body)
    rules.check_empty(rules.PINGREQ, b"")
    with pytest.raises(MalformedPacket):
        rules.check_empty(rules.DISCONNECT, b"\x00")
