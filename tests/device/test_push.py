"""The first chunks pushed with a live deploy (docs/protocol.md): taken without a fetch, never
awaited after a retained replay, and fetched when they do not come (in-process agent, real broker)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.agent import Agent
from device.config import load_settings
from publisher.modelgen import ModelSpec, build_model
from schemas import topics
from schemas.codec import encode
from schemas.messages import Chunk, Deploy, Manifest
from schemas.signing import sign
from tests.device.conftest import Rig, client, make_manifest, seed_active, write_config

V1 = ModelSpec(input_size=4, output_size=3, seed=1)
V2 = ModelSpec(input_size=4, output_size=3, seed=2, pad_to=20_000)  # 5 chunks of 4 KiB
GROUP = "line"


@pytest.fixture
def model() -> bytes:
    return build_model(V2)


def _agent(rig: Rig, tmp_path: Path, device: str, *, accept_push: bool = True) -> Agent:
    state = tmp_path / device
    seed_active(state, build_model(V1), "1.0")
    cfg = write_config(
        tmp_path / f"{device}.toml", device, rig.port, [rig.keys.public_hex], state, groups=(GROUP,)
    )
    settings = load_settings(cfg)
    transfer = dataclasses.replace(settings.transfer, accept_push=accept_push)
    return Agent(dataclasses.replace(settings, transfer=transfer))


@contextlib.contextmanager
def _running(rig: Rig, agent: Agent) -> Iterator[Agent]:
    """The agent started and born (its subscriptions made), stopped on the way out."""
    agent.start()
    try:
        rig.observer.wait(lambda: rig.observer.of(agent.device_id, "birth"), 20, "birth")
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def agent(rig: Rig, tmp_path: Path) -> Iterator[Agent]:
    with _running(rig, _agent(rig, tmp_path, "dev-p")) as a:
        yield a


def _deploy_and_push(rig: Rig, model: bytes, m: Manifest, pushed: int, send: range) -> None:
    """The deploy, then chunks ``send`` on the group's push topic, on one connection (as announce does)."""
    deploy = sign(m, rig.keys.private, rig.keys.kid).model_copy(update={"pushed": pushed})
    c = client(rig.port, "operator")
    try:
        infos = [c.publish(topics.group_desired(GROUP), encode(deploy), qos=1, retain=True)]
        for i in send:
            chunk = Chunk(
                sha256=m.model_sha256, index=i, data=model[i * m.chunk_size : (i + 1) * m.chunk_size]
            )
            infos.append(c.publish(topics.push(GROUP, m.model_sha256, i), encode(chunk), qos=1))
        for info in infos:
            info.wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def _fetches_for(rig: Rig, m: Manifest) -> int:
    return sum(f.sha256 == m.model_sha256 for f in rig.chunks.fetches)


def test_a_live_deploy_takes_its_pushed_chunks_without_a_fetch(rig: Rig, agent: Agent, model: bytes) -> None:
    """Every chunk pushed after the deploy: the device commits with no fetch at all, none answered."""
    m = make_manifest(model, "2.0", spec=V2)
    assert m.chunk_count == 5
    rig.chunks.paused = True  # a fetch would go unanswered: the push alone must do
    _deploy_and_push(rig, model, m, pushed=5, send=range(5))
    rig.observer.wait_state("dev-p", "SUCCEEDED", m.rollout_id)
    counts = agent.counters.snapshot()
    assert counts["pushes_awaited"] == 1
    assert counts["chunks_stored"] == 5
    assert counts.get("fetches", 0) == 0
    assert _fetches_for(rig, m) == 0


def test_a_push_shorter_than_the_file_asks_for_the_rest_past_what_is_on_its_way(
    rig: Rig, agent: Agent, model: bytes
) -> None:
    """Four of five chunks pushed: the fetch sent when half are in claims the pushed ones, so only
    the fifth is served."""
    m = make_manifest(model, "2.0", spec=V2)
    rig.chunks.serve(model, m)
    _deploy_and_push(rig, model, m, pushed=4, send=range(4))
    rig.observer.wait_state("dev-p", "SUCCEEDED", m.rollout_id)
    assert agent.counters.get("pushes_awaited") == 1
    assert agent.counters.get("duplicate_chunks") == 0
    assert rig.chunks.sent_to("dev-p") == 1
    first = next(f for f in rig.chunks.fetches if f.sha256 == m.model_sha256)
    assert first.bitmap[0] & 0b1111 == 0b1111  # held or on their way


def test_a_retained_deploy_is_fetched_at_once_whatever_it_says_was_pushed(
    rig: Rig, tmp_path: Path, model: bytes
) -> None:
    """A device that connects after the deploy gets it retained: no push follows, so it fetches."""
    m = make_manifest(model, "2.0", spec=V2)
    rig.chunks.serve(model, m)
    _deploy_and_push(rig, model, m, pushed=5, send=range(0))  # retained, with no one to push to
    with _running(rig, _agent(rig, tmp_path, "dev-late")) as a:
        rig.observer.wait_state("dev-late", "SUCCEEDED", m.rollout_id)
        assert a.counters.get("pushes_awaited") == 0
        assert a.counters.get("fetch_retries") == 0  # not a fetch timeout spent waiting for a push
        assert a.counters.get("fetches") >= 1


def test_pushed_chunks_that_never_come_are_fetched_after_the_timeout(
    rig: Rig, agent: Agent, model: bytes
) -> None:
    """Five announced, one pushed: silence ends the wait and the next fetch no longer claims the rest."""
    m = make_manifest(model, "2.0", spec=V2)
    rig.chunks.serve(model, m)
    _deploy_and_push(rig, model, m, pushed=5, send=range(1))
    rig.observer.wait_state("dev-p", "SUCCEEDED", m.rollout_id)
    assert agent.counters.get("pushes_awaited") == 1
    assert agent.counters.get("fetch_retries") >= 1
    assert rig.chunks.sent_to("dev-p") == 4


def test_a_pushed_chunk_that_overtook_its_deploy_is_fetched_without_waiting(
    rig: Rig, agent: Agent, model: bytes
) -> None:
    """amqtt may reorder: chunk 0 lands before the deploy and is dropped; the device does not wait
    for it as if it were still coming (a fetch timeout), but asks for it in its first fetch."""
    m = make_manifest(model, "2.0", spec=V2)
    rig.chunks.serve(model, m)
    rig.chunks.paused = True  # hold the answer, to look at the first fetch before anything else
    deploy = sign(m, rig.keys.private, rig.keys.kid).model_copy(update={"pushed": 5})

    def chunk(i: int) -> tuple[str, tuple[str, bytes, bool]]:
        data = model[i * m.chunk_size : (i + 1) * m.chunk_size]
        payload = encode(Chunk(sha256=m.model_sha256, index=i, data=data))
        return ("message", (topics.push(GROUP, m.model_sha256, i), payload, False))

    # The link's inbox, in the order a reordering broker would deliver: what it is for.
    agent._events.put(chunk(0))
    agent._events.put(("message", (topics.group_desired(GROUP), encode(deploy), False)))
    for i in range(1, 5):
        agent._events.put(chunk(i))
    first = rig.observer.wait(
        lambda: next((f for f in rig.chunks.fetches if f.sha256 == m.model_sha256), None), 10, "a fetch"
    )
    assert agent.counters.get("fetch_retries") == 0  # asked when the push was half in, not on a timeout
    assert first.bitmap[0] & 0b11111 == 0b11110  # chunk 0 asked for, 1-4 held or on their way
    assert agent.counters.get("unexpected_chunks") == 1
    rig.chunks.paused = False
    rig.observer.wait_state("dev-p", "SUCCEEDED", m.rollout_id)
    assert rig.chunks.sent_to("dev-p") == 1


def test_a_device_that_refuses_pushes_does_not_subscribe_and_fetches(
    rig: Rig, tmp_path: Path, model: bytes
) -> None:
    """accept_push = false: no push subscription, the deploy's count is ignored, the download fetches."""
    a = _agent(rig, tmp_path, "dev-n", accept_push=False)
    assert topics.push_filter(GROUP) not in a._subscriptions()
    with _running(rig, a):
        m = make_manifest(model, "2.0", spec=V2)
        rig.chunks.serve(model, m)
        _deploy_and_push(rig, model, m, pushed=5, send=range(5))
        rig.observer.wait_state("dev-n", "SUCCEEDED", m.rollout_id)
        assert a.counters.get("pushes_awaited") == 0
        assert a.counters.get("fetches") >= 1


def test_deploy_defaults_to_no_push() -> None:
    """A deploy that says nothing was pushed decodes with pushed = 0 (older publishers)."""
    from schemas.codec import decode_as

    d = Deploy(rollout_id="r1", manifest=b"m", signature=b"s", key_id="k")
    assert decode_as(encode(d), Deploy).pushed == 0


def test_early_chunk_subscriptions_are_claimed_or_dropped(rig: Rig, agent: Agent, model: bytes) -> None:
    """The link subscribes to a deploy's chunks as it arrives; a deploy refused for its signature,
    or a desired message that is no deploy, leaves no such subscription behind, and another
    device's deploy makes none."""
    import msgpack

    from tests.device.conftest import make_keys, publish_raw

    m = make_manifest(model, "2.0", spec=V2)
    stranger = make_keys()
    forged = sign(m, stranger.private, rig.keys.kid)  # the pinned key's id, another key's signature
    publish_raw(rig.port, topics.group_desired(GROUP), encode(forged))
    rig.observer.wait(lambda: agent.counters.get("bad_signatures") == 1, 10, "the forged deploy refused")
    not_a_deploy = msgpack.packb({"v": 1, "kind": "rebirth", "manifest": encode(m)})
    publish_raw(rig.port, topics.group_desired(GROUP), not_a_deploy)
    rig.observer.wait(lambda: agent.counters.get("unexpected_kinds") == 1, 10, "the non-deploy refused")
    assert agent._early_blobs == set()
    assert agent._blob_filter is None
    agent._on_arrival(topics.device_desired("dev-other"), encode(sign(m, rig.keys.private, rig.keys.kid)))
    assert agent._early_blobs == set()
