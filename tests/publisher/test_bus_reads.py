"""The bus's network loop reads every packet already received per wakeup, not one per select()."""

from __future__ import annotations

import socket
import threading
import time

from broker.testing import publish_packet
from publisher.bus import READ_BATCH, BrokerAddress, Bus

BURST = 2_000


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet from ``conn``: (first byte, body)."""
    head = conn.recv(1)
    multiplier, length = 1, 0
    while True:
        byte = conn.recv(1)[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return head[0], body


def _burst_server(listener: socket.socket, topic: str, done: threading.Event) -> None:
    """Accept the bus, acknowledge its CONNECT and SUBSCRIBE, then send BURST publishes at once."""
    conn, _ = listener.accept()
    with conn:
        _read_packet(conn)  # CONNECT
        conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
        first, body = _read_packet(conn)
        assert first >> 4 == 8, "expected SUBSCRIBE"
        conn.sendall(b"\x90\x03" + body[:2] + b"\x00")  # SUBACK, QoS 0
        conn.sendall(b"".join(publish_packet(topic, b"x" * 40) for _ in range(BURST)))
        done.wait(30)


def test_a_burst_of_qos0_messages_is_read_in_batches() -> None:
    """2,000 QoS 0 publishes that arrive together take far fewer loop reads than messages."""
    topic = "fleetbus/v1/dev/d1/health"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        done = threading.Event()
        server = threading.Thread(target=_burst_server, args=(listener, topic, done), daemon=True)
        server.start()
        bus = Bus(BrokerAddress(port=port))
        reads = [0]
        real = bus._client.loop_read

        def counting(max_packets: int = 1) -> object:
            reads[0] += 1
            return real(max_packets)

        bus._client.loop_read = counting  # type: ignore[method-assign]
        got: list[bytes] = []
        bus.on(topic, lambda t, p: got.append(p))
        try:
            bus.connect()
            bus.subscribe([topic], qos=0)
            deadline = time.monotonic() + 30
            while len(got) < BURST and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            done.set()
            bus.close()
        assert len(got) == BURST
        # paho's own loop_read takes one packet per wakeup: BURST reads. Batched, about BURST / 64.
        assert reads[0] < BURST // 4, f"{reads[0]} loop reads for {BURST} messages (batch {READ_BATCH})"
