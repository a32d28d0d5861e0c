"""One real rollout, with credentials and ACLs, on the embedded broker and on a real Mosquitto.

Nothing here knows which broker it talks to: the registry, the device.toml files (written by the same
code as `fleetbus device add`), the agents and the publisher are identical; only the broker differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.registry import Registry
from broker.registry_cli import device_toml
from publisher.bus import BrokerAddress
from publisher.client import Publisher
from publisher.fleet import Fleet
from publisher.modelgen import ModelSpec, write_model
from publisher.progress import Targets
from schemas import topics
from schemas.codec import decode
from schemas.messages import ExecStatus, Health
from schemas.signing import write_keypair
from tests.broker.conftest import FAST_HASHER, Client, start_amqtt, start_mosquitto
from tests.helpers import free_port
from tests.publisher.live import wait_until

DEVICES = ("edge-a", "edge-b")


@contextlib.contextmanager
def _broker(kind: str, tmp_path: Path, registry: Path, port: int) -> Iterator[int]:
    if kind == "amqtt":
        with start_amqtt(registry, port=port) as bound:
            yield bound
    else:
        with start_mosquitto(tmp_path, registry, port=port) as bound:
            yield bound


@contextlib.contextmanager
def _agents(tmp_path: Path, tomls: dict[str, str]) -> Iterator[dict[str, Path]]:
    procs: list[subprocess.Popen[bytes]] = []
    homes: dict[str, Path] = {}
    try:
        for device_id, text in tomls.items():
            home = tmp_path / device_id
            home.mkdir()
            (home / "device.toml").write_text(
                text
                + "\n[inference]\ninterval_s = 0.05\nbatch_interval_s = 0.3\n\n[health]\ninterval_s = 0.5\n"
            )
            with open(home / "agent.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "schemas.cli", "device", "run", "--config", "device.toml"],
                        cwd=home,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            homes[device_id] = home
        yield homes
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_authenticated_rollout_commits_everywhere(kind: str, tmp_path: Path) -> None:
    """Agents with their own credentials commit a signed 600 kB model and report results from it."""
    registry = Registry.load(tmp_path / "registry.json", FAST_HASHER)
    private, public = write_keypair(tmp_path / "keys")
    port = free_port()
    passwords = {d: registry.add(d, "device", ("line",)) for d in DEVICES}
    tomls = {
        d: device_toml(
            registry.get(d),
            passwords[d],
            broker_url=f"mqtt://127.0.0.1:{port}",
            cafile=None,
            publisher_keys=[public.read_text().strip()],
            state_dir="state",
        )
        for d in DEVICES
    }
    ops_password = registry.add("ops", "operator")
    reader_password = registry.add("backend", "reader")
    model = tmp_path / "model.tflite"
    write_model(model, ModelSpec(input_size=6, output_size=3, seed=11, bias_add=0.5, pad_to=600_000))

    with _broker(kind, tmp_path, registry.path, port):
        reader = Client(port, "backend", "backend", reader_password)
        assert reader.connect() == 0
        assert reader.subscribe(topics.device_stream_filter()) < 0x80
        fleet = Fleet()
        counters: dict[str, dict[str, int]] = {}

        def drain() -> Fleet:
            while not reader.messages.empty():
                message = decode(reader.messages.get_nowait().payload)
                if isinstance(message, Health):
                    counters[message.device_id] = message.counters
                fleet.apply(message, 0.0)
            return fleet

        try:
            with _agents(tmp_path, tomls) as homes:
                wait_until(lambda: sum(v.online for v in drain().devices.values()) == 2, 30, "2 births")
                address = BrokerAddress(port=port, username="ops", password=ops_password)
                with Publisher(address, private) as pub:
                    result = pub.push(model, "4.2.0", Targets(groups=("line",)), timeout=90)
                    pushed = pub.chunks.counters.pushed
                assert result.ok, result.as_dict()
                assert pushed == result.manifest.chunk_count == 3  # one push to the group, not one per device
                for home in homes.values():
                    active = home / "state" / "models" / "active.tflite"
                    assert hashlib.sha256(active.read_bytes()).hexdigest() == result.manifest.model_sha256

                def results_from_new_model() -> bool:
                    f = drain()
                    return all(
                        d in f.devices
                        and f.devices[d].rollout_status is ExecStatus.SUCCEEDED
                        and f.devices[d].results_model_version == "4.2.0"
                        and f.devices[d].results_outputs > 0
                        for d in DEVICES
                    )

                wait_until(results_from_new_model, 30, "SUCCEEDED and results from 4.2.0 on both agents")

                # Both took the pushed chunks through this broker's ACL instead of asking for them.
                def took_the_push() -> bool:
                    drain()
                    return all(counters.get(d, {}).get("pushes_awaited") == 1 for d in DEVICES)

                wait_until(took_the_push, 10, "health showing the push awaited on both agents")
        finally:
            reader.close()
