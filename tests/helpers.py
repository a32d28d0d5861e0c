"""Helpers shared by the test suite: free ports, an in-process stock amqtt broker, paho clients."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from broker.testing import free_port, wait_port

__all__ = ["fleetbus_broker", "free_port", "stock_amqtt", "wait_port"]


@contextlib.contextmanager
def stock_amqtt(port: int | None = None, config: dict[str, Any] | None = None) -> Iterator[int]:
    """Run an unmodified amqtt broker in a thread on 127.0.0.1; yields its port."""
    from amqtt.broker import Broker

    port = port or free_port()
    cfg: dict[str, Any] = config or {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        broker = Broker(cfg)
        await broker.start()
        started.set()
        await stop.wait()
        await broker.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise TimeoutError("amqtt did not start")
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@contextlib.contextmanager
def fleetbus_broker(port: int = 0) -> Iterator[int]:
    """fleetbus's hardened embedded broker, anonymous, in a thread on 127.0.0.1; yields its port.

    Tests of the device and the publisher run on it rather than on stock amqtt, whose CONNECT path
    iterates its subscription dict while other clients subscribe ("dictionary changed size during
    iteration" dropped a connection now and then; docs/broker-holes.md).
    """
    from broker.server import BrokerSettings, run_in_thread

    with run_in_thread(BrokerSettings(host="127.0.0.1", port=port, allow_anonymous=True)) as handle:
        yield handle.port
