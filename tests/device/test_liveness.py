"""Birth and death as in Sparkplug B, and the commands that stop or replace a rollout."""

from __future__ import annotations

from publisher.modelgen import ModelSpec, build_model
from schemas import topics
from schemas.codec import encode
from schemas.messages import Cancel
from tests.device.conftest import Rig, make_manifest, publish_raw, seed_active, sha_file

V1 = ModelSpec(input_size=4, output_size=3, seed=1)
V2 = ModelSpec(input_size=4, output_size=3, seed=2, pad_to=20_000)
V3 = ModelSpec(input_size=4, output_size=3, seed=3, pad_to=20_000)


def test_birth_advertises_the_device_and_death_matches_it_after_kill(rig: Rig) -> None:
    """Birth carries versions, ops, RAM, disk and model; SIGKILL fires a death with the same bdseq."""
    agent = rig.agent("dev-l", groups=("lab",))
    sha1 = seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    birth = rig.observer.wait(lambda: rig.observer.of("dev-l", "birth"), 20, "birth")[0]
    assert (birth.model_version, birth.model_sha256) == ("1.0", sha1)
    assert {"FULLY_CONNECTED", "ADD"} <= set(birth.ops)
    assert birth.runtime in ("litert", "tflite-runtime")
    assert birth.ram_total_bytes > 0
    assert birth.disk_free_bytes > 0
    assert birth.groups == ["lab"]
    agent.kill()
    death = rig.observer.wait(lambda: rig.observer.of("dev-l", "death"), 20, "death")[0]
    assert death.bdseq == birth.bdseq
    mark = rig.observer.mark()
    agent.start()
    again = rig.observer.wait(lambda: rig.observer.of("dev-l", "birth", mark), 20, "second birth")[0]
    assert again.bdseq == birth.bdseq + 1


def test_rebirth_command_to_a_group(rig: Rig) -> None:
    """A rebirth on the group command topic makes the device publish its birth again, same bdseq."""
    agent = rig.agent("dev-rb", groups=("lab",))
    agent.start()
    first = rig.observer.wait(lambda: rig.observer.of("dev-rb", "birth"), 20, "birth")[0]
    from schemas.messages import Rebirth

    publish_raw(rig.port, topics.group_cmd("lab"), encode(Rebirth()))
    births = rig.observer.wait(
        lambda: len(rig.observer.of("dev-rb", "birth")) >= 2 and rig.observer.of("dev-rb", "birth"),
        10,
        "rebirth",
    )
    assert births[-1].bdseq == first.bdseq


def test_newer_deploy_supersedes_and_cancel_stops_a_download(rig: Rig) -> None:
    """A newer deploy cancels the one in flight; a cancel command stops it; v1 keeps serving."""
    agent = rig.agent("dev-x", groups=("lab",))
    sha1 = seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    rig.chunks.paused = True  # downloads stay in flight until the test is done with them
    model2, model3 = build_model(V2), build_model(V3)
    m2 = make_manifest(model2, "2.0", spec=V2)
    rig.deploy(model2, m2, device="dev-x")
    rig.observer.wait_state("dev-x", "IN_PROGRESS", m2.rollout_id)
    m3 = make_manifest(model3, "3.0", spec=V3)
    rig.deploy(model3, m3, group="lab")
    state = rig.observer.wait_state("dev-x", "CANCELED", m2.rollout_id)
    assert "superseded by rollout r-3.0" in (state.reason or "")
    rig.observer.wait_state("dev-x", "IN_PROGRESS", m3.rollout_id)
    mark = rig.observer.mark()
    publish_raw(rig.port, topics.device_cmd("dev-x"), encode(Cancel(rollout_id=m3.rollout_id)))
    state = rig.observer.wait_state("dev-x", "CANCELED", m3.rollout_id, since=mark)
    assert state.reason == "canceled by the operator"
    assert not list((agent.state_dir / "models").glob("staging-*"))
    assert sha_file(agent.state_dir / "models" / "active.tflite") == sha1
    rig.observer.wait(lambda: rig.observer.results_for("dev-x", "1.0", mark), 10, "v1 results")
    numbers = [s.version_number for s in rig.observer.of("dev-x", "state")]
    assert numbers == sorted(numbers)
