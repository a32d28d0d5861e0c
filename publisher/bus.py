"""The publisher's one MQTT connection: connect, subscribe, dispatch by filter, publish.

A thin shell over paho-mqtt 2.2 (MQTT 3.1.1).  Handlers are registered per topic filter and run on
paho's network thread, so they must be quick: they decode and hand over to pure code under a lock.
Subscriptions are remade on every (re)connect, since sessions are clean.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device.link import no_delay
from publisher.errors import BusError, ConfigError
from schemas.messages import MQTT_PORT, MQTTS_PORT
from schemas.topics import matches

log = structlog.get_logger("publisher.bus")

Handler = Callable[[str, bytes], None]
_MAX_ROUTES = 100_000
#: Packets read per wakeup of the network loop, at most.
READ_BATCH = 64


class _BatchReadingClient(mqtt.Client):
    """paho's client, reading every packet already received per wakeup instead of one.

    paho 2's ``loop_read`` reads one packet per select() unless QoS 1/2 messages are in flight, so
    a stream of QoS 0 telemetry costs a select() and a loop turn per message: the aggregator
    ingested 49k msg/s against a bare paho subscriber's 75k on Mosquitto (bench/ingest.py).  This
    reads on until the socket would block (or READ_BATCH packets), with paho's own per-packet
    reader and error handling; everything else is paho's loop unchanged.
    """

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(max(max_packets, READ_BATCH)):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return MQTTErrorCode.MQTT_ERR_SUCCESS


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in to it."""

    host: str = "127.0.0.1"
    port: int = MQTT_PORT
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def parse(cls, value: str, **kwargs: Any) -> BrokerAddress:
        """``host:port`` (or ``host`` alone, port 1883; ``mqtts://host:port`` turns TLS on)."""
        text = value.strip()
        tls = bool(kwargs.pop("tls", False))
        for scheme, secure in (("mqtts://", True), ("mqtt://", False), ("tcp://", False)):
            if text.startswith(scheme):
                text, tls = text[len(scheme) :], tls or secure
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, str(MQTTS_PORT if tls else MQTT_PORT)
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(f"broker address {value!r}: port {port!r} is not a number") from None
        if not host or not 0 < number < 65536:
            raise ConfigError(f"broker address {value!r} must look like HOST:PORT")
        return cls(host=host, port=number, tls=tls, **kwargs)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class Bus:
    """One paho client with per-filter handlers; use as a context manager."""

    def __init__(self, address: BrokerAddress, client_id: str | None = None, max_inflight: int = 100) -> None:
        self.address = address
        self.client_id = client_id or f"fleetbus-pub-{uuid.uuid4().hex[:12]}"
        self._client = _BatchReadingClient(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(1, 5)
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        if address.tls:
            self._client.tls_set(ca_certs=address.ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._lock = threading.Lock()
        self._handlers: list[tuple[str, Handler]] = []
        # Telemetry topics repeat (devices x streams): remember which handlers a topic goes to.
        self._routes: dict[str, list[Handler]] = {}
        self._subscriptions: dict[str, int] = {}
        self._suback: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self._refused: str | None = None
        self.handler_errors = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for CONNACK; raise BusError saying why not."""
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise BusError(f"cannot reach broker at {self.address}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused is not None:
                self.close()
                raise BusError(f"broker at {self.address} refused the connection: {self._refused}")
            if time.monotonic() > deadline:
                self.close()
                raise BusError(f"no CONNACK from {self.address} within {timeout:.0f}s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Bus:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- subscribing ----------------------------------------------------------------------------

    def on(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter``."""
        with self._lock:
            self._handlers.append((topic_filter, handler))
            self._routes.clear()

    def subscribe(self, filters: Iterable[str], qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; remembered, so a reconnect subscribes again."""
        wanted = list(filters)
        with self._lock:
            for f in wanted:
                self._subscriptions[f] = qos
        if not wanted:
            return
        deadline = time.monotonic() + timeout
        while True:
            result, mid = self._client.subscribe([(f, qos) for f in wanted])
            if result not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) or mid is None:
                raise BusError(f"subscribe to {wanted} failed: {mqtt.error_string(result)}")
            done = self._suback.setdefault(mid, threading.Event())
            if result == mqtt.MQTT_ERR_NO_CONN:
                self._connected.clear()
            try:
                while not done.wait(0.05):
                    if time.monotonic() > deadline:
                        raise BusError(f"no SUBACK for {wanted} within {timeout:.0f}s")
                    if not self._connected.is_set():
                        break  # the broker dropped us mid-subscribe (amqtt does, under connect races)
                else:
                    return
            finally:
                self._suback.pop(mid, None)
            # Reconnected sessions are clean: wait for the reconnect, then subscribe again.
            while not self._connected.wait(0.05):
                if time.monotonic() > deadline:
                    raise BusError(
                        f"disconnected while subscribing to {wanted}; no reconnect within {timeout:.0f}s"
                    )

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def wait_published(self, infos: Iterable[mqtt.MQTTMessageInfo], timeout: float = 10.0) -> None:
        """Block until every QoS 1 publish is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        for info in infos:
            remaining = deadline - time.monotonic()
            try:
                info.wait_for_publish(max(remaining, 0.001))
            except (RuntimeError, ValueError) as exc:
                raise BusError(f"publish not acknowledged: {exc}") from None
            if not info.is_published():
                raise BusError(f"broker did not acknowledge a publish within {timeout:.0f}s")

    # --- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            # A refusal is final (bad credentials or ACL): stop paho from retrying forever.
            client.disconnect()
            return
        no_delay(client)  # a deploy published right after its manifest reached an agent 2-3 ms later
        self._connected.set()
        with self._lock:
            again = list(self._subscriptions.items())
        if again:
            client.subscribe(again)
        log.debug("connected", broker=str(self.address), client_id=self.client_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            log.warning("disconnected", broker=str(self.address), reason=str(reason))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        for code in codes:
            if code.is_failure:
                log.warning("subscription refused", mid=mid, reason=str(code))
        self._suback.setdefault(mid, threading.Event()).set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        handlers = self._routes.get(topic)
        if handlers is None:
            with self._lock:
                handlers = [h for f, h in self._handlers if matches(_strip_share(f), topic)]
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[topic] = handlers
        for handler in handlers:
            try:
                handler(topic, bytes(message.payload))
            except Exception:  # one bad handler must not kill paho's network thread
                self.handler_errors += 1
                log.exception("handler failed", topic=topic)


def _strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
