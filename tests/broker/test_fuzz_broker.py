"""Garbage, half packets, mutated packets and floods from raw sockets do not disturb other clients.

Hypothesis generates the malformed input; a well-behaved paho pair keeps publishing and receiving
QoS 1 through the same broker the whole time, and must lose nothing. Afterwards the broker still
accepts new connections. The number of malformed inputs tried is printed (run with -s to see it).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import packet_rules as rules
from broker.errors import MalformedPacket
from broker.server import BrokerHandle
from broker.testing import (
    PahoClient,
    RawClient,
    connect_packet,
    embedded_broker,
    packet,
    publish_packet,
    subscribe_packet,
)

# ------------------------------------------------------------------ strategies

_topics = st.text(alphabet="ab/+#$\x00é", max_size=12)
_valid_packets = st.one_of(
    st.builds(
        lambda t, p, q, r: publish_packet(t, p, qos=q, retain=r, packet_id=7),
        _topics,
        st.binary(max_size=64),
        st.integers(0, 2),
        st.booleans(),
    ),
    st.builds(lambda t, q: subscribe_packet(3, [(t, q)]), _topics, st.integers(0, 3)),
    st.sampled_from([packet(0xC0), packet(0xE0), packet(0x40, b"\x00\x07"), packet(0x62, b"\x00\x07")]),
    st.builds(lambda c: connect_packet(c, keepalive=0), st.text(max_size=8)),
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid packet with bytes flipped, replaced, cut or appended."""
    data = bytearray(draw(_valid_packets))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "cut", "append"]))
        if action == "flip" and data:
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


_huge_length = st.builds(
    lambda first, length: bytes([first]) + bytes([0xFF, 0xFF, 0xFF, 0x7F][:length]) + b"\x01",
    st.integers(0, 255),
    st.integers(1, 4),
)

malformed_input = st.one_of(
    st.binary(min_size=1, max_size=200),  # garbage
    _mutated(),  # flipped, cut, extended packets
    _valid_packets.map(lambda p: p[: max(1, len(p) // 2)]),  # half packets
    _huge_length,  # remaining lengths over any limit
)

# ------------------------------------------------------------------ pure parsers


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 15), st.integers(0, 15), st.binary(max_size=80))
def test_parsers_reject_garbage_only_with_malformed_packet(ptype: int, flags: int, body: bytes) -> None:
    """Any bytes given to packet_rules either parse or raise MalformedPacket, never anything else."""
    first = (ptype << 4) | flags
    for connected in (False, True):
        try:
            rules.check_fixed_header(first, connected=connected)
        except MalformedPacket:
            continue
        try:
            if ptype == rules.CONNECT:
                rules.parse_connect(body)
            elif ptype == rules.PUBLISH:
                rules.parse_publish(flags, body)
            elif ptype == rules.SUBSCRIBE:
                rules.parse_subscribe(body)
            elif ptype == rules.UNSUBSCRIBE:
                rules.parse_unsubscribe(body)
            elif ptype in (rules.PUBACK, rules.PUBREC, rules.PUBREL, rules.PUBCOMP):
                rules.parse_packet_id(ptype, body)
            else:
                rules.check_empty(ptype, body)
        except MalformedPacket:
            pass


# ------------------------------------------------------------------ live broker


class GoodTraffic:
    """A paho publisher and subscriber exchanging numbered QoS 1 messages in the background."""

    def __init__(self, port: int) -> None:
        self.sub = PahoClient(port, "good-sub", subscribe=[("good/t", 1)])
        self.pub = PahoClient(port, "good-pub")
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pub.publish("good/t", struct.pack("!I", self.sent), qos=1)
            self.sent += 1
            time.sleep(0.005)

    def finish(self) -> list[int]:
        """Stop publishing; the sequence numbers the subscriber received, in order."""
        self._stop.set()
        self._thread.join(10)
        received = [struct.unpack("!I", m.payload)[0] for m in self.sub.ping_self("good-sub/marker")]
        self.pub.close()
        self.sub.close()
        return received


@pytest.fixture(scope="module")
def fuzzed_broker() -> Iterator[tuple[BrokerHandle, GoodTraffic]]:
    with embedded_broker(max_payload_bytes=64 * 1024, connect_timeout=2.0) as handle:
        traffic = GoodTraffic(handle.port)
        yield handle, traffic


TRIED = {"inputs": 0}


def _send_and_drain(port: int, data: bytes, after_connect: bool) -> None:
    """Send ``data`` (after a valid CONNECT if asked), half-close, and read until the broker closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if after_connect:
            sock.sendall(connect_packet("", keepalive=0))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionError, TimeoutError, OSError):
            pass


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=malformed_input, after_connect=st.booleans())
def test_malformed_input_from_raw_sockets(
    fuzzed_broker: tuple[BrokerHandle, GoodTraffic], data: bytes, after_connect: bool
) -> None:
    """Malformed bytes on one connection end at most that connection."""
    handle, _ = fuzzed_broker
    TRIED["inputs"] += 1
    _send_and_drain(handle.port, data, after_connect)


def test_flood_does_not_starve_others(fuzzed_broker: tuple[BrokerHandle, GoodTraffic]) -> None:
    """A client blasting 20,000 QoS 0 publishes without reading does not stop the good pair."""
    handle, _ = fuzzed_broker
    blast = publish_packet("flood/x", b"\0" * 100) * 20_000
    with RawClient(handle.port) as raw:
        assert raw.connect("flooder") == 0
        raw.sock.sendall(blast)
    stalled = []
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", handle.port), timeout=5) as sock:
            stalled.append(sock.getsockname())  # never sends CONNECT; connect_timeout closes it


def test_broker_still_serves_after_the_fuzzing(fuzzed_broker: tuple[BrokerHandle, GoodTraffic]) -> None:
    """After the fuzz and the flood, the good pair lost nothing and new clients can connect."""
    handle, traffic = fuzzed_broker
    received = traffic.finish()
    assert received == list(range(traffic.sent))
    with PahoClient(handle.port, "late", subscribe=[("late/t", 1)]) as late:
        late.publish("late/t", b"still here", qos=1)
        assert late.get().payload == b"still here"
    print(f"\nmalformed inputs tried: {TRIED['inputs']}; broker refusals: {dict(handle.stats)}")
    if TRIED["inputs"]:  # the fuzz test ran in this session (not deselected)
        assert handle.stats["malformed_packet"] > 0
