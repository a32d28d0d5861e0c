"""Hardened embedded broker vs stock amqtt 0.12.1 vs Mosquitto, measured in one run.

    python bench/broker.py [--quick] [--only hardened,stock,mosquitto]

Each broker runs as its own subprocess (so its RSS can be read), freshly started per scenario. The
clients are raw MQTT 3.1.1 sockets driven by asyncio in this process (paho would be the bottleneck):

* telemetry: 200-byte QoS 0 and QoS 1 publishes from 10 publishers to one subscriber (msg/s), and
  the broker process's CPU time per message (which a busy host distorts far less than wall time);
* chunks: 64 KiB QoS 1 publishes to 1, 10 and 100 subscribers (MB/s per subscriber);
* idle memory: RSS growth of the broker per idle connection, at 1,000 connections;
* connect: time for 1,000 and 5,000 clients, each connecting and subscribing to its own topic.

The table gives absolute figures (noisy on a shared machine) and the ratios that matter:
hardened/stock (target >= 0.9 for throughput) and each broker against Mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.testing import connect_packet, free_port, publish_packet, subscribe_packet, wait_port  # noqa: E402

STOCK_SCRIPT = """
import asyncio, signal, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await broker.shutdown()
asyncio.run(main())
"""


@contextlib.contextmanager
def run_broker(kind: str, workdir: Path) -> Iterator[tuple[int, psutil.Process]]:
    port = free_port()
    if kind == "hardened":
        config = workdir / f"hardened-{port}.toml"
        config.write_text(f"[broker]\nport = {port}\nallow_anonymous = true\nmax_connections = 0\n")
        cmd = [sys.executable, "-m", "broker.server", str(config)]
    elif kind == "stock":
        cmd = [sys.executable, "-c", STOCK_SCRIPT % port]
    else:
        config = workdir / f"mosquitto-{port}.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 1000\nlog_dest none\n"
        )
        cmd = ["mosquitto", "-c", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=20)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ raw asyncio client


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, client_id: str) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(connect_packet(client_id, keepalive=0))
        conn = cls(reader, writer)
        ptype, _, body = await conn.read()
        if ptype != 2 or body[1] != 0:
            raise ConnectionError(f"CONNACK {body!r}")
        return conn

    async def read(self) -> tuple[int, int, bytes]:
        first = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = await self.reader.readexactly(length) if length else b""
        return first >> 4, first & 0x0F, body

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        self.writer.write(subscribe_packet(1, [(topic_filter, qos)]))
        ptype, _, _ = await self.read()
        if ptype != 9:
            raise ConnectionError("no SUBACK")

    def close(self) -> None:
        self.writer.close()


class Tally:
    """Messages received by one subscriber, and when the last one arrived."""

    def __init__(self) -> None:
        self.got = 0
        self.last = time.perf_counter()


async def count_publishes(conn: Conn, target: int, done: asyncio.Future[float], tally: Tally) -> None:
    """Read PUBLISHes (acking QoS 1) until ``target`` arrived; resolves ``done`` with the time."""
    got = 0
    acks = bytearray()
    while got < target:
        ptype, flags, body = await conn.read()
        if ptype != 3:
            continue
        got += 1
        tally.got = got
        tally.last = time.perf_counter()
        if flags & 0x06:
            (tlen,) = struct.unpack_from("!H", body)
            acks += b"\x40\x02" + body[2 + tlen : 4 + tlen]
            if len(acks) >= 400 or got == target:
                conn.writer.write(bytes(acks))
                acks.clear()
    if acks:
        conn.writer.write(bytes(acks))
    if not done.done():
        done.set_result(time.perf_counter())


async def until_done_or_stalled(
    dones: list[asyncio.Future[float]], tallies: list[Tally], target: int, stall: float = 10.0
) -> list[float]:
    """Wait for every subscriber; one that gets nothing for ``stall`` seconds is given up on.

    Returns the end time per subscriber; a subscriber that lost messages is reported and its rate
    computed from what it received.
    """
    while True:
        pending = [d for d in dones if not d.done()]
        if not pending:
            break
        await asyncio.wait(pending, timeout=1.0)
        now = time.perf_counter()
        if all(d.done() or now - t.last > stall for d, t in zip(dones, tallies, strict=True)):
            break
    ends = []
    for done, tally in zip(dones, tallies, strict=True):
        if done.done():
            ends.append(done.result())
        else:
            print(f"    lost {target - tally.got} of {target} messages", flush=True)
            ends.append(tally.last)
    return ends


async def drain_acks(conn: Conn) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        while True:
            await conn.reader.read(65536)


async def publish_stream(conn: Conn, topic: str, payload: bytes, *, qos: int, count: int, batch: int) -> None:
    packet_id = 0
    sent = 0
    while sent < count:
        chunk = []
        for _ in range(min(batch, count - sent)):
            packet_id = packet_id % 65535 + 1
            chunk.append(publish_packet(topic, payload, qos=qos, packet_id=packet_id))
        conn.writer.write(b"".join(chunk))
        await conn.writer.drain()
        sent += len(chunk)


async def fan_in(port: int, qos: int, total: int, publishers: int = 10, timeout: float = 120) -> float:
    """msg/s of ``total`` 200-byte messages from ``publishers`` clients to one subscriber."""
    sub = await Conn.open(port, "sub")
    await sub.subscribe("tele/#", qos)
    pubs = [await Conn.open(port, f"pub{i}") for i in range(publishers)]
    ackers = [asyncio.create_task(drain_acks(p)) for p in pubs]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    tally = Tally()
    counter = asyncio.create_task(count_publishes(sub, total, done, tally))
    payload = os.urandom(200)
    start = time.perf_counter()
    senders = [
        publish_stream(p, f"tele/dev{i}/health", payload, qos=qos, count=total // publishers, batch=50)
        for i, p in enumerate(pubs)
    ]
    await asyncio.gather(*senders)
    try:
        [end] = await asyncio.wait_for(until_done_or_stalled([done], [tally], total), timeout)
    finally:
        counter.cancel()
        for task in ackers:
            task.cancel()
        for conn in (sub, *pubs):
            conn.close()
    return tally.got / (end - start)


async def fan_out(port: int, subscribers: int, chunks: int, timeout: float = 180) -> float:
    """MB/s per subscriber for ``chunks`` 64 KiB QoS 1 messages to ``subscribers`` clients."""
    subs = []
    for i in range(subscribers):
        conn = await Conn.open(port, f"sub{i}")
        await conn.subscribe("fleetbus/v1/blob/+/+", 1)
        subs.append(conn)
    pub = await Conn.open(port, "pub")
    acker = asyncio.create_task(drain_acks(pub))
    loop = asyncio.get_running_loop()
    dones: list[asyncio.Future[float]] = [loop.create_future() for _ in subs]
    tallies = [Tally() for _ in subs]
    counters = [
        asyncio.create_task(count_publishes(s, chunks, d, t))
        for s, d, t in zip(subs, dones, tallies, strict=True)
    ]
    payload = os.urandom(64 * 1024)
    start = time.perf_counter()
    await publish_stream(pub, "fleetbus/v1/blob/abc/0", payload, qos=1, count=chunks, batch=4)
    try:
        ends = await asyncio.wait_for(until_done_or_stalled(dones, tallies, chunks), timeout)
    finally:
        for task in (*counters, acker):
            task.cancel()
        for conn in (*subs, pub):
            conn.close()
    return statistics.mean(
        t.got * len(payload) / 1e6 / (end - start) for t, end in zip(tallies, ends, strict=True)
    )


async def cpu_per_message(port: int, proc: psutil.Process, qos: int, total: int) -> float:
    """Broker CPU (user + system) in microseconds per message of the fan-in run: robust to a busy host."""
    before = sum(proc.cpu_times()[:2])
    await fan_in(port, qos, total)
    return 1e6 * (sum(proc.cpu_times()[:2]) - before) / total


async def idle_memory(port: int, proc: psutil.Process, n: int) -> float:
    """Bytes of broker RSS per idle connected client."""
    await asyncio.sleep(0.5)
    before = proc.memory_info().rss
    conns = []
    for i in range(n):
        conns.append(await Conn.open(port, f"idle{i}"))
    await asyncio.sleep(1.0)
    after = proc.memory_info().rss
    for conn in conns:
        conn.close()
    return (after - before) / n


async def connect_storm(port: int, n: int, concurrency: int = 50, timeout: float = 300) -> float:
    """Seconds for n clients to connect and each subscribe to its own topic."""
    conns: list[Conn] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            conn = await Conn.open(port, f"dev{i}")
            await conn.subscribe(f"fleetbus/v1/cmd/dev/dev{i}", 1)
            conns.append(conn)

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        return time.perf_counter() - start
    except TimeoutError:
        return float("inf")
    finally:
        for conn in conns:
            conn.close()


# ------------------------------------------------------------------ driver


@dataclass
class Scenario:
    name: str
    unit: str
    higher_is_better: bool
    run: Callable[[int, psutil.Process], Awaitable[float]]


def scenarios(quick: bool) -> list[Scenario]:
    tele = 20_000 if quick else 100_000
    return [
        Scenario("200 B QoS 0, 10 pub -> 1 sub", "msg/s", True, lambda p, _: fan_in(p, 0, tele)),
        Scenario("200 B QoS 1, 10 pub -> 1 sub", "msg/s", True, lambda p, _: fan_in(p, 1, tele)),
        Scenario(
            "broker CPU, 200 B QoS 0", "us/msg", False, lambda p, proc: cpu_per_message(p, proc, 0, tele)
        ),
        Scenario(
            "broker CPU, 200 B QoS 1", "us/msg", False, lambda p, proc: cpu_per_message(p, proc, 1, tele)
        ),
        Scenario(
            "64 KiB QoS 1 -> 1 sub", "MB/s/sub", True, lambda p, _: fan_out(p, 1, 300 if quick else 1500)
        ),
        Scenario(
            "64 KiB QoS 1 -> 10 subs", "MB/s/sub", True, lambda p, _: fan_out(p, 10, 100 if quick else 400)
        ),
        Scenario(
            "64 KiB QoS 1 -> 100 subs", "MB/s/sub", True, lambda p, _: fan_out(p, 100, 20 if quick else 100)
        ),
        Scenario(
            "idle memory, 1,000 conns", "KB/conn", False, lambda p, proc: _kb(idle_memory(p, proc, 1000))
        ),
        Scenario("connect+sub 1,000 clients", "s", False, lambda p, _: connect_storm(p, 1000)),
        Scenario("connect+sub 5,000 clients", "s", False, lambda p, _: connect_storm(p, 5000)),
    ]


async def _kb(value: Awaitable[float]) -> float:
    return (await value) / 1024


def measure(kind: str, scenario: Scenario, repeats: int, workdir: Path) -> float:
    values = []
    for _ in range(repeats):
        with run_broker(kind, workdir) as (port, proc):
            try:
                values.append(asyncio.run(scenario.run(port, proc)))
            except Exception as exc:  # one failed scenario must not hide the others
                print(f"  {kind}: {scenario.name} failed: {type(exc).__name__}: {exc}", flush=True)
                values.append(float("nan"))
    return statistics.median(values)


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0 or math.isinf(b):
        return "-"
    return f"{a / b:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, one repeat")
    parser.add_argument("--only", default="hardened,stock,mosquitto", help="comma-separated brokers")
    parser.add_argument("--scenario", default="", help="run only scenarios whose name contains this")
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    if "mosquitto" in kinds and shutil.which("mosquitto") is None:
        print("mosquitto not installed: skipping it")
        kinds.remove("mosquitto")
    repeats = 1 if args.quick else 3
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenarios(args.quick):
            if args.scenario and args.scenario not in scenario.name:
                continue
            for kind in kinds:
                value = measure(kind, scenario, repeats, Path(tmp))
                results[(scenario.name, kind)] = value
                print(f"{scenario.name:<32} {kind:<10} {value:>12.2f} {scenario.unit}", flush=True)
    print()
    header = f"{'scenario':<32} {'unit':<9}" + "".join(f"{k:>12}" for k in kinds)
    header += f"{'hard/stock':>12}{'hard/mosq':>11}{'stock/mosq':>12}"
    print(header)
    print("-" * len(header))
    for scenario in scenarios(args.quick):
        if (scenario.name, kinds[0]) not in results:
            continue
        row = f"{scenario.name:<32} {scenario.unit:<9}"
        row += "".join(f"{results[(scenario.name, k)]:>12.2f}" for k in kinds)
        h = results.get((scenario.name, "hardened"), float("nan"))
        s = results.get((scenario.name, "stock"), float("nan"))
        m = results.get((scenario.name, "mosquitto"), float("nan"))
        row += f"{ratio(h, s):>12}{ratio(h, m):>11}{ratio(s, m):>12}"
        print(row)
    print("\nratios are value/value: for msg/s and MB/s higher is better; for KB/conn and s lower is better.")


if __name__ == "__main__":
    main()
