"""The aggregator (`fleetbus serve`) over a real amqtt broker, fed by raw paho publishers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.bus import BrokerAddress, Bus
from publisher.service import Aggregator, ServeOptions
from publisher.store import SqliteStore
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.messages import Aggregate, Birth, Death, ExecStatus, Health, Results, State
from tests.helpers import fleetbus_broker
from tests.publisher.live import raw_clients, wait_until

S = topics.DeviceStream


@pytest.fixture(scope="module")
def broker_port() -> Iterator[int]:
    with fleetbus_broker() as port:
        yield port


@pytest.fixture
def aggregator(tmp_path: Path, broker_port: int) -> Iterator[Aggregator]:
    store = SqliteStore(tmp_path / "fleet.db")
    bus = Bus(BrokerAddress(port=broker_port))
    bus.connect()
    agg = Aggregator(bus, store, ServeOptions(flush_s=0.1, aggregate_s=0.2))
    agg.start()
    runner = threading.Thread(target=agg.run, daemon=True)
    runner.start()
    try:
        yield agg
    finally:
        agg.stop()
        runner.join(10)
        bus.close()
        store.close()


def birth(dev: str, bdseq: int, version: str = "1.0.0") -> bytes:
    return encode(
        Birth(
            device_id=dev,
            bdseq=bdseq,
            groups=["lab"],
            agent_version="0",
            runtime="litert",
            runtime_version="2.3",
            model_version=version,
        )
    )


def test_telemetry_is_folded_stored_and_aggregated(aggregator: Aggregator, broker_port: int) -> None:
    """Births, a stale death, state, health and results reach the fleet, the store and the aggregates."""
    with raw_clients(broker_port, 2) as (dev, backend):
        backend.subscribe(topics.aggregate_filter())
        dev.publish(topics.device_stream("s1", S.BIRTH), birth("s1", 2))
        dev.publish(topics.device_stream("s2", S.BIRTH), birth("s2", 1, "0.9"))
        dev.publish(topics.device_stream("s1", S.DEATH), encode(Death(device_id="s1", bdseq=1)))  # stale
        dev.publish(topics.device_stream("s2", S.DEATH), encode(Death(device_id="s2", bdseq=1)))
        dev.publish(
            topics.device_stream("s1", S.STATE),
            encode(
                State(
                    device_id="s1",
                    rollout_id="r9",
                    status=ExecStatus.SUCCEEDED,
                    version_number=3,
                    model_version="1.1.0",
                )
            ),
        )
        dev.publish(
            topics.device_stream("s1", S.HEALTH),
            encode(Health(device_id="s1", inference_count=50, latency_p95_ms=1.2)),
            qos=0,
        )
        dev.publish(
            topics.device_stream("s1", S.RESULTS),
            encode(Results(device_id="s1", outputs=[[0.5, 1.0]] * 4, latency_ms=[1.0] * 4)),
            qos=0,
        )
        wait_until(
            lambda: (
                aggregator.fleet.devices.get("s1") is not None
                and aggregator.fleet.devices["s1"].results_outputs == 4
                and aggregator.fleet.devices["s1"].inference_count == 50
                and aggregator.fleet.devices.get("s2") is not None
                and not aggregator.fleet.devices["s2"].online
            ),
            what="telemetry folded",
        )
        s1 = aggregator.fleet.devices["s1"]
        assert s1.online
        assert s1.model_version == "1.1.0"
        assert aggregator.fleet.counters["stale_deaths"] == 1

        def fleet_aggregate_shows_both(got: list[tuple[str, bytes, bool]]) -> bool:
            fleet = [
                decode_as(p, Aggregate)
                for t, p, _ in got
                if t == topics.aggregate(topics.AggregateScope.FLEET)
            ]
            return any(a.devices == 2 and a.online == 1 for a in fleet)

        backend.wait_for(fleet_aggregate_shows_both)
        backend.wait_for(
            lambda got: any(t == topics.aggregate(topics.AggregateScope.ROLLOUT, "r9") for t, _, _ in got)
        )
    wait_until(lambda: len(aggregator.store.executions("r9")) == 1, what="execution stored")
    wait_until(
        lambda: {d["device_id"] for d in aggregator.store.load_devices()} == {"s1", "s2"}, what="stored"
    )
    stored = {d["device_id"]: d for d in aggregator.store.load_devices()}
    assert stored["s1"]["model_version"] == "1.1.0"


def test_malformed_telemetry_is_counted_and_ingestion_goes_on(
    aggregator: Aggregator, broker_port: int
) -> None:
    """Garbage, an unknown kind and a message on another device's topic are counted; later ones land."""
    with raw_clients(broker_port, 1) as (dev,):
        dev.publish(topics.device_stream("m1", S.HEALTH), b"\x00\x01garbage")
        dev.publish(topics.device_stream("m1", S.HEALTH), b"\x81\xa4kind\xa4nope")
        dev.publish(topics.device_stream("m1", S.HEALTH), encode(Health(device_id="impostor")))
        dev.publish(topics.device_stream("m1", S.HEALTH), encode(Health(device_id="m1", inference_count=7)))
        wait_until(lambda: "m1" in aggregator.fleet.devices, what="good health folded")
    assert aggregator.fleet.counters["decode_errors"] == 2
    assert aggregator.fleet.counters["misaddressed"] == 1
    assert "impostor" not in aggregator.fleet.devices


def test_http_serves_the_fleet_and_metrics(aggregator: Aggregator, broker_port: int) -> None:
    """The aggregator is the HTTP layer's FleetView: /api/devices and /metrics answer over a socket."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with raw_clients(broker_port, 1) as (dev,):
        dev.publish(topics.device_stream("h1", S.BIRTH), birth("h1", 1))
        dev.publish(
            topics.device_stream("h1", S.RESULTS),
            encode(Results(device_id="h1", outputs=[[1.0]] * 5, latency_ms=[2.0] * 5, errors=1)),
            qos=0,
        )
        wait_until(
            lambda: "h1" in aggregator.fleet.devices and aggregator.fleet.devices["h1"].results_outputs == 5,
            what="telemetry folded",
        )
    handle = aggregator.serve_http("127.0.0.1", 0)
    with urllib.request.urlopen(f"{handle.url}/api/devices", timeout=5) as resp:  # noqa: S310
        body = json.loads(resp.read())
    assert "h1" in json.dumps(body)
    with urllib.request.urlopen(f"{handle.url}/metrics", timeout=5) as resp:  # noqa: S310
        families = {f.name for f in text_string_to_metric_families(resp.read().decode())}
    assert any("messages_ingested" in name for name in families)
    points = aggregator.series("error_rate", "device:h1", 0.0)
    assert [round(v, 3) for _, v in points] == [round(1 / 6, 3)]


def test_restart_restores_the_fleet_from_the_store(tmp_path: Path, broker_port: int) -> None:
    """A new aggregator on the same database starts with the devices the previous one stored."""
    store = SqliteStore(tmp_path / "f.db")
    with Bus(BrokerAddress(port=broker_port)) as bus:
        first = Aggregator(bus, store)
        first.start()
        with raw_clients(broker_port, 1) as (dev,):
            dev.publish(topics.device_stream("keep", S.BIRTH), birth("keep", 4, "3.0"))
            wait_until(lambda: "keep" in first.fleet.devices, what="birth folded")
        first.flush()
    second = Aggregator(Bus(BrokerAddress(port=broker_port)), store)
    assert second.restore() >= 1
    assert second.fleet.devices["keep"].model_version == "3.0"
    assert second.fleet.devices["keep"].birth_bdseq == 4
    store.close()
