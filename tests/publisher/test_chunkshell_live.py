"""The chunk server shell over a real amqtt broker, with raw paho subscribers as devices."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.bus import BrokerAddress, Bus
from publisher.chunkshell import ChunkShell
from publisher.modelgen import ModelSpec, write_model
from publisher.plan import PlanOptions, build_manifest
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.messages import Chunk, Fetch, Manifest
from tests.helpers import fleetbus_broker
from tests.publisher.live import raw_clients, wait_until


@pytest.fixture(scope="module")
def broker_port() -> Iterator[int]:
    with fleetbus_broker() as port:
        yield port


@pytest.fixture
def served(tmp_path: Path, broker_port: int) -> Iterator[tuple[ChunkShell, Manifest]]:
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(pad_to=600_000))
    manifest = build_manifest(path, "1.0.0", options=PlanOptions(chunk_size=32 * 1024))
    bus = Bus(BrokerAddress(port=broker_port))
    bus.connect()
    shell = ChunkShell(bus)
    shell.start(ticker=False)
    shell.serve(path, manifest)
    try:
        yield shell, manifest
    finally:
        shell.stop()
        bus.close()


def empty_fetch(device: str, m: Manifest, window: int) -> bytes:
    return encode(
        Fetch(
            device_id=device,
            sha256=m.model_sha256,
            chunk_count=m.chunk_count,
            bitmap=bytes((m.chunk_count + 7) // 8),
            window=window,
        )
    )


def test_fan_out_sends_each_chunk_once_to_every_device(
    served: tuple[ChunkShell, Manifest], broker_port: int
) -> None:
    """Four devices fetching in one tick each receive every chunk, intact, from one publish per chunk."""
    shell, m = served
    with raw_clients(broker_port, 4) as devices:
        for i, dev in enumerate(devices):
            dev.subscribe(topics.blob_filter(m.model_sha256), topics.repair_filter(f"dev{i}"))
        for i, dev in enumerate(devices):
            dev.publish(
                topics.device_stream(f"dev{i}", topics.DeviceStream.FETCH),
                empty_fetch(f"dev{i}", m, window=m.chunk_count),
            )
        wait_until(lambda: shell.server.pending == 4, what="four fetches queued")
        assert shell.tick() == m.chunk_count
        for dev in devices:
            dev.wait_for(lambda got: len(got) >= m.chunk_count)
        for dev in devices:
            chunks = {c.index: c for c in (decode_as(p, Chunk) for _, p, _ in dev.received)}
            assert sorted(chunks) == list(range(m.chunk_count))
            assert all(hashlib.sha256(c.data).hexdigest() == m.chunk_sha256[i] for i, c in chunks.items())
            assert all(t.startswith(topics.blob_filter(m.model_sha256)[:-1]) for t, _, _ in dev.received)
    assert shell.server.counters.blob_sent == m.chunk_count
    assert shell.server.counters.repair_sent == 0
    assert shell.counters.bytes_sent == m.size


def test_lone_fetch_is_broadcast_first_and_repaired_after(
    served: tuple[ChunkShell, Manifest], broker_port: int
) -> None:
    """A lone device's first window goes on blob (a bystander sees it); asking again for it gets repairs."""
    shell, m = served
    shell.server.quiet_s = 0.0  # nothing counts as still on its way: the second fetch is answered
    with raw_clients(broker_port, 2) as (asker, bystander):
        asker.subscribe(topics.blob_filter(m.model_sha256), topics.repair_filter("asker"))
        bystander.subscribe(topics.blob_filter(m.model_sha256), topics.repair_filter("bystander"))
        fetch_topic = topics.device_stream("asker", topics.DeviceStream.FETCH)
        asker.publish(fetch_topic, empty_fetch("asker", m, window=3))
        wait_until(lambda: shell.server.pending == 1, what="fetch queued")
        assert shell.tick() == 3
        asker.wait_for(lambda got: len(got) >= 3)
        bystander.wait_for(lambda got: len(got) >= 3)
        assert all(t.startswith(topics.blob_filter(m.model_sha256)[:-1]) for t, _, _ in asker.received)
        asker.publish(fetch_topic, empty_fetch("asker", m, window=3))  # as if all three were lost
        wait_until(lambda: shell.server.pending == 1, what="second fetch queued")
        assert shell.tick() == 3
        asker.wait_for(lambda got: len(got) >= 6)
        repaired = asker.received[3:]
        assert sorted(decode_as(p, Chunk).index for _, p, _ in repaired) == [0, 1, 2]
        assert all(t.startswith(topics.repair_filter("asker")[:-1]) for t, _, _ in repaired)
        assert len(bystander.received) == 3
    assert shell.server.counters.repair_sent == 3


def test_bad_fetches_are_counted_and_do_not_stop_serving(
    served: tuple[ChunkShell, Manifest], broker_port: int
) -> None:
    """Garbage, a forged device id and a foreign file are counted; a good fetch is still served after."""
    shell, m = served
    with raw_clients(broker_port, 1) as (dev,):
        dev.subscribe(topics.blob_filter(m.model_sha256), topics.repair_filter("good"))
        fetch_topic = topics.device_stream("good", topics.DeviceStream.FETCH)
        dev.publish(fetch_topic, b"\xc1not msgpack")
        dev.publish(fetch_topic, empty_fetch("someone-else", m, window=1))
        foreign = Fetch(device_id="good", sha256="ee" * 32, chunk_count=1, bitmap=b"\x00")
        dev.publish(fetch_topic, encode(foreign))
        dev.publish(fetch_topic, empty_fetch("good", m, window=1))
        wait_until(lambda: shell.server.pending == 1, what="good fetch queued")
        shell.tick()
        dev.wait_for(lambda got: len(got) == 1)
    assert shell.counters.decode_errors == 2
    assert shell.counters.foreign_fetches == 1


def test_file_changed_on_disk_is_not_sent(tmp_path: Path, broker_port: int) -> None:
    """A chunk whose bytes no longer match the manifest is counted as a read error and not published."""
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(pad_to=4000))
    m = build_manifest(path, "1", options=PlanOptions(chunk_size=1024))
    path.write_bytes(b"\xff" * m.size)
    with Bus(BrokerAddress(port=broker_port)) as bus:
        shell = ChunkShell(bus)
        shell.start(ticker=False)
        shell.serve(path, m)
        with raw_clients(broker_port, 1) as (dev,):
            dev.subscribe(topics.repair_filter("d"))
            dev.publish(topics.device_stream("d", topics.DeviceStream.FETCH), empty_fetch("d", m, window=2))
            wait_until(lambda: shell.server.pending == 1, what="fetch queued")
            assert shell.tick() == 0
        shell.stop()
    assert shell.counters.read_errors == 2


def test_sender_thread_answers_a_fetch_without_a_tick(tmp_path: Path, broker_port: int) -> None:
    """With the sender thread running, a lone device's fetch is answered with no tick() call at all."""
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(pad_to=100_000))
    m = build_manifest(path, "1", options=PlanOptions(chunk_size=16 * 1024))
    with Bus(BrokerAddress(port=broker_port)) as bus:
        shell = ChunkShell(bus, tick_s=60.0)  # a tick would come far too late to pass this test
        shell.start()
        shell.serve(path, m)
        try:
            with raw_clients(broker_port, 1) as (dev,):
                dev.subscribe(topics.blob_filter(m.model_sha256), topics.repair_filter("solo"))
                dev.publish(
                    topics.device_stream("solo", topics.DeviceStream.FETCH),
                    empty_fetch("solo", m, window=m.chunk_count),
                )
                dev.wait_for(lambda got: len(got) >= m.chunk_count)
                assert sorted(decode_as(p, Chunk).index for _, p, _ in dev.received) == list(
                    range(m.chunk_count)
                )
        finally:
            shell.stop()


def _fetch_everything(port: int, shell: ChunkShell, m: Manifest) -> list[Chunk]:
    """One raw device fetches the whole file in one window; the chunks it got, in index order."""
    with raw_clients(port, 1) as (dev,):
        dev.subscribe(topics.blob_filter(m.model_sha256))
        window = m.chunk_count
        dev.publish(topics.device_stream("d", topics.DeviceStream.FETCH), empty_fetch("d", m, window=window))
        wait_until(lambda: shell.server.pending == 1, what="fetch queued")
        assert shell.tick() == m.chunk_count
        dev.wait_for(lambda got: len(got) == m.chunk_count)
        got = list(dev.received)
    return sorted((decode_as(p, Chunk) for _, p, _ in got), key=lambda c: c.index)


@pytest.mark.parametrize("cache_kib", [0, 2, 64])
def test_chunks_encoded_up_front_are_the_planned_bytes_within_the_cache_budget(
    tmp_path: Path, broker_port: int, cache_kib: int
) -> None:
    """Cached chunks stay within the budget; whether cached or read, each goes out as planned."""
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(pad_to=6000))
    m = build_manifest(path, "1", options=PlanOptions(chunk_size=1024))
    with Bus(BrokerAddress(port=broker_port)) as bus:
        shell = ChunkShell(bus, cache_bytes=cache_kib * 1024)
        shell.start(ticker=False)
        shell.serve(path, m)
        assert shell._cached <= cache_kib * 1024
        chunks = _fetch_everything(broker_port, shell, m)
        shell.stop()
    assert b"".join(c.data for c in chunks) == path.read_bytes()
    assert shell._cached == 0  # stop() let go of the cache


def test_a_file_changed_after_serving_starts_still_sends_the_planned_bytes(
    tmp_path: Path, broker_port: int
) -> None:
    """Chunks encoded when serving started are the manifest's bytes, whatever the file becomes later."""
    path = tmp_path / "m.tflite"
    write_model(path, ModelSpec(pad_to=3000))
    m = build_manifest(path, "1", options=PlanOptions(chunk_size=1024))
    planned = path.read_bytes()
    with Bus(BrokerAddress(port=broker_port)) as bus:
        shell = ChunkShell(bus)
        shell.start(ticker=False)
        shell.serve(path, m)
        path.write_bytes(b"\xff" * m.size)
        chunks = _fetch_everything(broker_port, shell, m)
        shell.stop()
    assert b"".join(c.data for c in chunks) == planned
    assert shell.counters.read_errors == 0
