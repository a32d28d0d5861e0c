"""amqtt 0.12.1's Broker with the holes closed (docs/broker-holes.md).

We subclass instead of forking: every override below names the amqtt method it replaces and says what
changed. What stays amqtt's: listeners (TCP, TLS, WebSocket), the plugin manager (auth and topic
plugins), ``Session`` objects and packet encoding. One client connection is ``broker/connection.py``;
input is checked by ``broker/packet_rules.py`` and topics are matched by ``broker/topic_index.py``
(both pure); this module routes, indexes, persists (``broker/session_store.py``) and keeps sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from typing import Any

import structlog
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import (
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)
from amqtt.utils import gen_client_id

from broker import packet_rules as rules
from broker.connection import FleetbusSession, HardenedHandler, Limits, PacketTooLarge, read_packet
from broker.errors import MalformedPacket
from broker.session_store import QueuedMessage, SessionStore
from broker.topic_index import TopicTree, shared_subscription, topic_filter_problem

log = structlog.get_logger("fleetbus.broker")

_SUBACK_FAILURE = 0x80
_CONNACK_ACCEPTED = 0x00


class AllowAnonymousPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Admits every client; used only with ``allow_anonymous = true`` and no registry."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def _will_of(session: Session) -> tuple[str, bytes, int, bool] | None:
    if not session.will_flag or session.will_topic is None:
        return None
    return (
        session.will_topic,
        bytes(session.will_message or b""),
        session.will_qos or 0,
        bool(session.will_retain),
    )


class HardenedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with indexed topics, persistence, and the holes listed in docs/broker-holes.md."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        limits: Limits | None = None,
        store: SessionStore | None = None,
    ) -> None:
        super().__init__(config)
        self.limits = limits or Limits()
        self.store = store
        self.stats: Counter[str] = Counter()
        self._sub_tree = TopicTree()
        self._retained_tree = TopicTree()
        # inner filter -> the "$share/{group}/{filter}" keys of _subscriptions that use it
        self._shared: dict[str, set[str]] = {}
        self._share_cursor: dict[str, int] = {}
        self._session_subs: dict[str, dict[str, int]] = {}
        self._sub_pos: dict[str, dict[str, int]] = {}
        self._offline: dict[str, deque[QueuedMessage]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._shutting_down = False
        self._prune_at = 1024
        # amqtt's broadcast queue is unbounded: a flood grows it without limit. Bounded, a full queue
        # makes the publishing connections wait, and TCP back-pressure slows the flooder.
        self._broadcast_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(
            maxsize=self.limits.broadcast_backlog
        )

    # ---------------------------------------------------------------- start, stop, restore

    # Extends Broker._start_listeners: Broker.start() clears the tables first, so this is the one
    # place to load the stored state before the first client can connect.
    async def _start_listeners(self) -> None:
        self._shutting_down = False
        self._sub_tree = TopicTree()
        self._retained_tree = TopicTree()
        self._shared.clear()
        self._session_subs.clear()
        self._sub_pos.clear()
        self._offline.clear()
        if self.store is not None:
            self._restore(self.store)
        await super()._start_listeners()

    def _restore(self, store: SessionStore) -> None:
        for topic, payload, qos in store.retained():
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
            self._retained_tree.add(topic)
        for stored in store.sessions():
            handler, session = self.create_offline_session(stored.client_id)
            session.clean_session = False
            session.username = stored.username
            self._sessions[stored.client_id] = (session, handler)
            subs = self._session_subs.setdefault(stored.client_id, {})
            for topic_filter, qos in stored.subscriptions.items():
                self._put_subscriber(topic_filter, session, qos)
                subs[topic_filter] = qos
            if stored.queued:
                self._offline[stored.client_id] = deque(stored.queued)
        log.info(
            "restored broker state",
            retained=len(self._retained_messages),
            sessions=len(self._sessions),
            queued=sum(len(q) for q in self._offline.values()),
        )

    async def shutdown(self) -> None:
        # Broker.shutdown() cleans up every session and clears retained messages in memory; the
        # flag keeps those clean-ups out of the store, which must survive the restart.
        await self._flush_pending(timeout=2.0)
        self._shutting_down = True
        for task in list(self._drains.values()):
            task.cancel()
        if self.store is not None:
            self._save_inflight(self.store)
        await super().shutdown()
        if self.store is not None:
            self.store.close()

    async def _flush_pending(self, timeout: float) -> None:
        """Let publishes already acknowledged to their senders reach subscribers or offline queues.

        amqtt's shutdown drops whatever is still in the broadcast queue ("messages not broadcasted"),
        although the sender already has its PUBACK.
        """
        deadline = self._loop.time() + timeout
        while self._loop.time() < deadline:
            if self._broadcast_queue.empty():
                # One more turn for the broadcast task that may hold the last message.
                await asyncio.sleep(0.01)
                return
            await asyncio.sleep(0.005)

    def _save_inflight(self, store: SessionStore) -> None:
        """Queue the unacknowledged QoS 1/2 messages of persistent sessions, so a restart resends them."""
        for client_id, (session, _) in self._sessions.items():
            if session.clean_session:
                continue
            for message in session.inflight_out.values():
                # A QoS 2 message whose PUBREC arrived is the client's already; resending would duplicate it.
                if message.qos and message.pubrec_packet is None:
                    store.enqueue(client_id, message.topic, bytes(message.data), message.qos)

    # Replaces Broker.create_offline_session to build our handler.
    def create_offline_session(self, client_id: str) -> tuple[BrokerProtocolHandler, Session]:
        session = FleetbusSession()
        session.client_id = client_id
        session.transitions.disconnect()
        return self._new_handler(session), session

    def _new_handler(self, session: Session | None = None) -> HardenedHandler:
        handler = HardenedHandler(self.plugins_manager, session, limits=self.limits, stats=self.stats)
        handler.router = self
        return handler

    # Replaces Broker._session_monitor: amqtt purges every disconnected *anonymous* session, so with
    # AnonymousAuthPlugin no persistent session survived a disconnect. Clean sessions are removed
    # when they disconnect (_handle_disconnect); this loop only expires persistent ones.
    async def _session_monitor(self) -> None:
        expiry = self.config.session_expiry_interval
        while True:
            await asyncio.sleep(1)
            if expiry is None:
                continue
            deadline = time.time() - expiry
            for client_id, (session, _) in list(self._sessions.items()):
                last = session.last_disconnect_time
                if session.transitions.state == "disconnected" and last is not None and last < deadline:
                    self.stats["session_expired"] += 1
                    await self._cleanup_session(client_id)

    # ---------------------------------------------------------------- connect

    # Replaces Broker._initialize_client_session. amqtt waits for the first packet forever, parses
    # CONNECT leniently, and merges the new connection into an existing session *before*
    # authentication (so a refused client could take over a session). Here: a deadline for CONNECT,
    # strict checks with the right CONNACK codes, and nothing shared is touched yet.
    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        peer = f"{remote_address}:{remote_port}"
        try:
            packet = await asyncio.wait_for(
                read_packet(reader, max_remaining=self.limits.max_remaining_length, connected=False),
                self.limits.connect_timeout,
            )
            if packet is None:
                raise NoDataError("connection closed before CONNECT")
            request = rules.parse_connect(packet[1])
        except (TimeoutError, asyncio.TimeoutError):
            self.stats["connect_timeout"] += 1
            log.info("no CONNECT in time; closing", peer=peer, timeout=self.limits.connect_timeout)
            await _close(writer)
            raise NoDataError("no CONNECT in time") from None
        except MalformedPacket as exc:
            self.stats["packet_too_large" if isinstance(exc, PacketTooLarge) else "malformed_packet"] += 1
            log.warning("bad CONNECT; closing", peer=peer, reason=str(exc))
            await _close(writer)
            raise MQTTError(str(exc)) from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            await _close(writer)
            raise NoDataError("connection closed during CONNECT") from None
        if isinstance(request, rules.ConnectRefused):
            self.stats["connect_refused"] += 1
            log.info("CONNECT refused", peer=peer, code=request.return_code, reason=request.reason)
            await _send_connack(writer, request.return_code)
            raise MQTTError(request.reason)
        session = FleetbusSession()
        session.client_id = request.client_id or gen_client_id()
        session.clean_session = request.clean_session
        session.will_flag = request.will_topic is not None
        session.will_topic = request.will_topic
        session.will_message = request.will_message
        session.will_qos = request.will_qos
        session.will_retain = request.will_retain
        session.username = request.username
        session.password = request.password
        session.keep_alive = request.keep_alive
        session.remote_address = remote_address
        session.remote_port = remote_port
        session.ssl_object = writer.get_ssl_info()
        return self._new_handler(), session

    # Replaces Broker._handle_client_session (amqtt's signature, hence the positional arguments).
    async def _handle_client_session(  # noqa: PLR0917
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        assert isinstance(handler, HardenedHandler)
        client_id = client_session.client_id
        assert client_id is not None
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            self.stats["auth_refused"] += 1
            log.info("CONNECT not authorized", client_id=client_id, username=client_session.username)
            await _send_connack(writer, rules.CONNACK_NOT_AUTHORIZED)
            return
        will = _will_of(client_session)
        if will is not None and not await self._topic_filtering(client_session, will[0], Action.PUBLISH):
            self.stats["will_denied"] += 1
            log.warning("Will topic not allowed; CONNECT refused", client_id=client_id, topic=will[0])
            await _send_connack(writer, rules.CONNACK_NOT_AUTHORIZED)
            return
        session, present = await self._take_session(client_session)
        handler.will = will
        handler.attach(session, reader, writer)
        session.transitions.connect()
        self._sessions[client_id] = (session, handler)
        if self.store is not None and not session.clean_session:
            self.store.save_session(client_id, session.username)
        await handler._send_packet(ConnackPacket.build(present, _CONNACK_ACCEPTED))
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
        )
        await handler.start()
        if self._offline.get(client_id):
            self._drains[client_id] = asyncio.create_task(self._drain_offline(session, handler))
        # amqtt here sent every retained message matching *any* client's subscription to the new
        # client, at QoS 0 and without an ACL check, in a loop over all filters (O(N) per CONNECT,
        # O(N^2) to connect N clients). A resumed session gets retained messages only when it
        # subscribes again [MQTT-3.3.1-6], so there is nothing to do.
        await self._client_message_loop(session, handler)

    async def _take_session(self, incoming: Session) -> tuple[Session, int]:
        """The session this connection continues (and session-present), after closing any older connection."""
        client_id = incoming.client_id
        assert client_id is not None
        existing = self._sessions.get(client_id)
        if existing is None:
            return incoming, 0
        old_session, old_handler = existing
        if old_session.transitions.is_connected():
            # [MQTT-3.1.4-2]: the older network connection of the same client id is closed.
            self.stats["takeover"] += 1
            log.info("client id connected again; closing the older connection", client_id=client_id)
            await old_handler.handle_connection_closed()
            await old_handler.stop()
            old_session.transitions.disconnect()
        drain = self._drains.pop(client_id, None)
        if drain is not None:
            drain.cancel()
        if incoming.clean_session or old_session.clean_session or old_session.username != incoming.username:
            # A stored session belongs to the user that made it: another user gets a fresh one.
            await self._delete_session(client_id)
            return incoming, 0
        old_session.will_flag = incoming.will_flag
        old_session.will_topic = incoming.will_topic
        old_session.will_message = incoming.will_message
        old_session.will_qos = incoming.will_qos
        old_session.will_retain = incoming.will_retain
        old_session.keep_alive = incoming.keep_alive
        old_session.password = incoming.password
        old_session.remote_address = incoming.remote_address
        old_session.remote_port = incoming.remote_port
        old_session.ssl_object = incoming.ssl_object
        # The auth plugins wrote what they learnt (the principal) on the session they authenticated.
        old_session.attributes.update(incoming.attributes)
        old_session.is_anonymous = incoming.is_anonymous
        return old_session, 1

    # Replaces Broker._client_message_loop. amqtt ran four waiter tasks per client (disconnect,
    # subscribe, unsubscribe, delivery) around queues filled by the reader, asyncio.wait()-ed them for
    # every message, and after each SUBSCRIBE built `repr(self._subscriptions)` (O(N)) for a debug line
    # even with debug logging off. Our reader routes, subscribes and unsubscribes itself; this only
    # waits for the end of the connection.
    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        assert isinstance(handler, HardenedHandler)
        try:
            await asyncio.shield(handler.closed)
        except asyncio.CancelledError:
            await self._stop_handler(handler)
            return
        await self._handle_disconnect(client_session, handler, handler.closed)

    # Replaces Broker._handle_disconnect: the Will comes from the connection that ended (not from a
    # session a newer connection has since taken over), and a clean session is removed at once.
    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        result = disconnect_waiter.result()
        client_id = client_session.client_id
        assert client_id is not None
        will = handler.will if isinstance(handler, HardenedHandler) else None
        if not isinstance(result, DisconnectPacket) and will is not None and not self._shutting_down:
            topic, message, qos, retain = will
            self.stats["will_published"] += 1
            log.info("connection lost; publishing Will", client_id=client_id, topic=topic)
            await self._broadcast_message(client_session, topic, message, qos)
            if retain:
                await self.retain_message(client_session, topic, message, qos)
        await self._stop_handler(handler)
        current = self._sessions.get(client_id)
        if current is None or current[1] is not handler:
            return  # a newer connection owns this client id now
        client_session.transitions.disconnect()
        drain = self._drains.pop(client_id, None)
        if drain is not None:
            drain.cancel()
        if client_session.clean_session:
            # Before any await: a newer connection with this client id must not be cleaned up instead.
            await self._cleanup_session(client_id, stop=False)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=client_id, client_session=client_session
        )

    # ---------------------------------------------------------------- subscriptions

    # Replaces Broker._handle_subscription (called by our reader, not by a waiter task): retained
    # messages for a new subscription are looked up in the retained topic tree, checked against the
    # ACL, sent at min(QoS) and not awaited.
    async def subscribe(
        self, client_session: Session, handler: BrokerProtocolHandler, subscriptions: Subscription
    ) -> None:
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for (topic_filter, _), code in zip(subscriptions.topics, codes, strict=True):
            if code == _SUBACK_FAILURE:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=code,
            )
            if shared_subscription(topic_filter) is None:
                # Shared subscriptions get no retained messages (MQTT 5 §4.8.2, as Mosquitto does).
                await self._publish_retained_messages_for_subscription((topic_filter, code), client_session)

    # Replaces Broker.add_subscription. amqtt checked "already subscribed?" by scanning every
    # subscriber of the filter (O(N) per SUBSCRIBE, O(N^2) for N devices on a group filter) and kept
    # the old QoS on a repeated SUBSCRIBE instead of replacing it [MQTT-3.8.4-3].
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        client_id = session.client_id
        assert client_id is not None
        if topic_filter_problem(topic_filter) is not None:
            return _SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            self.stats["subscribe_denied"] += 1
            log.warning("subscription denied", client_id=client_id, topic_filter=topic_filter)
            return _SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        if isinstance(max_qos, int):
            qos = min(qos, max_qos)
        subs = self._session_subs.setdefault(client_id, {})
        self._put_subscriber(topic_filter, session, qos)
        subs[topic_filter] = qos
        if self.store is not None and not session.clean_session:
            self.store.put_subscription(client_id, topic_filter, qos)
        return qos

    # Replaces Broker._del_subscription (keeps the per-session index in step).
    def _del_subscription(self, a_filter: str, session: Session) -> int:
        client_id = session.client_id
        assert client_id is not None
        subs = self._session_subs.get(client_id)
        if subs is None or subs.pop(a_filter, None) is None:
            return 0
        self._drop_subscriber(a_filter, client_id)
        if self.store is not None and not session.clean_session and not self._shutting_down:
            self.store.drop_subscription(client_id, a_filter)
        return 1

    # amqtt keeps `_subscriptions[filter]` as a list and finds a client in it by scanning, so with N
    # devices on one shared filter (blob/+/+, a group's commands) every subscribe, unsubscribe and
    # clean-session reconnect cost O(N). The list stays (plugins read it); _sub_pos gives each
    # client's index in it, and removal moves the last entry into the hole: O(1).
    def _put_subscriber(self, topic_filter: str, session: Session, qos: int) -> None:
        client_id = session.client_id or ""
        entries = self._subscriptions.setdefault(topic_filter, [])
        positions = self._sub_pos.setdefault(topic_filter, {})
        index = positions.get(client_id)
        if index is None:
            positions[client_id] = len(entries)
            entries.append((session, qos))
            self._index_filter(topic_filter)
        else:
            entries[index] = (session, qos)

    def _drop_subscriber(self, topic_filter: str, client_id: str) -> None:
        entries = self._subscriptions.get(topic_filter)
        positions = self._sub_pos.get(topic_filter)
        if entries is None or positions is None or client_id not in positions:
            return
        index = positions.pop(client_id)
        last = entries.pop()
        if index < len(entries):
            entries[index] = last
            positions[last[0].client_id or ""] = index
        if not entries:
            del self._subscriptions[topic_filter]
            del self._sub_pos[topic_filter]
            self._unindex_filter(topic_filter)

    def _index_filter(self, topic_filter: str) -> None:
        shared = shared_subscription(topic_filter)
        if shared is None:
            self._sub_tree.add(topic_filter)
        else:
            self._shared.setdefault(shared[1], set()).add(topic_filter)
            self._sub_tree.add(shared[1])

    def _unindex_filter(self, topic_filter: str) -> None:
        """Forget a filter that has no subscriber left; the tree keeps it while anyone else uses it."""
        shared = shared_subscription(topic_filter)
        inner = topic_filter
        if shared is not None:
            inner = shared[1]
            keys = self._shared.get(inner, set())
            keys.discard(topic_filter)
            self._share_cursor.pop(topic_filter, None)
            if not keys:
                self._shared.pop(inner, None)
        if inner not in self._subscriptions and inner not in self._shared:
            self._sub_tree.discard(inner)

    def _share_member(self, key: str) -> tuple[Session, int] | None:
        """The next member of a shared subscription, round-robin over the connected ones.

        With nobody connected, a persistent member gets it queued; otherwise nobody does.
        """
        members = self._subscriptions.get(key)
        if not members:
            return None
        start = self._share_cursor.get(key, 0)
        count = len(members)
        for step in range(count):
            index = (start + step) % count
            session, qos = members[index]
            if session.transitions.state == "connected":
                self._share_cursor[key] = index + 1
                return session, qos
        for session, qos in members:
            if not session.clean_session:
                return session, qos
        return None

    # Replaces Broker._del_all_subscriptions, which walked every filter of every client.
    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._session_subs.get(session.client_id or "", {})):
            self._del_subscription(topic_filter, session)
        self._session_subs.pop(session.client_id or "", None)

    # Replaces Broker._delete_session and Broker._cleanup_session: also forget the stored copy
    # (unless the broker is shutting down) and the offline queue.
    async def _delete_session(self, client_id: str) -> None:
        await self._cleanup_session(client_id, stop=False)

    async def _cleanup_session(self, client_id: str, *, stop: bool = True) -> None:
        session, handler = self._sessions.pop(client_id, (None, None))
        if stop and handler is not None:
            await self._stop_handler(handler)
        if session is not None:
            await self._del_all_subscriptions(session)
            session.clear_queues()
        if not self._shutting_down:
            self._offline.pop(client_id, None)
            if self.store is not None:
                self.store.delete_session(client_id)

    # ---------------------------------------------------------------- publish

    # Replaces Broker._handle_message_delivery (called by our reader for each accepted PUBLISH): a
    # denied publish is logged and counted (MQTT 3.1.1 has no negative PUBACK, so the client still
    # gets its acknowledgement, as on Mosquitto), and the publish QoS travels with the message so
    # delivery can take min(publish, subscription).
    async def route(self, client_session: Session, app_message: IncomingApplicationMessage) -> None:
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
        )
        topic: str = app_message.topic
        if topic.startswith("$SYS"):
            self.stats["publish_denied"] += 1
            log.warning("publish to $SYS dropped", client_id=client_session.client_id, topic=topic)
            return
        if not await self._topic_filtering(client_session, topic, Action.PUBLISH):
            self.stats["publish_denied"] += 1
            log.warning("publish denied", client_id=client_session.client_id, topic=topic)
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
        )
        # Routed here, in the publisher's reader, rather than through amqtt's broadcast queue: the
        # publisher is the one that waits when a subscriber lags.
        await self._deliver(
            {"session": client_session, "topic": topic, "data": app_message.data, "qos": app_message.qos}
        )
        if app_message.retain:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)

    # Replaces Broker._broadcast_loop, which wrapped every message in a new task plus an
    # asyncio.wait() against the shutdown future, and pruned finished delivery tasks only from the
    # head of its deque (one slow acknowledgement kept every later finished task alive).
    async def _broadcast_loop(self) -> None:
        running = self._tasks_queue
        try:
            while True:
                await self._run_broadcast(running)
        except asyncio.CancelledError:
            pass
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(list(running), timeout=5)
                for task in running:
                    if task.done():
                        self._reap(task)
            running.clear()

    def _reap(self, task: asyncio.Future[Any]) -> bool:
        """Collect a finished delivery's outcome (a closed socket is routine); always True."""
        if not task.cancelled() and task.exception() is not None:
            self.stats["delivery_failed"] += 1
        return True

    # Replaces Broker._shutdown_broadcast_loop for the loop above: cancelling it is the signal.
    async def _shutdown_broadcast_loop(self) -> None:
        task = self._broadcast_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._broadcast_queue.empty():
            log.warning("messages not delivered at shutdown", count=self._broadcast_queue.qsize())
        self._broadcast_shutdown_waiter: asyncio.Future[Any] = asyncio.Future()

    # Replaces Broker._run_broadcast. amqtt tested the topic against every filter, delivered at the
    # subscription's QoS even when the publish had a lower one, and sent one copy per overlapping
    # subscription. Here: the subscription tree gives the matching filters, each client gets one copy
    # at min(publish QoS, highest matching subscription QoS) [MQTT-3.3.5-1], after the RECEIVE check.
    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        await self._deliver(await self._broadcast_queue.get())

    def _keep(self, task: asyncio.Task[Any]) -> None:
        running = self._tasks_queue
        running.append(task)
        if len(running) >= self._prune_at:
            alive = [t for t in running if not t.done() or not self._reap(t)]
            running.clear()
            running.extend(alive)
            self._prune_at = max(1024, 2 * len(running))

    async def _deliver(self, broadcast: dict[str, Any]) -> None:
        """Hand one message to every matching subscriber (or its offline queue)."""
        topic: str = broadcast["topic"]
        data: bytes = broadcast["data"]
        pub_qos: int | None = broadcast.get("qos")
        source = broadcast.get("session")
        targets: dict[str, tuple[Session, int]] = {}
        for topic_filter in self._sub_tree.filters_matching(topic):
            for target, sub_qos in self._subscriptions.get(topic_filter, ()):
                key = target.client_id or ""
                previous = targets.get(key)
                if previous is None or sub_qos > previous[1]:
                    targets[key] = (target, sub_qos)
            for share_key in self._shared.get(topic_filter, ()):
                member = self._share_member(share_key)
                if member is not None:
                    key = member[0].client_id or ""
                    previous = targets.get(key)
                    if previous is None or member[1] > previous[1]:
                        targets[key] = member
        if not targets:
            return
        filtering = self.plugins_manager.is_topic_filtering_enabled()
        qos0_packet: bytes | None = None
        for client_id, (target, sub_qos) in targets.items():
            qos = sub_qos if pub_qos is None else min(pub_qos, sub_qos)
            if filtering and not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                self.stats["receive_denied"] += 1
                continue
            if target.transitions.state != "connected":
                if not target.clean_session and qos > 0:
                    self._queue_offline(client_id, topic, data, qos)
                continue
            handler = self._sessions.get(client_id, (None, None))[1]
            if handler is None:
                continue
            hardened = isinstance(handler, HardenedHandler)
            # A client's own reader must not wait for itself: it is the one that reads the PUBACKs.
            if hardened and not await handler.make_room(qos, may_wait=target is not source):
                self.stats["dropped_slow_subscriber"] += 1
                continue
            if qos == 0 and hardened:
                if qos0_packet is None:
                    qos0_packet = rules.publish_qos0_bytes(topic, data)
                if handler.write_now(qos0_packet):
                    continue
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
            if hardened:
                handler.track(task, len(data))
            self._keep(task)

    def _queue_offline(self, client_id: str, topic: str, data: bytes, qos: int) -> None:
        queue = self._offline.setdefault(client_id, deque())
        if len(queue) >= self.limits.max_queued:
            self.stats["dropped_queue_full"] += 1
            return
        row_id = self.store.enqueue(client_id, topic, bytes(data), qos) if self.store is not None else 0
        queue.append(QueuedMessage(row_id, topic, bytes(data), qos))

    # Replaces Broker._publish_session_retained_messages, which sent queued offline messages with
    # retain=1 and blocked the new connection until all were acknowledged. Here they go out with
    # retain=0 [MQTT-3.3.1-9], a window at a time, each removed from the store once acknowledged.
    async def _drain_offline(
        self, session: Session, handler: BrokerProtocolHandler, window: int = 32
    ) -> None:
        client_id = session.client_id or ""
        queue = self._offline.get(client_id)
        try:
            while queue:
                batch = [queue[i] for i in range(min(window, len(queue)))]
                await asyncio.gather(
                    *(handler.mqtt_publish(m.topic, m.payload, m.qos, retain=False) for m in batch)
                )
                for message in batch:
                    queue.popleft()
                    if self.store is not None:
                        self.store.dequeue(message.row_id)
        except asyncio.CancelledError:
            pass  # the client went away again; what is left stays queued
        except Exception:
            self.stats["delivery_failed"] += 1
            log.exception("sending the offline queue failed; it stays queued", client_id=client_id)
        finally:
            if self._drains.get(client_id) is asyncio.current_task():
                del self._drains[client_id]

    # Replaces Broker._publish_retained_messages_for_subscription: the retained tree instead of a
    # scan, the ACL's RECEIVE check, and the publishes handed to the broadcast task list instead of
    # being awaited inside the client's message loop.
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        filtering = self.plugins_manager.is_topic_filtering_enabled()
        for topic in sorted(self._retained_tree.topics_matching(topic_filter)):
            retained = self._retained_messages.get(topic)
            if retained is None:
                continue
            if filtering and not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                self.stats["receive_denied"] += 1
                continue
            send_qos = qos if retained.qos is None else min(qos, retained.qos)
            task = asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, send_qos, retain=True))
            if isinstance(handler, HardenedHandler):
                # Counted as pending so that no later live message overtakes it (write_now).
                handler.track(task, len(retained.data))
            self._keep(task)

    # Replaces Broker.retain_message: keeps the retained tree and the store in step.
    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is None:
            return
        if data:
            message = RetainedApplicationMessage(None, topic_name, bytes(data), qos)
            self._retained_messages[topic_name] = message
            self._retained_tree.add(topic_name)
            if self.store is not None:
                self.store.put_retained(topic_name, bytes(data), qos or 0)
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=message
            )
        elif topic_name in self._retained_messages:
            # [MQTT-3.3.1-10]: an empty retained message clears the topic.
            cleared = self._retained_messages.pop(topic_name)
            self._retained_tree.discard(topic_name)
            if self.store is not None:
                self.store.drop_retained(topic_name)
            cleared.data = b""
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=cleared
            )

    # Replaces Broker._handle_unsubscription (called by our reader; the store is updated in
    # _del_subscription).
    async def unsubscribe(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscription: UnSubscription
    ) -> None:
        for topic in unsubscription.topics:
            self._del_subscription(topic, client_session)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=client_session.client_id, topic=topic
            )
        await handler.mqtt_acknowledge_unsubscription(unsubscription.packet_id)


async def _send_connack(writer: WriterAdapter, code: int) -> None:
    # Session present is 0 with any non-zero return code [MQTT-3.2.2-4].
    with contextlib.suppress(Exception):
        writer.write(bytes([0x20, 0x02, 0x00, code]))
        await writer.drain()
    await _close(writer)


async def _close(writer: WriterAdapter) -> None:
    with contextlib.suppress(Exception):
        await writer.close()
