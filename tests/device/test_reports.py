"""State reports: a step is persisted before it is reported, progress is not, numbers only grow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from device.agent import VERSION_RESERVE, Agent
from device.config import settings_from_dict
from device.rollout import Step
from device.store import AgentState, with_step
from publisher.modelgen import ModelSpec, build_model
from schemas import topics
from schemas.codec import decode_as, encode
from schemas.messages import State
from schemas.signing import sign
from tests.device.conftest import Keys, make_keys, make_manifest


def _agent(state_dir: Path, keys: Keys, sent: list[State]) -> Agent:
    settings = settings_from_dict(
        {
            "device": {"id": "dev-r", "state_dir": str(state_dir)},
            "mqtt": {"host": "127.0.0.1", "port": 1},
            "trust": {"publisher_keys": [keys.public_hex]},
        }
    )
    agent = Agent(settings)
    # The link is never started: record what would go on the wire instead.
    agent.link.publish = lambda topic, payload, qos=0, retain=False: sent.append(decode_as(payload, State))  # type: ignore[method-assign]
    return agent


def test_progress_reports_use_reserved_numbers_without_saving_state(tmp_path: Path, keys: Keys) -> None:
    """Progress reports leave state.json untouched until the reserve runs out; numbers stay contiguous."""
    sent: list[State] = []
    agent = _agent(tmp_path, keys, sent)
    agent.state = AgentState(step=Step.DOWNLOADING, rollout_id="r-1")
    agent._report()
    saved = agent.store.state_file.read_bytes()
    for pct in range(1, VERSION_RESERVE):
        agent._report(percent=pct)
    assert agent.store.state_file.read_bytes() == saved
    agent._report(percent=99)  # past the reserve: a new reserve is persisted first
    assert agent.store.load_state().version_reserved >= sent[-1].version_number
    assert [s.version_number for s in sent] == list(range(1, VERSION_RESERVE + 2))


def test_a_restarted_agent_numbers_above_every_unpersisted_progress_report(
    tmp_path: Path, keys: Keys
) -> None:
    """After a restart the last step is repeated above every number sent, and the next report above it."""
    sent: list[State] = []
    agent = _agent(tmp_path, keys, sent)
    agent.state = AgentState(step=Step.FAILED, rollout_id="r-1")
    agent._report()
    agent._report(percent=30)
    agent._report(percent=40)
    after: list[State] = []
    again = _agent(tmp_path, keys, after)
    again._boot()
    assert again._last_state_msg is not None
    repeated = decode_as(again._last_state_msg, State)
    assert repeated.status == sent[0].status
    assert repeated.version_number > max(s.version_number for s in sent)
    again._report()
    assert after[-1].version_number > repeated.version_number


def test_a_deploy_that_leads_to_no_download_leaves_no_chunk_subscription(tmp_path: Path, keys: Keys) -> None:
    """The early subscription to a deploy's chunks is dropped when its signature is refused."""
    agent = _agent(tmp_path, keys, [])
    calls: list[tuple[str, str]] = []
    agent.link.subscribe = lambda topics, qos=1: calls.extend(("sub", f) for f in topics)  # type: ignore[method-assign]
    agent.link.unsubscribe = lambda topic: calls.append(("unsub", topic))  # type: ignore[method-assign]
    model = build_model(ModelSpec(seed=3))
    m = make_manifest(model, "2.0")
    forged = sign(m, make_keys().private, keys.kid)  # the pinned key's id, another key's signature
    agent._on_deploy(forged, encode(forged))
    blob = topics.blob_filter(m.model_sha256)
    assert calls == [("sub", blob), ("unsub", blob)]
    assert agent.counters.snapshot().get("bad_signatures") == 1


def test_queued_verifying_and_staged_are_reported_without_saving_state(tmp_path: Path, keys: Keys) -> None:
    """QUEUED, VERIFYING and STAGED go out under reserved numbers; GATING is saved before its report."""
    sent: list[State] = []
    agent = _agent(tmp_path, keys, sent)
    agent.state = AgentState(step=Step.DOWNLOADING, rollout_id="r-1")
    agent._report()
    saved = agent.store.state_file.read_bytes()
    for step in (Step.QUEUED, Step.VERIFYING, Step.STAGED):
        agent.state = with_step(agent.state, step)
        agent._report()
        assert agent.store.state_file.read_bytes() == saved, step
    agent.state = with_step(agent.state, Step.GATING)
    agent._report()
    assert agent.store.load_state().step is Step.GATING
    assert [s.details.get("step") for s in sent] == ["downloading", "queued", "verifying", "staged", "gating"]
    assert [s.version_number for s in sent] == [1, 2, 3, 4, 5]


def test_boot_persists_a_fresh_reserve_so_the_first_reports_need_no_save(tmp_path: Path, keys: Keys) -> None:
    """A booted agent's first unpersisted report leaves state.json as boot wrote it."""
    sent: list[State] = []
    agent = _agent(tmp_path, keys, sent)
    agent._boot()
    booted = agent.store.state_file.read_bytes()
    assert agent.store.load_state().version_reserved > agent._version
    agent.state = replace(agent.state, step=Step.QUEUED, rollout_id="r-1")
    agent._report()
    assert agent.store.state_file.read_bytes() == booted
    assert sent[-1].version_number == 1


def test_a_boot_that_cannot_save_its_reserve_counts_it_and_goes_on(tmp_path: Path, keys: Keys) -> None:
    """An unwritable state.json at boot is counted in health, not a crash; the first report saves."""
    sent: list[State] = []
    agent = _agent(tmp_path, keys, sent)
    blocker = agent.store.state_file.with_name("state.json.tmp")
    blocker.mkdir()  # atomic_write's temp file cannot be created (EISDIR), even for root
    agent._boot()
    assert agent.counters.snapshot().get("state_write_errors") == 1
    blocker.rmdir()
    agent.state = replace(agent.state, step=Step.QUEUED, rollout_id="r-1")
    agent._report()
    assert agent.store.load_state().version_reserved > sent[-1].version_number
