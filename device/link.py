"""The agent's MQTT link: one paho client, reconnecting on its own, feeding a queue.

Everything that arrives is put on the agent's event queue as it is (topic, payload, retain flag);
the agent's single main thread does all the work, so no protocol state is shared with paho's thread,
except one hint: ``on_arrival`` sees each message first, in paho's thread (the agent subscribes to a
deploy's chunks there, before its queue is read).  Before every (re)connect the link asks the agent
for a fresh Last Will (Sparkplug: the death certificate carries the bdseq of the birth that follows),
and after every connect it posts a ``connected`` event so the agent publishes its birth,
resubscribes and resends its bitmap.
"""

from __future__ import annotations

import contextlib
import queue
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from device.config import MqttSection

log = structlog.get_logger("device.link")

Event = tuple[str, Any]


def no_delay(client: mqtt.Client) -> None:
    """Turn Nagle off on a connected client's TCP socket (paho leaves it on).

    With it on, a small publish (a fetch, a state report, a deploy after its manifest) that follows
    another one not yet acknowledged waits for the broker's delayed ACK: up to 40 ms on Linux.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Link:
    """A paho client bound to one agent."""

    def __init__(
        self,
        client_id: str,
        settings: MqttSection,
        events: queue.Queue[Event],
        will: Callable[[], tuple[str, bytes]],
        on_arrival: Callable[[str, bytes | bytearray], None] | None = None,
    ) -> None:
        self._events = events
        self._will = will
        self._on_arrival = on_arrival
        self._settings = settings
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            # ssl costs ~14 MiB of RSS, so it is imported only when TLS is on (paho imports it lazily too).
            import ssl

            ctx = ssl.create_default_context(cafile=settings.cafile or None)
            self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.on_pre_connect = self._on_pre_connect
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.connected = False

    def start(self) -> None:
        self.client.connect_async(
            self._settings.host, self._settings.port, keepalive=self._settings.keepalive
        )
        self.client.loop_start()

    def stop(self, farewell: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; ``farewell`` (topic, payload) is published retained first (the death)."""
        if farewell is not None and self.connected:
            info = self.client.publish(farewell[0], farewell[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        # While offline paho queues QoS>0 messages for the next session; QoS 0 ones are dropped.
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        if topics:
            self.client.subscribe([(t, qos) for t in topics])

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    # --- paho callbacks (paho's thread) ---

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        topic, payload = self._will()
        client.will_set(topic, payload, qos=1, retain=True)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("connect_refused", reason=str(reason))
            return
        self.connected = True
        no_delay(client)
        self._events.put(("connected", None))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected = False
        self._events.put(("disconnected", str(reason)))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_arrival is not None:
            try:
                self._on_arrival(msg.topic, msg.payload)
            except Exception:  # a hint only: the agent's thread handles the message in any case
                log.exception("arrival_hook_failed", topic=msg.topic)
        self._events.put(("message", (msg.topic, msg.payload, bool(msg.retain))))
