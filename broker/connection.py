"""One client connection of the hardened broker: a strict reader, keepalive, and the QoS flows.

``HardenedHandler`` subclasses amqtt's ``BrokerProtocolHandler``; each override names the amqtt method
it replaces. It reads whole packets, has ``broker/packet_rules.py`` (pure) check them, and hands
publishes, subscriptions and unsubscriptions straight to the broker (``broker/hardening.py``), which
routes them. ``FleetbusSession`` is amqtt's ``Session`` with a cheap state table.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.errors import NoDataError
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import (
    OUTGOING,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

from broker import packet_rules as rules
from broker.errors import MalformedPacket

if TYPE_CHECKING:
    from broker.hardening import HardenedBroker

log = structlog.get_logger("fleetbus.broker")

# Above this many bytes waiting in a subscriber's socket buffer, QoS 0 goes through the queue again
# (asyncio's own high-water mark is 64 KiB).
_DIRECT_WRITE_LIMIT = 64 * 1024
# Approximate memory of one pending delivery besides its payload (task, coroutine, message, packet).
_PENDING_OVERHEAD = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits; ``broker/server.py`` fills them from ``BrokerSettings``."""

    max_payload_bytes: int = 1024 * 1024 + 64 * 1024
    keepalive_grace: float = 1.5
    connect_timeout: float = 10.0
    max_inflight: int = 60_000
    max_pending_bytes: int = 32 * 1024 * 1024
    lag_timeout: float = 5.0
    max_queued: int = 10_000
    broadcast_backlog: int = 10_000

    @property
    def max_remaining_length(self) -> int:
        # PUBLISH overhead on top of the payload: topic (2 + at most 65,535 bytes) and packet id (2).
        return min(self.max_payload_bytes + 2 + 65_535 + 2, rules.MAX_REMAINING_LENGTH)


class PacketTooLarge(MalformedPacket):
    """A packet whose remaining length is over the configured limit; its body is never read."""


# Session.transitions is a `transitions.Machine` in amqtt: building one costs about 0.6 ms and
# ~10 KB per connection, a third of the CPU of a CONNECT. The table below is the same machine
# (amqtt.session.Session._init_states) as a dict.
_SESSION_TRANSITIONS: dict[tuple[str, str], str] = {
    ("new", "connect"): "connected",
    ("disconnected", "connect"): "connected",
    ("connected", "disconnect"): "disconnected",
    ("new", "disconnect"): "disconnected",
    ("disconnected", "disconnect"): "disconnected",
}


class SessionStates:
    """The ``transitions`` API amqtt and our plugins use: ``state``, ``connect()``, ``disconnect()``."""

    __slots__ = ("_session", "state")

    def __init__(self, session: FleetbusSession) -> None:
        self._session = session
        self.state = "new"

    def _fire(self, trigger: str) -> None:
        target = _SESSION_TRANSITIONS.get((self.state, trigger))
        if target is None:
            # amqtt catches MachineError and ValueError here; MachineError needs `transitions` state.
            raise ValueError(f"can't trigger {trigger} from state {self.state}")
        self.state = target
        if target == "connected":
            self._session._on_enter_connected()
        else:
            self._session._on_enter_disconnected()

    def connect(self) -> None:
        self._fire("connect")

    def disconnect(self) -> None:
        self._fire("disconnect")

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def is_new(self) -> bool:
        return self.state == "new"


# amqtt gives every session two queues and every handler two more (about 2.4 KB each with their
# Events). The hardened broker routes from the reader (HardenedHandler._dispatch) and keeps offline
# messages in its own deques, so those four are never filled: they all point at this one, which stays
# empty. Only .empty()/.qsize() are ever called on it, so it binds to no event loop.
_UNUSED_QUEUE: asyncio.Queue[Any] = asyncio.Queue()


class FleetbusSession(Session):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's Session with ``transitions`` replaced by ``SessionStates`` (same states and API)."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = _UNUSED_QUEUE
        self.delivered_message_queue = _UNUSED_QUEUE

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


async def read_packet(
    reader: ReaderAdapter, *, max_remaining: int, connected: bool
) -> tuple[int, bytes] | None:
    """One whole packet as (first byte, body), or None at a clean end of stream.

    The remaining length is checked before the body is read, so an oversized packet costs its header.
    """
    try:
        first = await reader.read(1)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if not first:
        return None
    rules.check_fixed_header(first[0], connected=connected)
    encoded = b""
    length: int | None = None
    while length is None:
        byte = await reader.read(1)
        if not byte:  # the WebSocket reader returns b"" at the end instead of raising
            raise asyncio.IncompleteReadError(encoded, None)
        encoded += byte
        length = rules.decode_remaining_length(encoded)
    if length > max_remaining:
        raise PacketTooLarge(f"remaining length {length} is over the {max_remaining}-byte limit")
    body = await reader.read(length) if length else b""
    if len(body) != length:
        raise asyncio.IncompleteReadError(body, length)
    return first[0], body


class HardenedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's BrokerProtocolHandler with a strict reader, keepalive, and redelivery of QoS 1."""

    def __init__(
        self,
        plugins_manager: PluginManager[Any],
        session: Session | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits | None = None,
        stats: Counter[str] | None = None,
    ) -> None:
        super().__init__(plugins_manager, session, loop)
        self._pending_subscriptions = _UNUSED_QUEUE
        self._pending_unsubscriptions = _UNUSED_QUEUE
        self.router: HardenedBroker | None = None
        # Resolved once, with the DISCONNECT packet or None (connection lost); unlike amqtt's
        # _disconnect_waiter it is never reset, so a DISCONNECT read before anyone waits is not lost.
        self.closed: asyncio.Future[DisconnectPacket | None] = self._loop.create_future()
        self.limits = limits or Limits()
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.will: tuple[str, bytes, int, bool] | None = None
        # Deliveries handed to this connection and not finished yet (written for QoS 0, acknowledged
        # for QoS 1/2): bounded so that a subscriber that stops reading cannot grow the broker.
        self.pending_sends = 0
        self.pending_bytes = 0
        # Set while there is room under the pending limits; a lagging subscriber is waited for.
        self._room = asyncio.Event()
        self._room.set()
        self.stuck = False
        self._last_packet = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    # Replaces amqtt.mqtt.protocol.handler.ProtocolHandler._reader_loop. amqtt waits for each fixed
    # header with the keepalive as timeout and then ignores the timeout (handle_read_timeout is a
    # no-op), reads a body with no timeout and no size limit, and after a decode error keeps reading
    # from the middle of the stream. Here: whole packets, checked by packet_rules; any violation
    # closes the connection (§4.8); a client silent for keepalive_grace x its keepalive is dropped
    # and its Will published [MQTT-3.1.2-24].
    async def _reader_loop(self) -> None:
        session = self.session
        assert session is not None
        assert self._reader_ready is not None
        assert self.reader is not None
        client_id = session.client_id
        keepalive = session.keep_alive
        self._last_packet = self._loop.time()
        if keepalive > 0:
            self._arm_watchdog(keepalive * self.limits.keepalive_grace)
        max_remaining = self.limits.max_remaining_length
        self._reader_ready.set()
        try:
            while True:
                packet = await read_packet(self.reader, max_remaining=max_remaining, connected=True)
                if packet is None:
                    break
                self._last_packet = self._loop.time()
                first, body = packet
                if not await self._dispatch(first >> 4, first & 0x0F, body):
                    break
        except PacketTooLarge as exc:
            self.stats["packet_too_large"] += 1
            log.warning("packet over the size limit; closing", client_id=client_id, reason=str(exc))
        except MalformedPacket as exc:
            self.stats["malformed_packet"] += 1
            log.warning("protocol violation; closing", client_id=client_id, reason=str(exc))
        except asyncio.CancelledError:
            if self._timed_out:
                self.stats["keepalive_timeout"] += 1
                log.info("keepalive expired; closing", client_id=client_id, keepalive=keepalive)
        except (asyncio.IncompleteReadError, ConnectionError, NoDataError, OSError):
            pass
        except Exception:
            self.stats["reader_error"] += 1
            log.exception("unexpected error reading from client; closing", client_id=client_id)
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _arm_watchdog(self, timeout: float) -> None:
        # One timer per connection instead of a timeout around every read: cheaper on the hot path.
        def check() -> None:
            idle = self._loop.time() - self._last_packet
            if idle >= timeout:
                self._timed_out = True
                if self._reader_task is not None:
                    self._reader_task.cancel()
            else:
                self._watchdog = self._loop.call_later(timeout - idle, check)

        self._watchdog = self._loop.call_later(timeout, check)

    async def _dispatch(self, packet_type: int, flags: int, body: bytes) -> bool:
        """Act on one checked packet; False ends the connection."""
        session = self.session
        assert session is not None
        if packet_type == rules.PUBLISH:
            publish = rules.parse_publish(flags, body)
            if len(publish.payload) > self.limits.max_payload_bytes:
                limit = self.limits.max_payload_bytes
                raise PacketTooLarge(
                    f"payload of {len(publish.payload)} bytes is over the {limit}-byte limit"
                )
            await self._accept_publish(publish)
        elif packet_type == rules.PUBACK:
            waiter = self._puback_waiters.get(rules.parse_packet_id(packet_type, body))
            if waiter is not None and not waiter.done():
                waiter.set_result(PubackPacket.build(0))
        elif packet_type == rules.PUBREC:
            await self.handle_pubrec(PubrecPacket.build(rules.parse_packet_id(packet_type, body)))
        elif packet_type == rules.PUBREL:
            packet_id = rules.parse_packet_id(packet_type, body)
            message = session.inflight_in.pop(packet_id, None)
            if message is not None and self.router is not None:
                await self.router.route(session, message)
            # [MQTT-4.3.3-1]: answer every PUBREL, also one whose PUBLISH we no longer hold.
            await self._send_packet(PubcompPacket.build(packet_id))
        elif packet_type == rules.PUBCOMP:
            await self.handle_pubcomp(PubcompPacket.build(rules.parse_packet_id(packet_type, body)))
        elif packet_type == rules.SUBSCRIBE:
            sub = rules.parse_subscribe(body)
            if self.router is not None:
                await self.router.subscribe(session, self, Subscription(sub.packet_id, list(sub.topics)))
        elif packet_type == rules.UNSUBSCRIBE:
            unsub = rules.parse_unsubscribe(body)
            if self.router is not None:
                await self.router.unsubscribe(
                    session, self, UnSubscription(unsub.packet_id, list(unsub.topics))
                )
        elif packet_type == rules.PINGREQ:
            rules.check_empty(packet_type, body)
            await self._send_packet(PingRespPacket.build())
        elif packet_type == rules.DISCONNECT:
            rules.check_empty(packet_type, body)
            await self.handle_disconnect(DisconnectPacket())
            return False
        return True

    # Replaces ProtocolHandler.handle_publish + the INCOMING half of _handle_qos*_message_flow.
    # amqtt runs each incoming PUBLISH in its own task, through an unbounded queue to a second task
    # per client, and for QoS 2 a PUBREL waiter that a duplicate PUBLISH cancels. Here the reader
    # routes the message itself (the broadcast queue is bounded, so a flooding client waits, and TCP
    # back-pressure slows it) and only then acknowledges it.
    async def _accept_publish(self, publish: rules.Publish) -> None:
        session = self.session
        assert session is not None
        message = IncomingApplicationMessage(
            publish.packet_id, publish.topic, publish.qos, publish.payload, publish.retain
        )
        if publish.qos == 0:
            if self.router is not None:
                await self.router.route(session, message)
        elif publish.qos == 1:
            assert publish.packet_id is not None
            if self.router is not None:
                await self.router.route(session, message)
            await self._send_packet(PubackPacket.build(publish.packet_id))
        else:
            assert publish.packet_id is not None
            # Method B of §4.3.3: hold until PUBREL, deliver once even if the PUBLISH is repeated.
            session.inflight_in.setdefault(publish.packet_id, message)
            await self._send_packet(PubrecPacket.build(publish.packet_id))

    # Replaces the OUTGOING half of ProtocolHandler._handle_qos1_message_flow. amqtt gives up after
    # 5 s without PUBACK and drops the message from inflight_out, also when the connection merely
    # closed, so nothing is redelivered on reconnect. Here the message stays in the session's
    # inflight_out until acknowledged; _retry_deliveries resends it with DUP on the next connection
    # of a persistent session [MQTT-4.4.0-1].
    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        session = self.session
        if app_message.direction != OUTGOING or session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        assert isinstance(app_message, OutgoingApplicationMessage)
        assert app_message.packet_id is not None
        packet_id = app_message.packet_id
        session.inflight_out[packet_id] = app_message
        waiter: asyncio.Future[PubackPacket] = self._loop.create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
            session.inflight_out.pop(packet_id, None)
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]

    # Replaces the OUTGOING half of ProtocolHandler._handle_qos2_message_flow, for the same reasons:
    # no 5 s timeouts, and the message leaves inflight_out only at PUBCOMP. On a resend, a message
    # whose PUBREC arrived goes on with PUBREL, otherwise the PUBLISH is repeated with DUP [§4.4].
    async def _handle_qos2_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        session = self.session
        if app_message.direction != OUTGOING or session is None:
            await super()._handle_qos2_message_flow(app_message)
            return
        assert isinstance(app_message, OutgoingApplicationMessage)
        assert app_message.packet_id is not None
        packet_id = app_message.packet_id
        session.inflight_out[packet_id] = app_message
        if app_message.pubrec_packet is None:
            rec_waiter: asyncio.Future[PubrecPacket] = self._loop.create_future()
            self._pubrec_waiters[packet_id] = rec_waiter
            try:
                packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
                await self._send_packet(packet)
                app_message.publish_packet = packet
                app_message.pubrec_packet = await rec_waiter
            finally:
                if self._pubrec_waiters.get(packet_id) is rec_waiter:
                    del self._pubrec_waiters[packet_id]
        comp_waiter: asyncio.Future[PubcompPacket] = self._loop.create_future()
        self._pubcomp_waiters[packet_id] = comp_waiter
        try:
            app_message.pubrel_packet = PubrelPacket.build(packet_id)
            await self._send_packet(app_message.pubrel_packet)
            app_message.pubcomp_packet = await comp_waiter
            session.inflight_out.pop(packet_id, None)
        finally:
            if self._pubcomp_waiters.get(packet_id) is comp_waiter:
                del self._pubcomp_waiters[packet_id]

    # Replaces ProtocolHandler._retry_deliveries, which awaited every resend (10 s each) before the
    # broker could serve the new connection, and replayed incoming QoS 2 flows by sending PUBRECs the
    # client had not asked for. Incoming QoS 2 messages simply wait in inflight_in for their PUBREL.
    async def _retry_deliveries(self) -> None:
        session = self.session
        if session is None:
            return
        for message in list(session.inflight_out.values()):
            task = asyncio.ensure_future(self._handle_message_flow(message))
            task.add_done_callback(_swallow)

    def handle_write_timeout(self) -> None:
        pass

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        if not self.closed.done():
            self.closed.set_result(disconnect)
        await super().handle_disconnect(disconnect)

    def write_now(self, packet: bytes) -> bool:
        """Write a whole QoS 0 PUBLISH at once when nothing is queued before it and the socket keeps up.

        Saves amqtt's task, message object and encoding per subscriber; False means "take the queue".
        """
        writer = self.writer
        if self.pending_sends or not isinstance(writer, StreamWriterAdapter) or writer.is_closed:
            return False
        transport = writer._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > _DIRECT_WRITE_LIMIT:
            return False
        transport.write(packet)
        return True

    def has_room(self) -> bool:
        return (
            self.pending_sends < self.limits.max_inflight
            and self.pending_bytes < self.limits.max_pending_bytes
        )

    async def make_room(self, qos: int, *, may_wait: bool = True) -> bool:
        """Whether one more delivery may be handed to this connection.

        QoS 0 over the limits is dropped at once. For QoS 1/2 the publisher's reader waits up to
        ``lag_timeout`` for a lagging subscriber (back-pressure instead of loss); a subscriber that
        does not catch up is marked stuck and gets nothing more until it has drained half its backlog.
        """
        if self.has_room():
            return True
        if qos == 0 or self.stuck or not may_wait:
            return False
        self._room.clear()
        try:
            await asyncio.wait_for(self._room.wait(), self.limits.lag_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self.stuck = True
            return False
        return True

    def track(self, task: asyncio.Future[Any], payload_size: int) -> None:
        # A pending delivery also holds a task, a message object and a packet: count those too.
        size = payload_size + _PENDING_OVERHEAD
        self.pending_sends += 1
        self.pending_bytes += size

        def done(_: asyncio.Future[Any]) -> None:
            self.pending_sends -= 1
            self.pending_bytes -= size
            if self.has_room():
                self._room.set()
                if self.stuck and self.pending_bytes < self.limits.max_pending_bytes // 2:
                    self.stuck = False

        task.add_done_callback(done)


def _swallow(task: asyncio.Future[Any]) -> None:
    # Resends end with CancelledError or a closed socket when the client goes away again; that is fine.
    if not task.cancelled():
        task.exception()
