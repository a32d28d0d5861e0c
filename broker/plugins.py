"""amqtt 0.12.1 plugins: registry-backed authentication and the topic ACL of broker/acl.py.

List them in amqtt's ``plugins:`` config (``plugin_config()`` builds this dict):

    plugins:
      broker.plugins.FleetbusAuthPlugin:
        registry: /path/fleetbus-registry.json   # required
        allow_anonymous: false                   # clients without a username are refused
        anonymous_role: reader                   # rights of anonymous clients when allowed
        poll_interval: 0.5                       # seconds between registry mtime checks
      broker.plugins.FleetbusAclPlugin:
        registry: /path/fleetbus-registry.json   # the same file

Both plugins share one ``Registry`` object per file (``shared_registry``), so one verification cache.
The auth plugin checks username/password (argon2, with the registry's cache of successful checks) on
up to one worker thread per core, refuses revoked principals, and watches the registry file: when a
principal is revoked, its live connections are closed at once (no broker restart). The ACL plugin
looks the principal up by the session's username on every decision (a dict lookup), so revocations
and group changes apply to the next PUBLISH, SUBSCRIBE or delivery, also for sessions restored from
persistence; an anonymous session (``allow_anonymous``) carries its principal in
``session.attributes[PRINCIPAL_KEY]``.

Other refusals at CONNECT, each logged and counted:

* a Will whose topic the principal may not publish to (amqtt publishes Wills without any ACL check,
  so a device could otherwise plant a forged command as its Will and then drop the connection);
* a device whose client id is not its own id, or anyone whose client id is a registered device id
  other than its own: a session is keyed by client id, so this is what stops one device from taking
  over (and inheriting the subscriptions of) another device's persistent session;
* resuming a persistent session that belongs to a different principal.

amqtt facts the plugins live with (broker.py, 0.12.1): a publish the ACL denies is dropped but still
PUBACKed (``_handle_message_delivery``), so publishers cannot see the denial; a subscription the ACL
denies gets return code 0x80 in the SUBACK (``add_subscription``); ``topic_filtering`` is also called
with ``Action.RECEIVE`` for every delivery, where we re-check the concrete topic and refuse sessions of
revoked principals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker import acl
from broker.errors import RegistryError
from broker.registry import Principal, Registry, Role

log = structlog.get_logger("fleetbus.broker.access")

PRINCIPAL_KEY = "fleetbus.principal"
ANONYMOUS_ID = "anonymous"
AUTH_PLUGIN = "broker.plugins.FleetbusAuthPlugin"
ACL_PLUGIN = "broker.plugins.FleetbusAclPlugin"
# One argon2 check per core at most (argon2-cffi releases the GIL), so a reconnect storm uses the CPU
# without starving the event loop of connected clients, and memory stays at workers x 19 MiB.
_ARGON2_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class AccessCounters:
    """Counts of access decisions, for /metrics or a health message; plain ints, no dependencies."""

    auth_ok: int = 0
    auth_failed: int = 0
    anonymous_refused: int = 0
    revoked_refused: int = 0
    client_id_refused: int = 0
    will_denied: int = 0
    publish_denied: int = 0
    subscribe_denied: int = 0
    receive_denied: int = 0
    revoked_disconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for name in self.as_dict():
            setattr(self, name, 0)


COUNTERS = AccessCounters()


def plugin_config(
    registry: Path | str, *, allow_anonymous: bool = False, anonymous_role: str = "reader"
) -> dict[str, Any]:
    """The ``plugins`` entries of an amqtt config for these two plugins."""
    return {
        AUTH_PLUGIN: {
            "registry": str(registry),
            "allow_anonymous": allow_anonymous,
            "anonymous_role": anonymous_role,
        },
        ACL_PLUGIN: {"registry": str(registry)},
    }


_registries: dict[Path, Registry] = {}


def shared_registry(path: Path | str) -> Registry:
    """One Registry (and one verification cache) per file for all plugins of this process."""
    key = Path(path).resolve()
    registry = _registries.get(key)
    if registry is None:
        registry = _registries[key] = Registry.load(key)
    return registry


def session_principal(session: Session | None, registry: Registry | None = None) -> Principal | None:
    """Who ``session`` belongs to now: its username's registry entry, or the anonymous principal.

    The username of a live or stored session is always one that authenticated (amqtt re-authenticates
    a resumed session, and our broker gives a fresh session to a different user), so looking it up
    again follows revocations and group changes without any copy to keep in step.
    """
    if session is None:
        return None
    if session.username and registry is not None:
        return registry.find(session.username)
    principal = session.attributes.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else None


class FleetbusAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Registry-backed CONNECT check; also disconnects principals revoked while connected."""

    @dataclass
    class Config:
        registry: str = ""
        """Path of the principal registry (broker/registry.py); required."""
        allow_anonymous: bool = False
        anonymous_role: str = "reader"
        poll_interval: float = 0.5

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        cfg: FleetbusAuthPlugin.Config = self.config
        if not cfg.registry:
            raise RegistryError("FleetbusAuthPlugin needs 'registry': the path of the principal registry")
        if cfg.anonymous_role not in (Role.OPERATOR.value, Role.READER.value):
            raise RegistryError("anonymous_role must be 'operator' or 'reader' (a device needs an identity)")
        self.registry = shared_registry(cfg.registry)
        self._executor = ThreadPoolExecutor(max_workers=_ARGON2_WORKERS, thread_name_prefix="fleetbus-argon2")
        self._watcher: asyncio.Task[None] | None = None

    # --- CONNECT ------------------------------------------------------------------------------------

    async def authenticate(self, *, session: Session) -> bool | None:
        self._ensure_watcher()
        cfg: FleetbusAuthPlugin.Config = self.config
        client_id = session.client_id
        if not session.username:
            if not cfg.allow_anonymous:
                COUNTERS.anonymous_refused += 1
                log.warning("connect_refused", client_id=client_id, reason="anonymous access is disabled")
                return False
            principal = Principal(ANONYMOUS_ID, Role(cfg.anonymous_role))
        else:
            verified = await self._verify(session.username, session.password or "")
            if verified is None:
                known = self.registry.find(session.username)
                if known is not None and known.revoked:
                    COUNTERS.revoked_refused += 1
                    reason = "principal is revoked"
                else:
                    COUNTERS.auth_failed += 1
                    reason = "unknown username or wrong password"
                log.warning("connect_refused", client_id=client_id, username=session.username, reason=reason)
                return False
            principal = verified
        refusal = self._session_refusal(session, principal)
        if refusal is not None:
            log.warning("connect_refused", client_id=client_id, username=session.username, reason=refusal)
            return False
        session.attributes[PRINCIPAL_KEY] = principal
        COUNTERS.auth_ok += 1
        log.debug("connect_accepted", client_id=client_id, principal=principal.id, role=principal.role.value)
        return True

    async def _verify(self, username: str, password: str) -> Principal | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.registry.verify, username, password)
        except RegistryError as exc:
            # A broken registry file must not crash the broker; refuse until it is fixed.
            log.error("registry_unreadable", error=str(exc))
            return None

    def _session_refusal(self, session: Session, principal: Principal) -> str | None:
        client_id = session.client_id or ""
        if principal.role is Role.DEVICE and client_id != principal.id:
            COUNTERS.client_id_refused += 1
            return f"a device must connect with its id as client id (got {client_id!r})"
        owner = self.registry.find(client_id)
        if owner is not None and owner.role is Role.DEVICE and owner.id != principal.id:
            COUNTERS.client_id_refused += 1
            return f"client id {client_id!r} belongs to another device"
        previous = session.attributes.get(PRINCIPAL_KEY)
        if isinstance(previous, Principal) and previous.id != principal.id:
            COUNTERS.client_id_refused += 1
            return f"persistent session {client_id!r} belongs to {previous.id!r}"
        if session.will_flag and session.will_topic is not None:
            decision = acl.decide(
                principal.role.value, principal.id, principal.groups, "publish", session.will_topic
            )
            if not decision.allowed:
                COUNTERS.will_denied += 1
                return f"will topic refused: {decision.reason}"
        return None

    # --- revocation ---------------------------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_registry())

    async def on_broker_post_start(self, **_: Any) -> None:
        self._ensure_watcher()

    async def _watch_registry(self) -> None:
        cfg: FleetbusAuthPlugin.Config = self.config
        last_error = ""
        while True:
            await asyncio.sleep(cfg.poll_interval)
            try:
                changed = self.registry.reload_if_changed()
            except RegistryError as exc:
                # The last good copy stays in force; say so once, not twice a second.
                if str(exc) != last_error:
                    log.error("registry_unreadable", error=str(exc), keeping="the last good copy")
                    last_error = str(exc)
                continue
            last_error = ""
            if changed:
                await self.apply_registry()

    async def apply_registry(self) -> None:
        """Close the live connections of principals that are now revoked or gone."""
        broker = getattr(self.context, "_broker_instance", None)
        sessions: dict[str, tuple[Session, Any]] = getattr(broker, "sessions", {}) if broker else {}
        for client_id, (session, handler) in list(sessions.items()):
            if not session.username:
                continue
            current = self.registry.find(session.username)
            if current is not None and not current.revoked:
                continue
            if session.transitions.state == "connected" and handler is not None:
                COUNTERS.revoked_disconnects += 1
                log.warning("revoked_disconnect", client_id=client_id, principal=session.username)
                # The call amqtt makes for a broken connection: the client loop sees the disconnect,
                # publishes the Will and closes the socket.
                with contextlib.suppress(Exception):
                    await handler.handle_connection_closed()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._executor.shutdown(wait=False, cancel_futures=True)


class FleetbusAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Every PUBLISH, SUBSCRIBE and delivery is decided by broker.acl.decide()."""

    @dataclass
    class Config:
        registry: str = ""
        """Path of the principal registry; without it only anonymous principals have rights."""
        poll_interval: float = 0.5

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        cfg: FleetbusAclPlugin.Config = self.config
        self.registry = shared_registry(cfg.registry) if cfg.registry else None
        self._next_reload = 0.0

    def _principal(self, session: Session | None) -> Principal | None:
        # The auth plugin's watcher reloads too; this keeps the ACL current if it is used alone.
        if self.registry is not None and time.monotonic() >= self._next_reload:
            self._next_reload = time.monotonic() + self.config.poll_interval
            with contextlib.suppress(RegistryError):
                self.registry.reload_if_changed()
        return session_principal(session, self.registry)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        principal = self._principal(session)
        client_id = session.client_id if session is not None else None
        if action is Action.RECEIVE:
            return self._receive(client_id, principal, topic or "")
        what: acl.Action = "publish" if action is Action.PUBLISH else "subscribe"
        if principal is None:
            decision = acl.Decision(False, "session has no registered principal")
        elif principal.revoked:
            decision = acl.Decision(False, "principal is revoked")
        else:
            decision = acl.decide(principal.role.value, principal.id, principal.groups, what, topic or "")
        if decision.allowed:
            return True
        if what == "publish":
            COUNTERS.publish_denied += 1
        else:
            COUNTERS.subscribe_denied += 1
        log.warning(
            f"{what}_denied",
            client_id=client_id,
            principal=principal.id if principal else None,
            topic=topic,
            reason=decision.reason,
        )
        return False

    def _receive(self, client_id: str | None, principal: Principal | None, topic: str) -> bool:
        # Deliveries only reach filters that passed SUBSCRIBE; this re-check stops queued messages to a
        # revoked principal's persistent session and any delivery path that skipped the check.
        if principal is None or principal.revoked:
            allowed = False
        else:
            allowed = acl.decide(
                principal.role.value, principal.id, principal.groups, "subscribe", topic
            ).allowed
        if not allowed:
            COUNTERS.receive_denied += 1
            log.info("receive_denied", client_id=client_id, topic=topic)
        return allowed
