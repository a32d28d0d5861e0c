"""What the agent refuses, and that the old model keeps serving while it does (real processes)."""

from __future__ import annotations

from typing import Any

import pytest

from publisher.modelgen import HUGE_ARENA_BYTES, ModelSpec, build_broken, build_model, model_ops
from schemas.messages import Deploy
from schemas.signing import sign
from tests.device.conftest import Rig, make_keys, make_manifest, publish_deploy, seed_active, sha_file

V1 = ModelSpec(input_size=4, output_size=3, seed=1)
GOOD = ModelSpec(input_size=4, output_size=3, seed=5)


def _still_serving_v1(rig: Rig, device: str, sha1: str, since: int) -> None:
    agent = next(a for a in rig.agents if a.device == device)
    assert sha_file(agent.state_dir / "models" / "active.tflite") == sha1
    rig.observer.wait(lambda: rig.observer.results_for(device, "1.0", since), 10, "v1 results after refusal")


# (case, model bytes, manifest overrides, expected status, words in the reason)
def _broken_cases() -> list[tuple[str, bytes, dict[str, Any], str, str]]:
    v1_manifest = make_manifest(build_model(V1), "x", spec=V1)
    bad_op = build_broken("bad_op", GOOD)
    huge = build_broken("huge_arena", GOOD)
    return [
        ("truncated", build_broken("truncated", GOOD), {}, "REJECTED", "load"),
        ("garbage", build_broken("garbage", GOOD), {}, "REJECTED", "load"),
        ("bad_op_declared", bad_op, {"ops": model_ops(bad_op)}, "INCOMPATIBLE", "lacks ops"),
        ("bad_op_undeclared", bad_op, {"ops": []}, "REJECTED", "load"),
        (
            "wrong_shape",
            build_broken("wrong_shape", GOOD),
            {"outputs": v1_manifest.outputs},
            "REJECTED",
            "contract",
        ),
        ("nan_output", build_broken("nan_output", GOOD), {}, "REJECTED", "NaN"),
        ("huge_arena_declared", huge, {"arena_bytes": HUGE_ARENA_BYTES}, "INCOMPATIBLE", "arena"),
        ("huge_arena_budget", huge, {"arena_budget_bytes": 1 << 20}, "REJECTED", "arena"),
        ("too_slow", build_model(GOOD), {"latency_budget_ms": 1e-6}, "REJECTED", "latency"),
    ]


def test_broken_and_incompatible_models_are_refused_while_v1_serves(rig: Rig) -> None:
    """Each broken model is REJECTED by the gate or INCOMPATIBLE up front; v1 never stops serving."""
    agent = rig.agent("dev-r", extra="", env={})
    # Advertise 4 MiB so the huge-arena model (8 MiB) is incompatible on this device.
    agent.config.write_text(agent.config.read_text().replace("[mqtt]", "ram_bytes = 4194304\n\n[mqtt]"))
    sha1 = seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    rig.observer.wait(lambda: rig.observer.results_for("dev-r", "1.0"), 20, "v1 results")
    for n, (case, model, overrides, status, words) in enumerate(_broken_cases()):
        m = make_manifest(model, f"2.{n}", rollout_id=f"r-{case.replace('_', '-')}", spec=GOOD, **overrides)
        mark = rig.observer.mark()
        rig.deploy(model, m, device="dev-r")
        state = rig.observer.wait_state("dev-r", status, m.rollout_id, since=mark)
        assert words in (state.reason or ""), (case, state.reason)
        if status == "INCOMPATIBLE":  # decided from the manifest: not one chunk was asked for
            assert not [f for f in rig.chunks.fetches if f.sha256 == m.model_sha256], case
        _still_serving_v1(rig, "dev-r", sha1, mark)
    assert not list((agent.state_dir / "models").glob("staging-*"))


def test_downgrade_refused_unless_signed_as_rollback(rig: Rig) -> None:
    """An older version is REJECTED; the same version signed with rollback = true is installed."""
    agent = rig.agent("dev-d")
    seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    old = build_model(GOOD)
    m = make_manifest(old, "0.9", rollout_id="r-down", spec=GOOD)
    rig.deploy(old, m, device="dev-d")
    state = rig.observer.wait_state("dev-d", "REJECTED", "r-down")
    assert "older" in (state.reason or "")
    m2 = make_manifest(old, "0.9", rollout_id="r-down-signed", spec=GOOD, rollback=True)
    rig.deploy(old, m2, device="dev-d")
    rig.observer.wait_state("dev-d", "SUCCEEDED", "r-down-signed")
    assert sha_file(agent.state_dir / "models" / "active.tflite") == m2.model_sha256


def test_tampered_manifests_wrong_keys_and_tampered_chunks_are_refused(rig: Rig) -> None:
    """Bad signatures never start a rollout; bad chunks are never written; the download times out."""
    agent = rig.agent("dev-t")
    sha1 = seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    rig.observer.wait(lambda: rig.observer.of("dev-t", "birth"), 20, "birth")
    model = build_model(ModelSpec(input_size=4, output_size=3, seed=5, pad_to=20_000))

    stranger = make_keys()
    publish_deploy(
        rig.port,
        sign(make_manifest(model, "2.0", rollout_id="r-stranger"), stranger.private, stranger.kid),
        device="dev-t",
    )
    good = sign(make_manifest(model, "2.0", rollout_id="r-edited"), rig.keys.private, rig.keys.kid)
    edited = make_manifest(model, "9.9", rollout_id="r-edited")
    from schemas.codec import encode

    publish_deploy(
        rig.port,
        Deploy(rollout_id="r-edited", manifest=encode(edited), signature=good.signature, key_id=good.key_id),
        device="dev-t",
    )
    publish_deploy(
        rig.port,
        Deploy(rollout_id="r-unsigned", manifest=encode(edited), signature=b"", key_id=rig.keys.kid),
        device="dev-t",
    )
    mark = rig.observer.mark()
    counters = rig.observer.wait(
        lambda: (c := rig.observer.counters("dev-t", mark)).get("bad_signatures", 0) >= 3 and c,
        10,
        "three bad signatures counted",
    )
    assert counters["bad_signatures"] == 3
    assert not rig.observer.of("dev-t", "state"), "a refused deploy must not touch the reported state"

    # Every copy of chunk 1 is corrupted in transit: it is refused, and the download times out.
    rig.chunks.tamper = lambda i, data: bytes([data[0] ^ 0xFF]) + data[1:] if i == 1 else data
    m = make_manifest(model, "2.0", rollout_id="r-tampered", spec=GOOD, timeout_s=3.0)
    rig.deploy(model, m, device="dev-t")
    state = rig.observer.wait_state("dev-t", "TIMED_OUT", "r-tampered", timeout=20)
    assert "3 s" in (state.reason or "")
    counters = rig.observer.wait_health("dev-t", rig.observer.mark())
    assert counters.get("chunks_bad_hash", 0) >= 1
    _still_serving_v1(rig, "dev-t", sha1, mark)

    rig.chunks.tamper = None
    m3 = make_manifest(model, "2.1", rollout_id="r-clean", spec=GOOD)
    rig.deploy(model, m3, device="dev-t")
    rig.observer.wait_state("dev-t", "SUCCEEDED", "r-clean")


def test_watchdog_rolls_back_a_model_that_passes_the_gate_but_outputs_nan(rig: Rig) -> None:
    """A NaN-producing model with no golden cases commits, then the watchdog restores v1 and says why."""
    agent = rig.agent("dev-w")
    sha1 = seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    nan_model = build_broken("nan_output", GOOD)
    m = make_manifest(nan_model, "2.0", rollout_id="r-nan", spec=GOOD, golden=False)
    rig.deploy(nan_model, m, device="dev-w")
    rig.observer.wait_state("dev-w", "SUCCEEDED", "r-nan")
    mark = rig.observer.mark()
    state = rig.observer.wait_state("dev-w", "FAILED", "r-nan")
    assert state.details.get("rolled_back") == "true"
    assert "NaN" in (state.reason or "")
    assert state.model_version == "1.0"
    _still_serving_v1(rig, "dev-w", sha1, mark)
    assert rig.observer.wait_health("dev-w", mark).get("watchdog_trips") == 1


@pytest.mark.parametrize("target", ["desired", "cmd", "repair", "blob"])
def test_garbage_on_every_inbound_topic_is_counted_never_fatal(rig: Rig, target: str) -> None:
    """Malformed msgpack and unknown kinds on each topic the agent reads are counted; it keeps serving."""
    from schemas import topics
    from tests.device.conftest import publish_raw

    agent = rig.agent("dev-g")
    seed_active(agent.state_dir, build_model(V1), "1.0")
    agent.start()
    rig.observer.wait(lambda: rig.observer.of("dev-g", "birth"), 20, "birth")
    sha = "ab" * 32
    topic = {
        "desired": topics.device_desired("dev-g"),
        "cmd": topics.device_cmd("dev-g"),
        "repair": topics.repair("dev-g", sha, 0),
        "blob": topics.blob(sha, 0),
    }[target]
    if target in ("blob", "repair"):  # chunks are decoded only while that file is being downloaded
        model = build_model(GOOD)
        rig.chunks.paused = True
        m = make_manifest(model, "2.0", rollout_id="r-blob", spec=GOOD)
        rig.deploy(model, m, device="dev-g")
        rig.observer.wait_state("dev-g", "IN_PROGRESS", "r-blob")
        if target == "blob":
            topic = topics.blob(m.model_sha256, 0)
        else:
            topic = topics.repair("dev-g", m.model_sha256, 0)
    mark = rig.observer.mark()
    publish_raw(rig.port, topic, b"\xc1 not msgpack")
    publish_raw(rig.port, topic, b"\x81\xa4kind\xa4nope")
    counters = rig.observer.wait(
        lambda: (c := rig.observer.counters("dev-g", mark)).get("decode_errors", 0) >= 2 and c,
        10,
        "decode errors counted",
    )
    assert counters["decode_errors"] == 2
    assert agent.proc is not None
    assert agent.proc.poll() is None
    rig.observer.wait(lambda: rig.observer.results_for("dev-g", "1.0", mark), 10, "results keep flowing")
