"""Aggregator ingestion vs a bare paho subscriber, on Mosquitto and on amqtt, in one run.

    python bench/ingest.py [--messages N] [--devices D] [--only mosquitto,amqtt]

For each broker, a publisher process blasts N msgpack ``health`` messages (QoS 0, from D devices)
through raw sockets, twice: once to a bare paho subscriber that only counts, once to the aggregator
of ``fleetbus serve`` (``publisher.service.Aggregator``: decode, validate, fold, and write to SQLite
in WAL mode with 1 s batches; the store's final flush is included in its time).  Rates are messages
over the time from the first message received to the last one handled.  The figure that matters is
the ratio aggregator / bare subscriber (target >= 0.8), plus the aggregator's absolute rate on
Mosquitto (target >= 10,000 msg/s).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from broker.testing import free_port, wait_port  # noqa: E402
from publisher.bus import BrokerAddress, Bus  # noqa: E402
from publisher.service import Aggregator, ServeOptions  # noqa: E402
from publisher.store import SqliteStore  # noqa: E402
from schemas import topics  # noqa: E402

BLASTER = r"""
import socket, sys, time
sys.path.insert(0, sys.argv[1])
from broker.testing import connect_packet, publish_packet
from schemas import topics
from schemas.codec import encode
from schemas.messages import Health
port, n, devices = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
frames = []
for d in range(devices):
    dev = f"bench-{d:04d}"
    payload = encode(Health(device_id=dev, seq=d % 256, uptime_s=12.5, rss_bytes=40_000_000,
                            inference_count=1000 + d, latency_p50_ms=0.8, latency_p95_ms=1.9,
                            model_version="1.0.0", counters={"duplicates": 0}))
    frames.append(publish_packet(topics.device_stream(dev, topics.DeviceStream.HEALTH), payload))
s = socket.create_connection(("127.0.0.1", port))
s.sendall(connect_packet("bench-blaster", keepalive=600))
s.recv(4)
batch = []
for i in range(n):
    batch.append(frames[i % devices])
    if len(batch) == 200:
        s.sendall(b"".join(batch)); batch.clear()
if batch:
    s.sendall(b"".join(batch))
time.sleep(1)
s.close()
"""


@contextlib.contextmanager
def broker(kind: str, workdir: Path) -> Iterator[int]:
    port = free_port()
    if kind == "mosquitto":
        conf = workdir / "mosquitto.conf"
        # Stock limits drop QoS 1 under load (FACTS.md): lift them so both subscribers see everything.
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            "max_queued_bytes 0\nmax_inflight_messages 0\n"
        )
        argv = ["mosquitto", "-c", str(conf)]
    else:
        argv = [sys.executable, "-m", "publisher._stock_broker", str(port)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=15)
        yield port
    finally:
        proc.kill()
        proc.wait()


def blast(port: int, n: int, devices: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BLASTER, str(REPO), str(port), str(n), str(devices)])


def run_until(done: Callable[[], bool], idle: Callable[[], float], limit: float = 300.0) -> None:
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > limit or idle() > 5.0:
            return
        time.sleep(0.01)


def bare_subscriber(port: int, n: int, devices: int) -> tuple[float, int]:
    lock = threading.Lock()
    stamps: list[float] = []

    def on_message(client: object, userdata: object, msg: object) -> None:
        with lock:
            stamps.append(time.perf_counter())

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topics.device_stream_filter(topics.DeviceStream.HEALTH), qos=1)
    time.sleep(0.5)
    proc = blast(port, n, devices)
    run_until(
        lambda: len(stamps) >= n,
        lambda: time.perf_counter() - (stamps[-1] if stamps else time.perf_counter()),
    )
    proc.wait()
    client.disconnect()
    client.loop_stop()
    got = len(stamps)
    return got / max(stamps[-1] - stamps[0], 1e-9), got


class _TimedAggregator(Aggregator):
    first: float | None = None
    last: float = 0.0

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        super()._on_message(topic, payload)
        self.last = time.perf_counter()


def aggregator(port: int, n: int, devices: int, workdir: Path) -> tuple[float, int]:
    store = SqliteStore(workdir / f"ingest-{port}.db")
    bus = Bus(BrokerAddress(port=port), client_id="bench-aggregator")
    agg = _TimedAggregator(bus, store, ServeOptions(flush_s=1.0, aggregate_s=5.0))
    bus.connect()
    agg.start()
    runner = threading.Thread(target=agg.run, daemon=True)
    runner.start()
    time.sleep(0.5)
    proc = blast(port, n, devices)

    def ingested() -> int:
        return agg.fleet.counters["messages"]

    def idle() -> float:
        return time.perf_counter() - (agg.last or time.perf_counter())

    run_until(lambda: ingested() >= n, idle)
    proc.wait()
    done = time.perf_counter()
    agg.flush()  # what is left in memory counts against the aggregator
    flushed = time.perf_counter()
    agg.stop()
    runner.join(10)
    bus.close()
    store.close()
    got = ingested()
    elapsed = (min(agg.last, done) - (agg.first or done)) + (flushed - done)
    return got / max(elapsed, 1e-9), got


def main() -> None:
    from schemas.logs import configure_logging

    configure_logging("warning")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=0, help="messages per run (default per broker)")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--only", default="mosquitto,amqtt")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    if "mosquitto" in kinds and shutil.which("mosquitto") is None:
        print("mosquitto not installed: skipping it")
        kinds.remove("mosquitto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            n = args.messages or (100_000 if kind == "mosquitto" else 20_000)
            bare: list[float] = []
            agg: list[float] = []
            lost = 0
            # Interleaved repeats on a fresh broker each: the machine is shared and noisy, medians hold.
            for _ in range(args.repeat):
                with broker(kind, Path(tmp)) as port:
                    rate, got = bare_subscriber(port, n, args.devices)
                    bare.append(rate)
                    lost += n - got
                with broker(kind, Path(tmp)) as port:
                    rate, got = aggregator(port, n, args.devices, Path(tmp))
                    agg.append(rate)
                    lost += n - got
            rows.append((kind, n, statistics.median(bare), statistics.median(agg), lost))
    print(
        f"{'broker':<10} {'messages':>9} {'bare msg/s':>11} {'aggregator msg/s':>17} {'ratio':>6} {'lost':>5}"
    )
    for kind, n, bare_rate, agg_rate, lost in rows:
        print(
            f"{kind:<10} {n:>9} {bare_rate:>11,.0f} {agg_rate:>17,.0f} {agg_rate / bare_rate:>6.2f} {lost:>5}"
        )
    print(f"(medians of {args.repeat} interleaved runs; targets: ratio >= 0.8, >= 10,000 msg/s on Mosquitto)")


if __name__ == "__main__":
    main()
