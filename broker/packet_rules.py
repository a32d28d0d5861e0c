"""MQTT 3.1.1 packets from a client, parsed and checked against the specification. Pure code.

The broker's reader (``broker/connection.py``) reads one whole packet off the socket (after checking its
remaining length against the configured limit) and hands the bytes here. Each ``parse_*`` returns a
small frozen dataclass, or raises ``MalformedPacket`` naming the rule that was broken; the reader then
closes the connection, as §4.8 requires for a protocol violation. amqtt's own decoders are lenient
(they skip a bad packet and go on reading from the middle of the stream, turn bad UTF-8 into
``str(bytes)``, accept reserved flag bits), which is why the broker no longer uses them for input.

``parse_connect`` distinguishes a malformed CONNECT (close without CONNACK) from a well-formed one the
server refuses (``ConnectRefused``: send CONNACK with that return code, then close).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from broker.errors import MalformedPacket
from broker.topic_index import topic_filter_problem, topic_name_problem

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

PACKET_NAMES = {
    0: "reserved(0)",
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    15: "reserved(15)",
}

# What a client may send once connected, with the fixed-header flags each must carry (§2.2.2).
# PUBLISH carries DUP/QoS/RETAIN and is checked on its own; CONNECT a second time is a violation.
_CLIENT_FLAGS: dict[int, int] = {
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}

CONNACK_UNACCEPTABLE_PROTOCOL = 0x01
CONNACK_IDENTIFIER_REJECTED = 0x02
CONNACK_NOT_AUTHORIZED = 0x05

MAX_REMAINING_LENGTH = 268_435_455  # four length bytes [§2.2.3]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A well-formed CONNECT."""

    client_id: str
    clean_session: bool
    keep_alive: int
    will_topic: str | None
    will_message: bytes | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: str | None


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """A well-formed CONNECT the server answers with CONNACK ``return_code`` and then closes."""

    return_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


def decode_remaining_length(encoded: bytes) -> int | None:
    """The value of a variable-length integer, or None while its last byte has not arrived yet."""
    value = 0
    for index, byte in enumerate(encoded):
        if index >= 4:
            raise MalformedPacket("remaining length longer than four bytes [MQTT-2.2.3]")
        value += (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value
    if len(encoded) >= 4:
        raise MalformedPacket("remaining length longer than four bytes [MQTT-2.2.3]")
    return None


def encode_remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of ``n`` [§2.2.3]."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_qos0_bytes(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH without RETAIN: the same bytes for every subscriber, so encoded once."""
    raw_topic = topic.encode("utf-8")
    body_length = 2 + len(raw_topic) + len(payload)
    return b"".join(
        (b"\x30", encode_remaining_length(body_length), struct.pack("!H", len(raw_topic)), raw_topic, payload)
    )


def check_fixed_header(first_byte: int, *, connected: bool) -> None:
    """Reject packet types and flag bits a client may not send in its state."""
    packet_type, flags = first_byte >> 4, first_byte & 0x0F
    name = PACKET_NAMES[packet_type]
    if not connected:
        if packet_type != CONNECT:
            raise MalformedPacket(f"first packet is {name}, not CONNECT [MQTT-3.1.0-1]")
        if flags:
            raise MalformedPacket("CONNECT with reserved flag bits set [MQTT-2.2.2-2]")
        return
    if packet_type == CONNECT:
        raise MalformedPacket("second CONNECT on one connection [MQTT-3.1.0-2]")
    if packet_type == PUBLISH:
        if flags & 0x06 == 0x06:
            raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
        return
    expected = _CLIENT_FLAGS.get(packet_type)
    if expected is None:
        raise MalformedPacket(f"a client may not send {name} [MQTT-4.8.0-1]")
    if flags != expected:
        raise MalformedPacket(f"{name} with flags {flags:#06b}, must be {expected:#06b} [MQTT-2.2.2-2]")


class _Reader:
    """Cursor over one packet's body; running past the end is a malformed packet."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket(f"{self.what} is shorter than its fields say (truncated)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket(f"{self.what} has a string that is not UTF-8 [MQTT-1.5.3-1]") from None
        if "\x00" in text:
            raise MalformedPacket(f"{self.what} has a string with U+0000 [MQTT-1.5.3-2]")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedPacket(f"{self.what} has {self.remaining()} bytes after its last field")


def parse_connect(body: bytes) -> ConnectRequest | ConnectRefused:
    """Check a CONNECT's variable header and payload (§3.1)."""
    r = _Reader(body, "CONNECT")
    protocol = r.string()
    level = r.u8()
    if protocol not in ("MQTT", "MQIsdp"):
        # [MQTT-3.1.2-1]: the server MAY disconnect; an unknown protocol gets no CONNACK.
        raise MalformedPacket(f"protocol name {protocol!r} is not MQTT [MQTT-3.1.2-1]")
    if protocol != "MQTT" or level != 4:
        return ConnectRefused(
            CONNACK_UNACCEPTABLE_PROTOCOL,
            f"protocol {protocol} level {level}; only MQTT 3.1.1 [MQTT-3.1.2-2]",
        )
    flags = r.u8()
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set [MQTT-3.1.2-3]")
    clean_session = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    password_flag = bool(flags & 0x40)
    username_flag = bool(flags & 0x80)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3 [MQTT-3.1.2-14]")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS or retain set without the will flag [MQTT-3.1.2-11, -13, -15]")
    if password_flag and not username_flag:
        raise MalformedPacket("password without a user name [MQTT-3.1.2-22]")
    keep_alive = r.u16()
    client_id = r.string()
    will_topic: str | None = None
    will_message: bytes | None = None
    if will_flag:
        will_topic = r.string()
        problem = topic_name_problem(will_topic)
        if problem:
            raise MalformedPacket(f"will topic: {problem}")
        will_message = r.binary()
    username = r.string() if username_flag else None
    password: str | None = None
    if password_flag:
        # Passwords are binary in MQTT; the auth plugins take text, so non-UTF-8 ones cannot match.
        password = r.binary().decode("utf-8", errors="replace")
    r.end()
    if not client_id and not clean_session:
        return ConnectRefused(
            CONNACK_IDENTIFIER_REJECTED, "empty client id with clean session 0 [MQTT-3.1.3-8]"
        )
    return ConnectRequest(
        client_id=client_id,
        clean_session=clean_session,
        keep_alive=keep_alive,
        will_topic=will_topic,
        will_message=will_message,
        will_qos=will_qos,
        will_retain=will_retain,
        username=username,
        password=password,
    )


def parse_publish(flags: int, body: bytes) -> Publish:
    """Check a PUBLISH (§3.3); the topic must be a valid topic name."""
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    if qos == 0 and dup:
        raise MalformedPacket("PUBLISH QoS 0 with DUP set [MQTT-3.3.1-2]")
    r = _Reader(body, "PUBLISH")
    topic = r.string()
    problem = topic_name_problem(topic)
    if problem:
        raise MalformedPacket(f"PUBLISH: {problem}")
    packet_id: int | None = None
    if qos:
        packet_id = r.u16()
        if packet_id == 0:
            raise MalformedPacket("PUBLISH with packet id 0 [MQTT-2.3.1-1]")
    return Publish(topic, qos, bool(flags & 0x01), dup, packet_id, body[r.pos :])


def parse_packet_id(packet_type: int, body: bytes) -> int:
    """The packet id of a PUBACK, PUBREC, PUBREL or PUBCOMP, which carry nothing else."""
    name = PACKET_NAMES[packet_type]
    if len(body) != 2:
        raise MalformedPacket(f"{name} with remaining length {len(body)}, must be 2")
    packet_id: int = struct.unpack("!H", body)[0]
    if packet_id == 0:
        raise MalformedPacket(f"{name} with packet id 0 [MQTT-2.3.1-1]")
    return packet_id


def parse_subscribe(body: bytes) -> Subscribe:
    """Check a SUBSCRIBE (§3.8): at least one pair, valid filters, requested QoS 0-2."""
    r = _Reader(body, "SUBSCRIBE")
    packet_id = r.u16()
    if packet_id == 0:
        raise MalformedPacket("SUBSCRIBE with packet id 0 [MQTT-2.3.1-1]")
    topics: list[tuple[str, int]] = []
    while r.remaining():
        topic_filter = r.string()
        qos = r.u8()
        if qos > 2:
            raise MalformedPacket(f"SUBSCRIBE requested QoS byte {qos:#04x} [MQTT-3.8.3-4]")
        problem = topic_filter_problem(topic_filter)
        if problem:
            # Mosquitto closes here too ("Invalid subscription string ... disconnecting") [§4.8].
            raise MalformedPacket(f"SUBSCRIBE: {problem}")
        topics.append((topic_filter, qos))
    if not topics:
        raise MalformedPacket("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")
    return Subscribe(packet_id, tuple(topics))


def parse_unsubscribe(body: bytes) -> Unsubscribe:
    """Check an UNSUBSCRIBE (§3.10): at least one valid filter."""
    r = _Reader(body, "UNSUBSCRIBE")
    packet_id = r.u16()
    if packet_id == 0:
        raise MalformedPacket("UNSUBSCRIBE with packet id 0 [MQTT-2.3.1-1]")
    topics: list[str] = []
    while r.remaining():
        topic_filter = r.string()
        problem = topic_filter_problem(topic_filter)
        if problem:
            raise MalformedPacket(f"UNSUBSCRIBE: {problem}")
        topics.append(topic_filter)
    if not topics:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")
    return Unsubscribe(packet_id, tuple(topics))


def check_empty(packet_type: int, body: bytes) -> None:
    """PINGREQ and DISCONNECT carry no bytes after the fixed header."""
    if body:
        raise MalformedPacket(f"{PACKET_NAMES[packet_type]} with remaining length {len(body)}, must be 0")
