"""Malformed or misaddressed chunks and messages are counted and dropped (in-process agent, real broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from device.agent import Agent
from device.config import load_settings
from publisher.modelgen import ModelSpec, build_model
from schemas import topics
from schemas.codec import encode
from schemas.messages import Chunk, Rebirth
from schemas.signing import sign
from tests.device.conftest import Rig, make_manifest, publish_raw, seed_active, write_config

V1 = ModelSpec(input_size=4, output_size=3, seed=1)
V2 = ModelSpec(input_size=4, output_size=3, seed=2, pad_to=20_000)


def test_bad_chunks_are_classified_counted_and_never_written(rig: Rig, tmp_path: Path) -> None:
    """Out-of-range, wrong-size, bad-hash, duplicate, foreign and mislabelled chunks are each counted."""
    state = tmp_path / "dev-c"
    seed_active(state, build_model(V1), "1.0")
    cfg = write_config(tmp_path / "dev-c.toml", "dev-c", rig.port, [rig.keys.public_hex], state)
    agent = Agent(load_settings(cfg))
    agent.start()
    try:
        rig.observer.wait(lambda: rig.observer.of("dev-c", "birth"), 20, "birth")
        model = build_model(V2)
        m = make_manifest(model, "2.0", spec=V2)
        rig.chunks.paused = True  # chunks come only from this test
        rig.deploy(model, m, device="dev-c")
        rig.observer.wait_state("dev-c", "IN_PROGRESS", m.rollout_id)
        sha, cs = m.model_sha256, m.chunk_size

        def send(index: int, data: bytes, sha256: str = sha, topic_index: int | None = None) -> None:
            topic_i = index if topic_index is None else topic_index
            payload = encode(Chunk(sha256=sha256, index=index, data=data))
            publish_raw(rig.port, topics.repair("dev-c", sha256, topic_i), payload)

        send(0, model[:cs])
        send(0, model[:cs])  # duplicate
        send(99, model[:cs])  # out of range
        send(1, model[cs : 2 * cs - 1])  # one byte short
        send(2, b"\x01" * cs)  # right size, wrong bytes
        send(3, model[3 * cs : 4 * cs], sha256="cd" * 32)  # a file this device is not fetching
        send(3, model[3 * cs : 4 * cs], topic_index=4)  # the topic and the chunk disagree
        rig.observer.wait(lambda: agent.counters.get("chunk_topic_mismatch") == 1, 10, "all chunks handled")
        counts = agent.counters.snapshot()
        assert counts["chunks_stored"] == 1
        assert counts["duplicate_chunks"] == 1
        assert counts["chunks_out_of_range"] == 1
        assert counts["chunks_wrong_size"] == 1
        assert counts["chunks_bad_hash"] == 1
        assert counts["unexpected_chunks"] == 1

        # A deploy on another device's topic (amqtt can replay retained messages to anyone) is ignored.
        foreign = sign(make_manifest(model, "3.0", rollout_id="r-other"), rig.keys.private, rig.keys.kid)
        agent._events.put(("message", (topics.device_desired("dev-other"), encode(foreign))))
        publish_raw(rig.port, topics.device_cmd("dev-c"), encode(Rebirth()))
        rig.observer.wait(lambda: len(rig.observer.of("dev-c", "birth")) >= 2, 10, "rebirth")
        assert agent.counters.get("foreign_messages") >= 1
        assert agent.state.rollout_id == m.rollout_id
        births = rig.observer.of("dev-c", "birth")
        assert births[-1].bdseq == births[0].bdseq  # a rebirth is the same session
        assert agent.health().counters["chunks_bad_hash"] == 1

        rig.chunks.paused = False  # the real server fills in the rest
        rig.observer.wait_state("dev-c", "SUCCEEDED", m.rollout_id)
    finally:
        agent.stop()


class _FaultyRuntime:
    """The real runtime, except that loading a staged file raises something nobody expects."""

    def __init__(self) -> None:
        from device.runtime import default_runtime

        self._real = default_runtime()
        self.name, self.version = self._real.name, self._real.version

    def load(self, path: Any, num_threads: int = 1) -> Any:
        if "staging" in str(path):
            raise MemoryError("simulated allocator failure")
        return self._real.load(path, num_threads)

    def supported_ops(self) -> list[str]:
        return self._real.supported_ops()


def test_an_unexpected_exception_in_a_step_fails_the_rollout_not_the_agent(rig: Rig, tmp_path: Path) -> None:
    """A step that raises anything at all ends the rollout FAILED with the error; v1 keeps serving."""
    state = tmp_path / "dev-f"
    sha1 = seed_active(state, build_model(V1), "1.0")
    cfg = write_config(tmp_path / "dev-f.toml", "dev-f", rig.port, [rig.keys.public_hex], state)
    agent = Agent(load_settings(cfg), runtime=_FaultyRuntime())
    agent.start()
    try:
        model = build_model(V2)
        m = make_manifest(model, "2.0", spec=V2)
        rig.deploy(model, m, device="dev-f")
        failed = rig.observer.wait_state("dev-f", "FAILED", m.rollout_id)
        assert failed.reason == "gate: MemoryError: simulated allocator failure"
        assert agent.state.active is not None
        assert agent.state.active.sha256 == sha1
        mark = rig.observer.mark()
        rig.observer.wait(lambda: rig.observer.results_for("dev-f", "1.0", mark), 10, "v1 results")
    finally:
        agent.stop()
