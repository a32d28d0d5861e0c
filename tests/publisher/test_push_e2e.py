"""Rollouts from the publisher to real device agent processes over a real amqtt broker."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.bus import BrokerAddress
from publisher.client import Publisher, RolloutResult
from publisher.fleet import Fleet
from publisher.modelgen import ModelSpec, build_broken, write_model
from publisher.plan import PlanOptions
from publisher.progress import Targets
from schemas import topics
from schemas.codec import decode
from schemas.messages import ExecStatus
from schemas.signing import write_keypair
from tests.helpers import fleetbus_broker
from tests.publisher.live import RawClient, agent_processes, wait_until

DEVICES = ["e2e-1", "e2e-2", "e2e-3"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[int, Path, dict[str, Path], RawClient]]:
    """A broker, a signing key, three agents in group `lab`, and a raw observer of device streams."""
    private, public = write_keypair(tmp_path / "keys")
    with (
        fleetbus_broker() as port,
        agent_processes(tmp_path, port, public.read_text().strip(), DEVICES) as homes,
    ):
        observer = RawClient(port)
        observer.subscribe(topics.device_stream_filter())
        try:
            yield port, private, homes, observer
        finally:
            observer.close()


def fold(observer: RawClient) -> Fleet:
    fleet = Fleet()
    for _, payload, _ in list(observer.received):
        fleet.apply(decode(payload), 0.0)
    return fleet


def test_push_commits_the_model_on_every_agent(
    rig: tuple[int, Path, dict[str, Path], RawClient], tmp_path: Path
) -> None:
    """A 1 MB model pushed to a group is committed byte-exact on every agent, which then infers with it."""
    port, key, homes, observer = rig
    wait_until(lambda: sum(v.online for v in fold(observer).devices.values()) == 3, what="3 births")
    model = tmp_path / "m.tflite"
    write_model(model, ModelSpec(input_size=8, output_size=4, seed=5, bias_add=0.25, pad_to=1_000_000))
    with Publisher(BrokerAddress(port=port), key) as pub:
        # 64 KiB chunks (not the 256 KiB default): 16 of them make the fan-out count below telling.
        options = PlanOptions(chunk_size=64 * 1024)
        result = pub.push(model, "2.0.0", Targets(groups=("lab",)), options, timeout=60)
    assert result.ok, result.as_dict()
    assert sorted(result.outcomes) == DEVICES
    m = result.manifest
    for home in homes.values():
        active = home / "state" / "models" / "active.tflite"
        assert hashlib.sha256(active.read_bytes()).hexdigest() == m.model_sha256
    assert m.chunk_count == 16
    # Fan-out: the 1 MiB push after the deploy is the whole file, once for the group; what is
    # repaired is far less than one copy of the file per device.
    assert result.chunks["pushed"] == m.chunk_count
    sent = result.chunks["pushed"] + result.chunks["blob_sent"] + result.chunks["repair_sent"]
    assert sent < len(DEVICES) * m.chunk_count

    def all_report_results_from_new_model() -> bool:
        f = fold(observer)
        return all(
            f.devices.get(d) is not None
            and f.devices[d].model_version == "2.0.0"
            and f.devices[d].results_model_version == "2.0.0"
            and f.devices[d].results_outputs > 0
            for d in DEVICES
        )

    wait_until(all_report_results_from_new_model, what="results from 2.0.0 on every device")
    assert all(fold(observer).devices[d].rollout_status is ExecStatus.SUCCEEDED for d in DEVICES)


def test_a_device_target_takes_its_push_on_its_repair_topic(
    rig: tuple[int, Path, dict[str, Path], RawClient], tmp_path: Path
) -> None:
    """Pushed to one device by id: the first MiB goes on that device's repair topic right after the
    deploy, and a 1 MB model commits with nothing broadcast and nothing repaired."""
    port, key, homes, observer = rig
    wait_until(lambda: sum(v.online for v in fold(observer).devices.values()) == 3, what="3 births")
    model = tmp_path / "one.tflite"
    write_model(model, ModelSpec(input_size=8, output_size=4, seed=6, pad_to=1_000_000))
    with Publisher(BrokerAddress(port=port), key) as pub:
        result = pub.push(model, "2.1.0", Targets(devices=("e2e-2",)), timeout=60)
    assert result.ok, result.as_dict()
    assert result.manifest.chunk_count == 4
    assert result.chunks["pushed"] == 4
    assert result.chunks["blob_sent"] == result.chunks["repair_sent"] == 0
    active = homes["e2e-2"] / "state" / "models" / "active.tflite"
    assert hashlib.sha256(active.read_bytes()).hexdigest() == result.manifest.model_sha256


def test_cli_push_exits_nonzero_when_devices_refuse(
    rig: tuple[int, Path, dict[str, Path], RawClient], tmp_path: Path
) -> None:
    """`fleetbus rollout push` of a model no runtime can load ends non-zero, naming the refusal."""
    port, key, _, observer = rig
    wait_until(lambda: sum(v.online for v in fold(observer).devices.values()) == 3, what="3 births")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(build_broken("bad_op"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemas.cli",
            "rollout",
            "push",
            str(bad),
            "--version",
            "6.6.6",
            "--to",
            "e2e-1",
            "--key",
            str(key),
            "--broker",
            f"127.0.0.1:{port}",
            "--timeout",
            "60",
            "--no-strict",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    import json

    result = json.loads(proc.stdout)
    status = result["devices"]["e2e-1"]["status"]
    assert status in ("REJECTED", "INCOMPATIBLE", "FAILED")
    assert result["ok"] is False


def test_device_offline_at_publish_gets_the_rollout_when_it_starts(tmp_path: Path) -> None:
    """A targeted device that starts after the push is published still receives, commits and reports it."""
    private, public = write_keypair(tmp_path / "keys")
    model = tmp_path / "m.tflite"
    write_model(model, ModelSpec(seed=9, pad_to=200_000))
    with fleetbus_broker() as port:
        results: list[object] = []

        def push() -> None:
            with Publisher(BrokerAddress(port=port), private) as pub:
                results.append(pub.push(model, "3.0.0", Targets(devices=("late-1",)), timeout=60))

        pusher = threading.Thread(target=push)
        pusher.start()
        time.sleep(1.0)  # the deploy is published and retained before the agent exists
        with agent_processes(tmp_path, port, public.read_text().strip(), ["late-1"]) as homes:
            pusher.join(90)
            (result,) = results
            assert isinstance(result, RolloutResult)
            assert result.ok, result.as_dict()
            active = homes["late-1"] / "state" / "models" / "active.tflite"
            assert hashlib.sha256(active.read_bytes()).hexdigest() == result.manifest.model_sha256
