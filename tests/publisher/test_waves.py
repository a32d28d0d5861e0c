"""The wave planner: reproducible canaries, compatibility, deferred offline devices, rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from publisher.document import Targets, Wave, rank
from publisher.errors import ConfigError
from publisher.waves import (
    INCOMPATIBLE,
    DeviceInfo,
    ModelNeeds,
    device_info_from_birth,
    incompatibility,
    plan_rollout,
    render_plan,
    render_plan_json,
)
from schemas.messages import Birth
from tests.publisher.rollout_helpers import document, fleet, make_plan

STAGED = [Wave(percent=1), Wave(percent=10), Wave(percent=50), Wave(percent=100)]


def test_same_seed_gives_the_same_waves() -> None:
    """Two plans from the same document and fleet are identical, whatever the fleet's dict order."""
    devices = fleet(50)
    shuffled = dict(reversed(list(devices.items())))
    doc = document(waves=STAGED)
    assert make_plan(doc, devices) == make_plan(doc, shuffled)


def test_different_seed_gives_different_waves() -> None:
    """Another seed picks another canary and another order."""
    devices = fleet(50)
    first = make_plan(document(waves=STAGED, seed="a"), devices)
    second = make_plan(document(waves=STAGED, seed="b"), devices)
    assert first.eligible != second.eligible
    assert sorted(first.eligible) == sorted(second.eligible)


def test_order_is_the_sha256_rank_of_seed_and_id() -> None:
    """The plan's order is sha256(seed NUL id): reproducible on any machine without our code."""
    import hashlib

    devices = fleet(10)
    plan = make_plan(document(seed="2026-11"), devices)
    expected = sorted(devices, key=lambda d: hashlib.sha256(f"2026-11\x00{d}".encode()).hexdigest())
    assert list(plan.eligible) == expected


def test_the_seed_defaults_to_the_model_version() -> None:
    """Without a seed, each model version draws its own canary."""
    plan = make_plan(document(seed=None), fleet(10))
    assert plan.seed == "2"
    assert list(plan.eligible) == rank("2", fleet(10))


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(20, [1, 1, 8, 10]), (200, [2, 18, 80, 100]), (3, [1, 0, 1, 1]), (1, [1, 0, 0, 0])],
)
def test_cumulative_percentages_cut_the_eligible_devices(n: int, sizes: list[int]) -> None:
    """1 % is at least one device; each wave adds up to ceil(percent x eligible) devices so far."""
    plan = make_plan(document(waves=STAGED), fleet(n))
    assert [len(w.devices) for w in plan.waves] == sizes
    assert sum(sizes) == n


def test_count_waves_take_a_fixed_number_first() -> None:
    """A count wave is a fixed-size canary; the percentages then cover the rest."""
    plan = make_plan(document(waves=[Wave(count=3), Wave(percent=100)]), fleet(20))
    assert [len(w.devices) for w in plan.waves] == [3, 17]
    assert plan.waves[0].label == "3 devices"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), seed=st.text(max_size=8), newcomer=st.integers(0, 10_000))
def test_adding_a_device_changes_each_waves_reach_by_at_most_one(n: int, seed: str, newcomer: int) -> None:
    """Adding a device keeps the others' order, and who is reached by each wave changes by one at most."""
    devices = fleet(n)
    grown = {**devices, f"new{newcomer}": DeviceInfo(groups=frozenset({"g"}))}
    doc = document(waves=STAGED, seed=seed)
    before, after = make_plan(doc, devices), make_plan(doc, grown)
    assert [d for d in after.eligible if d in devices] == list(before.eligible)
    for old_wave, new_wave in zip(before.waves, after.waves, strict=True):
        assert new_wave.cumulative - old_wave.cumulative in (0, 1)
        reached_before = set(before.eligible[: old_wave.cumulative])
        reached_after = set(after.eligible[: new_wave.cumulative]) & set(devices)
        assert len(reached_before ^ reached_after) <= 1


def test_devices_lacking_ops_or_ram_are_skipped_as_incompatible() -> None:
    """Ops the runtime lacks, or an arena larger than free RAM, skip the device with the reason."""
    devices = {
        "ok": DeviceInfo(
            groups=frozenset({"g"}), ops=frozenset({"ADD", "FULLY_CONNECTED"}), ram_free_bytes=10**6
        ),
        "old": DeviceInfo(groups=frozenset({"g"}), ops=frozenset({"ADD"}), runtime="tflite 2.4"),
        "tiny": DeviceInfo(
            groups=frozenset({"g"}), ops=frozenset({"ADD", "FULLY_CONNECTED"}), ram_free_bytes=1000
        ),
        "silent": DeviceInfo(groups=frozenset({"g"})),  # advertised nothing: not guessed incompatible
    }
    needs = ModelNeeds(ops=frozenset({"ADD", "FULLY_CONNECTED"}), arena_bytes=4096)
    plan = plan_rollout(document(), devices, needs, check_file=False)
    assert sorted(plan.eligible) == ["ok", "silent"]
    skipped = {s.device_id: s for s in plan.skipped}
    assert skipped["old"].reason == INCOMPATIBLE
    assert "FULLY_CONNECTED" in skipped["old"].detail
    assert "4096" in skipped["tiny"].detail


def test_offline_devices_are_deferred_not_dropped() -> None:
    """An offline device keeps its wave (the same plan as when online) and is listed as deferred."""
    online = make_plan(document(waves=STAGED), fleet(20))
    some_offline = make_plan(document(waves=STAGED), fleet(20, offline=["d03", "d11"]))
    assert [w.devices for w in online.waves] == [w.devices for w in some_offline.waves]
    assert sorted(some_offline.deferred) == ["d03", "d11"]


def test_targets_percent_takes_a_reproducible_share_of_a_group() -> None:
    """targets.percent keeps the first ceil(p x n) devices in seed order, and the waves cut those."""
    devices = {**fleet(10), **fleet(10, group="h", prefix="e")}
    doc = document(targets=Targets(groups=["g"], percent=30))
    plan = make_plan(doc, devices)
    assert len(plan.targets) == 3
    assert set(plan.targets) <= set(fleet(10))
    assert list(plan.targets) == rank("s", fleet(10))[:3]


def test_targets_mix_device_ids_and_groups() -> None:
    """Listed devices and group members are unioned, each once."""
    devices = {**fleet(3), **fleet(3, group="h", prefix="e")}
    plan = make_plan(document(targets=Targets(devices=["e00", "d01"], groups=["g"])), devices)
    assert sorted(plan.targets) == ["d00", "d01", "d02", "e00"]


def test_planning_refuses_an_unknown_device() -> None:
    """The planner validates against the fleet before anything is planned."""
    with pytest.raises(ConfigError, match="unknown device 'ghost'"):
        make_plan(document(targets=Targets(devices=["ghost"])), fleet(3))


def test_previous_versions_are_recorded_for_rollback() -> None:
    """The plan remembers each device's active version, the rollback target."""
    plan = make_plan(document(), fleet(2, version="1.7"))
    assert dict(plan.previous_versions) == {"d00": "1.7", "d01": "1.7"}


def test_render_plan_lists_waves_deferred_and_skipped() -> None:
    """The dry-run text names each wave's devices, the deferred ones and the skipped ones with reasons."""
    devices = fleet(20, offline=["d07"])
    devices["old"] = DeviceInfo(groups=frozenset({"g"}), ops=frozenset())
    plan = plan_rollout(document(waves=STAGED), devices, ModelNeeds(ops=frozenset({"ADD"})), check_file=False)
    text = render_plan(plan)
    assert "wave 0 (1%, 1 reached): 1 devices" in text
    assert "deferred: d07" in text
    assert "old: INCOMPATIBLE (runtime ? lacks ops ADD)" in text
    assert "20 eligible, 1 skipped, 1 offline" in text


def test_plan_json_is_complete_and_stable() -> None:
    """--json output carries every wave's devices and is byte-identical for the same inputs."""
    plan = make_plan(document(waves=STAGED), fleet(20))
    data = json.loads(render_plan_json(plan))
    assert data["eligible"] == 20
    assert [w["label"] for w in data["waves"]] == ["1%", "10%", "50%", "100%"]
    assert sum(len(w["devices"]) for w in data["waves"]) == 20
    assert render_plan_json(plan) == render_plan_json(make_plan(document(waves=STAGED), fleet(20)))


def test_device_info_from_birth_reads_capabilities() -> None:
    """A birth's groups, ops, free RAM, runtime and model become the planner's view of the device."""
    birth = Birth(
        device_id="cam-1",
        bdseq=3,
        groups=["lobby"],
        agent_version="0.1",
        runtime="litert",
        runtime_version="2.3",
        ops=["ADD"],
        ram_free_bytes=2048,
        model_version="1.0",
    )
    info = device_info_from_birth(birth, online=False)
    assert info == DeviceInfo(
        groups=frozenset({"lobby"}),
        online=False,
        ops=frozenset({"ADD"}),
        ram_free_bytes=2048,
        runtime="litert 2.3",
        model_version="1.0",
    )
    assert (
        incompatibility(info, ModelNeeds(ops=frozenset({"CONV_2D"})))
        == "runtime litert 2.3 lacks ops CONV_2D"
    )
    silent = device_info_from_birth(birth.model_copy(update={"ops": [], "ram_free_bytes": 0}))
    assert silent.ops is None
    assert silent.ram_free_bytes is None
