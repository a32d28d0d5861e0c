"""Power cuts and kill -9 at every step: the agent resumes, fetches only what it lacks, never bricks."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.runtime import default_runtime
from publisher.modelgen import ModelSpec, build_model
from tests.device.conftest import (
    Keys,
    Observer,
    Rig,
    TinyChunkServer,
    make_manifest,
    seed_active,
    sha_file,
    staged_bits,
)
from tests.helpers import fleetbus_broker, free_port

V1 = ModelSpec(input_size=4, output_size=3, seed=1)
V2 = ModelSpec(input_size=4, output_size=3, seed=2, bias_add=0.5, pad_to=40_000)

# (crash point, whether chunks can still be missing when it fires)
CRASH_POINTS = [
    ("enter:QUEUED", True),
    ("enter:DOWNLOADING", True),
    ("chunk:3", True),  # mid-download, before the 4-chunk fsync batch is persisted
    ("chunk:6", True),  # mid-download, after one batch of bits reached the disk
    ("enter:VERIFYING", False),
    ("enter:STAGED", False),
    ("enter:GATING", False),
    ("enter:ACTIVATING", False),
    ("after_write", False),  # power cut: staged file synced, not yet renamed over active
    ("after_rename", False),  # power cut: renamed, directory not yet synced
    ("enter:SUCCEEDED", False),
]


@pytest.mark.parametrize(("crash_at", "downloading"), CRASH_POINTS, ids=[c for c, _ in CRASH_POINTS])
def test_kill_at_every_step_then_restart_converges(rig: Rig, crash_at: str, downloading: bool) -> None:
    """SIGKILL at each step leaves a loadable active model; a restart commits v2 fetching only gaps."""
    model1, model2 = build_model(V1), build_model(V2)
    agent = rig.agent("dev-k")
    sha1 = seed_active(agent.state_dir, model1, "1.0")
    m2 = make_manifest(model2, "2.0", spec=V2)
    agent.start(crash_at=crash_at)
    rig.deploy(model2, m2, device="dev-k")
    assert agent.wait_exit(30) == -9, agent.tail()

    # Whatever instant the power went, the active slot holds a whole model that loads.
    active = agent.state_dir / "models" / "active.tflite"
    assert sha_file(active) in (sha1, m2.model_sha256)
    default_runtime().load(active).close()

    held = staged_bits(agent.state_dir, m2.model_sha256)
    missing = m2.chunk_count - held if downloading else 0
    if crash_at == "chunk:6":
        assert held >= 4  # the first fsync batch was persisted before the kill
    mark = rig.observer.mark()
    agent.start()
    rig.observer.wait_state("dev-k", "SUCCEEDED", m2.rollout_id, since=mark)
    assert sha_file(active) == m2.model_sha256
    assert sha_file(agent.state_dir / "models" / "previous.tflite") == sha1
    counters = rig.observer.wait_health("dev-k", mark)
    # Only the chunks the persisted bitmap lacked crossed the broker again.
    assert counters.get("chunks_received", 0) == missing, (held, counters)
    assert counters.get("chunks_stored", 0) == missing
    rig.observer.wait(lambda: rig.observer.results_for("dev-k", "2.0", mark), 10, "v2 results")
    # Version numbers never go back, even across the kill (the last step is repeated above the reserve).
    numbers = [s.version_number for s in rig.observer.of("dev-k", "state")]
    assert numbers == sorted(numbers)


def test_a_model_that_kills_the_agent_in_the_gate_is_a_crash_loop(rig: Rig) -> None:
    """An agent that dies in the gate on every restart gives up after max_resumes; v1 keeps serving."""
    model1, model2 = build_model(V1), build_model(V2)
    agent = rig.agent("dev-loop", extra="max_resumes = 2")
    seed_active(agent.state_dir, model1, "1.0")
    m2 = make_manifest(model2, "2.0", spec=V2)
    agent.start(crash_at="do:gate")
    rig.deploy(model2, m2, device="dev-loop")
    assert agent.wait_exit(30) == -9, agent.tail()
    for _ in range(2):  # resumes 1 and 2 run the gate again and die again
        agent.start(crash_at="do:gate")
        assert agent.wait_exit(30) == -9, agent.tail()
    mark = rig.observer.mark()
    agent.start(crash_at="do:gate")  # resume 3 > max_resumes: crash loop, the gate is not run
    state = rig.observer.wait_state("dev-loop", "FAILED", m2.rollout_id)
    assert "crash loop" in (state.reason or "")
    assert agent.proc is not None
    assert agent.proc.poll() is None
    rig.observer.wait(lambda: rig.observer.results_for("dev-loop", "1.0", mark), 10, "v1 results")
    assert not (agent.state_dir / "models" / f"staging-{m2.model_sha256}.part").exists()


def test_broker_restart_mid_download_resumes_without_refetching(tmp_path: Path, keys: Keys) -> None:
    """The broker dies halfway through a download; after it returns only the missing chunks move."""
    port = free_port()
    model2 = build_model(V2)
    m2 = make_manifest(model2, "2.0", spec=V2)
    with fleetbus_broker(port):
        rig = Rig(port, tmp_path, keys, Observer(port), TinyChunkServer(port))
        agent = rig.agent("dev-b")
        seed_active(agent.state_dir, build_model(V1), "1.0")
        agent.start()
        rig.observer.wait(lambda: rig.observer.of("dev-b", "birth"), 20, "birth")
        rig.chunks.budget = 5  # the chunk server goes quiet after 5 chunks: the download is half done
        rig.deploy(model2, m2, device="dev-b")
        rig.observer.wait(lambda: staged_bits(agent.state_dir, m2.model_sha256) >= 4, 20, "half a download")
    try:
        # The broker is gone (no persistence: retained deploys and sessions are lost with it).
        held = staged_bits(agent.state_dir, m2.model_sha256)
        assert 4 <= held < m2.chunk_count
        with fleetbus_broker(port):
            mark = rig.observer.mark()
            rig.chunks.budget = None
            rig.observer.wait_state("dev-b", "SUCCEEDED", m2.rollout_id, timeout=40, since=mark)
            assert sha_file(agent.state_dir / "models" / "active.tflite") == m2.model_sha256
            counters = rig.observer.wait_health("dev-b", mark)
            # One process across both brokers: every chunk was received exactly once.
            assert counters.get("chunks_received") == m2.chunk_count, counters
            assert counters.get("duplicate_chunks", 0) == 0
    finally:
        agent.stop()
        rig.chunks.close()
        rig.observer.close()
