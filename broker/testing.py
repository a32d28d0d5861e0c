"""Helpers for tests and benchmarks of the broker: raw MQTT 3.1.1 packets, a raw socket client, plugins.

Shipped with the package (as ``structlog.testing`` is) so that tests, ``bench/broker.py`` and other
packages' tests build packets the same way. Nothing here is used by the broker itself.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker.packet_rules import encode_remaining_length
from broker.topic_index import matches

if TYPE_CHECKING:
    from broker.server import BrokerHandle


remaining_length = encode_remaining_length


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def packet(first_byte: int, body: bytes = b"") -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str | bytes = "",
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | None = None,
    protocol: str = "MQTT",
    level: int = 4,
    extra_flags: int = 0,
) -> bytes:
    """A CONNECT; ``extra_flags`` is OR-ed into the connect flags to build broken ones."""
    flags = extra_flags | (0x02 if clean else 0)
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    body = string(protocol) + bytes([level, flags]) + struct.pack("!H", keepalive) + payload
    return packet(0x10, body)


def publish_packet(
    topic: str | bytes,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 1,
) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(first, body)


def subscribe_packet(packet_id: int, topics: list[tuple[str | bytes, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(string(t) + bytes([q]) for t, q in topics)
    return packet(0x82, body)


def ack_packet(packet_type: int, packet_id: int) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6, with its 0b0010 flags) or PUBCOMP (7)."""
    first = (packet_type << 4) | (0x02 if packet_type == 6 else 0)
    return packet(first, struct.pack("!H", packet_id))


PINGREQ = packet(0xC0)
DISCONNECT = packet(0xE0)


@dataclass(frozen=True)
class Packet:
    packet_type: int
    flags: int
    body: bytes

    @property
    def publish(self) -> tuple[str, bytes, int, bool, bool, int | None]:
        """(topic, payload, qos, retain, dup, packet id) of a PUBLISH."""
        (length,) = struct.unpack("!H", self.body[:2])
        topic = self.body[2 : 2 + length].decode()
        qos = (self.flags >> 1) & 3
        rest = self.body[2 + length :]
        packet_id = struct.unpack("!H", rest[:2])[0] if qos else None
        return topic, rest[2:] if qos else rest, qos, bool(self.flags & 1), bool(self.flags & 8), packet_id


class RawClient:
    """A blocking MQTT client on a plain socket, for sending what paho never would."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no packet in time") from None
            except ConnectionError:
                return False
            if not chunk:
                return False
            self._buf += chunk
        return True

    def read(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None once the broker has closed the connection."""
        deadline = time.monotonic() + timeout
        if not self._fill(2, deadline):
            return None
        index, length, shift = 1, 0, 0
        while True:
            if not self._fill(index + 1, deadline):
                return None
            byte = self._buf[index]
            length |= (byte & 0x7F) << shift
            shift += 7
            index += 1
            if not byte & 0x80:
                break
        if not self._fill(index + length, deadline):
            return None
        first = self._buf[0]
        body = self._buf[index : index + length]
        self._buf = self._buf[index + length :]
        return Packet(first >> 4, first & 0x0F, body)

    def connect(self, client_id: str = "", **kwargs: object) -> int:
        """Send CONNECT and return the CONNACK return code."""
        self.send(connect_packet(client_id, **kwargs))  # type: ignore[arg-type]
        reply = self.read()
        if reply is None or reply.packet_type != 2:
            raise ConnectionError(f"no CONNACK: {reply}")
        return reply.body[1]

    def closed_by_broker(self, timeout: float = 5.0) -> bool:
        """Whether the broker closes the connection within ``timeout`` (packets before that are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.read(deadline - time.monotonic()) is None:
                    return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DenyReceivePlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """A topic plugin that allows everything but receiving topics matching ``deny_receive``."""

    @dataclass
    class Config:
        deny_receive: list[str] = field(default_factory=list)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if action == Action.RECEIVE and topic is not None:
            return not any(matches(topic, f) for f in self.config.deny_receive)
        return True


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class PahoClient:
    """A paho-mqtt 2 client that connects, subscribes and collects messages, all synchronously."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        clean: bool = True,
        username: str | None = None,
        password: str | None = None,
        subscribe: list[tuple[str, int]] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        keepalive: int = 60,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self.granted: dict[int, list[int]] = {}
        self.session_present: bool | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], will[2], will[3])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError("no CONNACK from the broker")
        if getattr(self.reason, "is_failure", False):
            self.close()
            raise ConnectionRefusedError(f"CONNACK refused: {self.reason}")
        if subscribe:
            self.subscribe(subscribe)

    def _on_connect(
        self, client: object, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self.reason = reason
        self._connected.set()

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        self.messages.put(
            Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))  # type: ignore[attr-defined]
        )

    def _on_subscribe(self, client: object, userdata: object, mid: int, codes: object, props: object) -> None:
        self.granted[mid] = [int(getattr(c, "value", c)) for c in codes]  # type: ignore[attr-defined]
        self._acks.setdefault(mid, threading.Event()).set()

    def subscribe(self, topics: list[tuple[str, int]]) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS (or 0x80) per filter."""
        _, mid = self.client.subscribe(topics)
        assert mid is not None
        if not self._acks.setdefault(mid, threading.Event()).wait(10):
            raise TimeoutError("no SUBACK")
        return self.granted[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def get(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def ping_self(self, topic: str) -> list[Received]:
        """Round-trip a marker through the broker; returns what arrived before it."""
        self.subscribe([(topic, 1)])
        self.publish(topic, b"marker", qos=1)
        before: list[Received] = []
        while True:
            message = self.get()
            if message.topic == topic and message.payload == b"marker":
                return before
            before.append(message)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a crashed client would."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def embedded_broker(
    data_dir: Path | None = None, *, extra_plugins: dict[str, Any] | None = None, **settings: Any
) -> Iterator[BrokerHandle]:
    """The hardened broker, anonymous, on a free port, in a thread."""
    from broker.server import BrokerSettings, run_in_thread

    values: dict[str, Any] = {"port": 0, "allow_anonymous": True, "data_dir": data_dir, **settings}
    handle = run_in_thread(BrokerSettings(**values), extra_plugins=extra_plugins)
    try:
        yield handle
    finally:
        handle.stop()


def wait_offline(handle: BrokerHandle, client_id: str, timeout: float = 10.0) -> None:
    """Block until the broker in ``handle`` sees ``client_id``'s session as disconnected."""
    assert handle.broker is not None
    sessions = handle.broker.amqtt.sessions
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = sessions.get(client_id)
        if entry is not None and entry[0].transitions.state == "disconnected":
            return
        time.sleep(0.01)
    raise TimeoutError(f"{client_id} still connected after {timeout}s")
