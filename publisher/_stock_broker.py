"""A stock, anonymous amqtt broker as a process: ``python -m publisher._stock_broker PORT``.

Only the demo uses it, until ``fleetbus broker`` (broker/) is wired in; it exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys


async def _main(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
