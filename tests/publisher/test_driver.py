"""The rollout driver inside serve, over a real broker: submissions, deploys, controls, restart, timeouts.

Devices here are hand-written births and states published by a raw paho client (the agents' side is
covered by tests/integration/test_staged_rollout*.py); serve's parts are the real ones, wired as
`fleetbus serve --key` wires them.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from publisher.bus import BrokerAddress, Bus
from publisher.document import ModelRef, RetryType, RolloutDocument, Targets, Wave
from publisher.driver import RolloutDriver
from publisher.errors import ConfigError, RolloutError
from publisher.modelgen import ModelSpec, write_model
from publisher.service import Aggregator, ServeOptions
from publisher.store import SqliteStore
from publisher.submission import SignedSubmission, open_submission, sign_submission
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.messages import Birth, Cancel, Deploy, ExecStatus, Manifest, RolloutControl, State
from schemas.signing import SignatureError, load_private_key, pin_keys, write_keypair
from tests.helpers import fleetbus_broker
from tests.publisher.live import RawClient, wait_until

DEVICES = ("d1", "d2")


@dataclass
class Serve:
    """Serve's parts in this process, restartable on the same store and blob directory."""

    port: int
    root: Path
    key: Path
    bus: Bus | None = None
    store: SqliteStore | None = None
    driver: RolloutDriver | None = None
    aggregator: Aggregator | None = None

    def start(self) -> RolloutDriver:
        self.bus = Bus(BrokerAddress(port=self.port))
        self.store = SqliteStore(self.root / "serve.db")
        self.aggregator = Aggregator(self.bus, self.store, ServeOptions())
        self.driver = RolloutDriver(self.bus, self.store, self.key, self.root / "blobs")
        self.driver.attach(self.aggregator)
        self.driver.restore()
        self.bus.connect()
        self.driver.start()
        self.aggregator.start()
        return self.driver

    def stop(self) -> None:
        assert self.driver is not None
        assert self.bus is not None
        assert self.store is not None
        self.driver.stop()
        self.bus.close()
        self.store.close()


@dataclass
class Rig:
    serve: Serve
    driver: RolloutDriver
    device: RawClient
    model: Path
    key: Path


def _birth(device: str, bdseq: int = 1) -> bytes:
    birth = Birth(
        device_id=device, bdseq=bdseq, groups=["g"], agent_version="t", runtime="t", runtime_version="0"
    )
    return encode(birth)


def _state(device: str, rollout: str, status: ExecStatus, version: int) -> bytes:
    return encode(State(device_id=device, rollout_id=rollout, status=status, version_number=version))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A broker, serve's driver and aggregator, and a raw client speaking for devices d1 and d2."""
    private, _ = write_keypair(tmp_path / "keys")
    model = tmp_path / "m.tflite"
    write_model(model, ModelSpec(seed=5))
    with fleetbus_broker() as port:
        device = RawClient(port)
        device.subscribe(topics.PREFIX + "/desired/dev/+", topics.PREFIX + "/cmd/dev/+")
        for d in DEVICES:
            device.publish(topics.device_stream(d, topics.DeviceStream.BIRTH), _birth(d), retain=True)
        serve = Serve(port, tmp_path, private)
        driver = serve.start()
        wait_until(lambda: {d for d, _ in driver.fleet().items()} == set(DEVICES), what="births")
        try:
            yield Rig(serve, driver, device, model, private)
        finally:
            serve.stop()
            device.close()


def _upload(driver: RolloutDriver, model: Path) -> str:
    data = model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    driver.put_blob(sha, len(data), io.BytesIO(data), 1 << 30)
    return sha


def _submit(rig: Rig, doc: RolloutDocument) -> SignedSubmission:
    sha = _upload(rig.driver, rig.model)
    private, kid = load_private_key(rig.key)
    return sign_submission(doc, sha, rig.model.stat().st_size, private=private, key_id=kid)


def _doc(rig: Rig, **fields: object) -> RolloutDocument:
    base: dict[str, object] = {
        "id": "r1",
        "model": ModelRef(path=str(rig.model), version="2.0.0"),
        "targets": Targets(groups=["g"]),
        "seed": "s",
        "waves": [Wave(count=1), Wave(percent=100)],
    }
    base.update(fields)
    return RolloutDocument(**base)  # type: ignore[arg-type]


def _deploys(client: RawClient) -> list[tuple[str, Manifest]]:
    out = []
    for topic, payload, _ in list(client.received):
        parsed = topics.parse(topic)
        if parsed.kind == "desired_dev" and payload:
            out.append((str(parsed.device), decode_as(decode_as(payload, Deploy).manifest, Manifest)))
    return out


def _cancels(client: RawClient) -> list[tuple[str, str]]:
    return [
        (str(topics.parse(t).device), decode_as(p, Cancel).rollout_id)
        for t, p, _ in list(client.received)
        if topics.parse(t).kind == "cmd_dev"
    ]


def test_a_submission_opens_only_with_a_pinned_key_and_untouched_bytes(tmp_path: Path) -> None:
    """The signed document opens with the signer's key; another key or one changed byte is refused."""
    doc = RolloutDocument(model=ModelRef(path="/x/m.tflite", version="1"), targets=Targets(groups=["g"]))
    private_path, public_path = write_keypair(tmp_path / "a")
    _, other = write_keypair(tmp_path / "b")
    private, kid = load_private_key(private_path)
    signed = sign_submission(doc, "ab" * 32, 10, private=private, key_id=kid)
    opened = open_submission(SignedSubmission.from_json(signed.to_json()), pin_keys([str(public_path)]))
    assert opened.rollout_id == doc.rollout_id
    assert opened.document["model"]["path"] == "m.tflite"
    with pytest.raises(SignatureError, match="does not pin"):
        open_submission(signed, pin_keys([str(other)]))
    tampered = SignedSubmission(
        signed.body.replace(b'"version":"1"', b'"version":"9"'), signed.signature, kid
    )
    with pytest.raises(SignatureError, match="bad signature"):
        open_submission(tampered, pin_keys([str(public_path)]))


def test_an_upload_that_does_not_hash_to_its_name_is_refused(rig: Rig) -> None:
    """A model upload is stored only when its bytes hash to the SHA-256 it was sent under."""
    data = rig.model.read_bytes()
    with pytest.raises(ConfigError, match="hash to"):
        rig.driver.put_blob("0" * 64, len(data), io.BytesIO(data), 1 << 30)
    assert rig.driver.has_blob("0" * 64) is None
    sha = _upload(rig.driver, rig.model)
    assert rig.driver.has_blob(sha) == len(data)


def test_waves_are_driven_from_device_states_to_completion(rig: Rig) -> None:
    """The canary gets the deploy first; its SUCCEEDED starts the next wave; the last one completes it."""
    status = rig.driver.submit(_submit(rig, _doc(rig)))
    assert status.state == "RUNNING"
    wait_until(lambda: len(_deploys(rig.device)) == 1, what="the canary's deploy")
    canary, manifest = _deploys(rig.device)[0]
    assert manifest.rollout_id == "r1"
    assert manifest.version == "2.0.0"
    assert manifest.golden, "serve computes golden cases for the commit gate"
    rig.device.publish(
        topics.device_stream(canary, topics.DeviceStream.STATE),
        _state(canary, "r1", ExecStatus.SUCCEEDED, 1),
        retain=True,
    )
    wait_until(lambda: len(_deploys(rig.device)) == 2, what="the second wave's deploy")
    other = _deploys(rig.device)[1][0]
    assert {canary, other} == set(DEVICES)
    rig.device.publish(
        topics.device_stream(other, topics.DeviceStream.STATE),
        _state(other, "r1", ExecStatus.SUCCEEDED, 1),
        retain=True,
    )
    wait_until(lambda: rig.driver.statuses()[0].state == "COMPLETED", what="COMPLETED")
    with pytest.raises(RolloutError, match="COMPLETED"):
        rig.driver.control(RolloutControl(rollout_id="r1", action="pause"))
    with pytest.raises(LookupError):
        rig.driver.control(RolloutControl(rollout_id="nope", action="pause"))


def test_a_restarted_driver_resumes_without_notifying_again(rig: Rig) -> None:
    """After a stop and a restore from the store, the rollout goes on and nobody gets a second deploy."""
    rig.driver.submit(_submit(rig, _doc(rig)))
    wait_until(lambda: len(_deploys(rig.device)) == 1, what="the canary's deploy")
    canary = _deploys(rig.device)[0][0]
    rig.serve.stop()
    rig.device.publish(
        topics.device_stream(canary, topics.DeviceStream.STATE),
        _state(canary, "r1", ExecStatus.SUCCEEDED, 1),
        retain=True,
    )
    driver = rig.serve.start()
    assert [s.rollout_id for s in driver.statuses()] == ["r1"]
    wait_until(lambda: len(_deploys(rig.device)) == 2, what="the second wave's deploy")
    time.sleep(2.0)  # past the reconcile point: nothing more may be published
    assert sorted(d for d, _ in _deploys(rig.device)) == sorted(DEVICES)
    assert driver.counters["deploys_republished"] == 0


def test_a_device_that_times_out_is_canceled_and_retried_with_a_new_execution_id(rig: Rig) -> None:
    """No report within the timeout: a cancel for that attempt, then a retry deploy `{id}:r2`."""
    doc = _doc(rig, waves=[Wave(percent=100)], in_progress_timeout_s=1.0, retries={RetryType.TIMED_OUT: 1})
    rig.driver.submit(_submit(rig, doc))
    wait_until(lambda: len(_deploys(rig.device)) == 4, timeout=20, what="first deploys and retries")
    ids = sorted(m.rollout_id for _, m in _deploys(rig.device))
    assert ids == ["r1", "r1", "r1:r2", "r1:r2"]
    assert sorted(_cancels(rig.device))[:2] == [("d1", "r1"), ("d2", "r1")]


def test_bad_controls_and_foreign_states_are_counted_and_ignored(rig: Rig) -> None:
    """A malformed control, a control on another rollout's topic and a stray state change nothing."""
    rig.driver.submit(_submit(rig, _doc(rig)))
    rig.device.publish(topics.rollout_control("r1"), b"\x93garbage")
    rig.device.publish(topics.rollout_control("r1"), encode(RolloutControl(rollout_id="r2", action="cancel")))
    rig.device.publish(
        topics.device_stream("d1", topics.DeviceStream.STATE), _state("d1", "elsewhere", ExecStatus.FAILED, 3)
    )
    wait_until(lambda: rig.driver.counters["bad_controls"] == 2, what="bad controls counted")
    wait_until(lambda: rig.driver.counters["states_of_other_rollouts"] >= 1, what="stray state counted")
    assert rig.driver.statuses()[0].state == "RUNNING"
    paused = rig.driver.control(RolloutControl(rollout_id="r1", action="pause", by="test"))
    assert paused.state == "PAUSED"
