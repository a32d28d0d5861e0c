"""Several aggregators behind one shared subscription split the telemetry (Mosquitto only)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.bus import BrokerAddress, Bus
from publisher.service import Aggregator, ServeOptions
from publisher.store import SqliteStore
from schemas import topics
from schemas.codec import encode
from schemas.messages import Health
from tests.helpers import free_port, wait_port
from tests.publisher.live import raw_clients, wait_until

MOSQUITTO = shutil.which("mosquitto")
pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto binary is not installed"),
]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
    proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_two_aggregators_share_the_stream(mosquitto: int, tmp_path: Path) -> None:
    """With --share, each telemetry message is folded by exactly one of two aggregators, and both work."""
    aggregators: list[tuple[Aggregator, Bus, threading.Thread]] = []
    for i in range(2):
        bus = Bus(BrokerAddress(port=mosquitto))
        agg = Aggregator(bus, SqliteStore(tmp_path / f"a{i}.db"), ServeOptions(share="ingest", flush_s=0.2))
        bus.connect()
        agg.start()
        runner = threading.Thread(target=agg.run, daemon=True)
        runner.start()
        aggregators.append((agg, bus, runner))
    try:
        total = 200
        with raw_clients(mosquitto, 1) as (dev,):
            for i in range(total):
                device = f"sh-{i % 20:02d}"
                dev.publish(
                    topics.device_stream(device, topics.DeviceStream.HEALTH),
                    encode(Health(device_id=device, inference_count=i)),
                )

        def folded() -> list[int]:
            return [a.fleet.counters["messages"] for a, _, _ in aggregators]

        wait_until(lambda: sum(folded()) >= total, what="all messages folded")
        time.sleep(0.3)  # a message delivered to both would show up as a surplus by now
        counts = folded()
        assert sum(counts) == total
        assert all(c > 0 for c in counts), counts
    finally:
        for agg, bus, runner in aggregators:
            agg.stop()
            runner.join(10)
            bus.close()
            agg.store.close()
