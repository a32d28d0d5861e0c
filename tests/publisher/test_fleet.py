"""Telemetry folding into fleet state, driven directly with decoded messages."""

from __future__ import annotations

from rich.console import Console

from publisher.fleet import Fleet, percentile, render_table
from schemas import topics
from schemas.messages import Birth, Death, ExecStatus, Health, Results, State


def birth(dev: str, bdseq: int, groups: tuple[str, ...] = ("lab",), version: str | None = "1.0.0") -> Birth:
    return Birth(
        device_id=dev,
        bdseq=bdseq,
        groups=list(groups),
        agent_version="0.1",
        runtime="litert",
        runtime_version="2.3",
        model_version=version,
    )


def state(dev: str, rollout: str, status: ExecStatus, vn: int, ts: float = 100.0, **kw: str) -> State:
    return State(
        device_id=dev,
        rollout_id=rollout,
        status=status,
        version_number=vn,
        ts=ts,
        details=dict(kw),
        model_version=kw.get("model_version"),
    )


def test_birth_makes_a_device_online_with_its_model() -> None:
    """A birth marks the device online and records its groups, runtime and model."""
    f = Fleet()
    assert f.apply(birth("d1", 3), now=10.0)
    v = f.devices["d1"]
    assert v.online
    assert v.groups == ("lab",)
    assert v.model_version == "1.0.0"
    assert v.last_seen == 10.0


def test_death_with_the_current_bdseq_takes_the_device_offline() -> None:
    """A death whose bdseq matches the latest birth means the device is offline."""
    f = Fleet()
    f.apply(birth("d1", 3), 0)
    assert f.apply(Death(device_id="d1", bdseq=3), 1)
    assert not f.devices["d1"].online


def test_stale_death_is_ignored_and_counted() -> None:
    """A Will from an older session (lower bdseq) does not take a reborn device offline."""
    f = Fleet()
    f.apply(birth("d1", 5), 0)
    assert not f.apply(Death(device_id="d1", bdseq=4), 1)
    assert f.devices["d1"].online
    assert f.counters["stale_deaths"] == 1


def test_retained_death_before_birth_resolves_by_bdseq() -> None:
    """On subscribe, a retained old death and a newer birth arrive in any order: the device is online."""
    for order in ("death_first", "birth_first"):
        f = Fleet()
        msgs: list[Death | Birth] = [Death(device_id="d1", bdseq=4), birth("d1", 5)]
        for m in msgs if order == "death_first" else reversed(msgs):
            f.apply(m, 0)
        assert f.devices["d1"].online, order


def test_birth_after_its_own_death_stays_offline() -> None:
    """A retained birth arriving after the death of the same session leaves the device offline."""
    f = Fleet()
    f.apply(Death(device_id="d1", bdseq=5), 0)
    f.apply(birth("d1", 5), 0)
    assert not f.devices["d1"].online


def test_older_birth_is_ignored() -> None:
    """A birth with a lower bdseq than one already seen changes nothing."""
    f = Fleet()
    f.apply(birth("d1", 5, version="2"), 0)
    assert not f.apply(birth("d1", 4, version="1"), 0)
    assert f.devices["d1"].model_version == "2"
    assert f.counters["stale_births"] == 1


def test_state_version_number_only_grows() -> None:
    """A state report with a version number not above the last one for that rollout is ignored."""
    f = Fleet()
    f.apply(state("d1", "r1", ExecStatus.IN_PROGRESS, 2, step="downloading"), 0)
    assert not f.apply(state("d1", "r1", ExecStatus.QUEUED, 1), 0)
    assert f.devices["d1"].rollout_status is ExecStatus.IN_PROGRESS
    assert f.devices["d1"].rollout_step == "downloading"
    assert f.counters["stale_states"] == 1


def test_succeeded_state_sets_the_model_version() -> None:
    """SUCCEEDED with a model version updates the device's model."""
    f = Fleet()
    f.apply(birth("d1", 1, version="1.0.0"), 0)
    f.apply(state("d1", "r2", ExecStatus.SUCCEEDED, 5, model_version="1.1.0"), 0)
    assert f.devices["d1"].model_version == "1.1.0"


def test_new_rollout_replaces_the_old_unless_older() -> None:
    """A state for another rollout replaces the current one only when it is newer."""
    f = Fleet()
    f.apply(state("d1", "r2", ExecStatus.SUCCEEDED, 5, ts=200.0), 0)
    assert not f.apply(state("d1", "r1", ExecStatus.SUCCEEDED, 9, ts=100.0), 0)
    assert f.apply(state("d1", "r3", ExecStatus.IN_PROGRESS, 0, ts=300.0), 0)
    assert f.devices["d1"].rollout_id == "r3"


def test_state_for_an_unknown_rollout_is_an_anomaly() -> None:
    """Once manifests are known, a report for a rollout none of them names is counted as an anomaly."""
    f = Fleet()
    f.note_rollout("r1")
    f.apply(state("d1", "r1", ExecStatus.QUEUED, 0), 0)
    f.apply(state("d2", "rogue", ExecStatus.QUEUED, 0), 0)
    assert f.counters["anomalies"] == 1


def test_health_updates_counters_and_latency() -> None:
    """Health carries inference counters, latency and resources into the view."""
    f = Fleet()
    f.apply(
        Health(
            device_id="d1",
            inference_count=40,
            error_count=2,
            latency_p95_ms=1.5,
            rss_bytes=9,
            model_version="1.0.0",
        ),
        now=7.0,
    )
    v = f.devices["d1"]
    assert (v.inference_count, v.error_count, v.latency_p95_ms, v.rss_bytes) == (40, 2, 1.5, 9)
    assert v.last_seen == 7.0


def test_results_roll_up_per_minute() -> None:
    """Results batches add up per device and minute, with a nearest-rank p95 of their latencies."""
    f = Fleet()
    for i in range(3):
        f.apply(
            Results(
                device_id="d1",
                outputs=[[1.0]] * 10,
                latency_ms=[float(j) for j in range(1, 11)],
                errors=1,
                model_version="1",
            ),
            now=120.0 + i,
        )
    f.apply(Results(device_id="d1", outputs=[[1.0]], latency_ms=[99.0]), now=185.0)
    assert f.devices["d1"].results_outputs == 31
    done = f.take_rollups(before=180.0)
    assert len(done) == 1
    assert (done[0].minute, done[0].results, done[0].errors, done[0].batches) == (120, 30, 3, 3)
    assert done[0].latency_p95_ms == 10.0
    assert [r.minute for r in f.take_rollups()] == [180]


def test_percentile_nearest_rank() -> None:
    """percentile is nearest-rank and None for no data."""
    assert percentile([], 95) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def test_aggregates_cover_fleet_groups_and_rollouts() -> None:
    """Aggregates are made for the fleet, each group and each rollout, with versions and states."""
    f = Fleet()
    f.apply(birth("a", 1, ("lab", "eu")), 0)
    f.apply(birth("b", 1, ("lab",), version="0.9"), 0)
    f.apply(Death(device_id="b", bdseq=1), 0)
    f.apply(state("a", "r1", ExecStatus.SUCCEEDED, 3), 0)
    f.apply(Health(device_id="a", inference_count=10, error_count=1, latency_p95_ms=2.0), 0)
    by_topic = dict(f.aggregates())
    fleet = by_topic[topics.aggregate(topics.AggregateScope.FLEET)]
    assert (fleet.devices, fleet.online) == (2, 1)
    assert fleet.versions == {"1.0.0": 1, "0.9": 1}
    assert fleet.kpis["error_rate"] == 0.1
    assert by_topic[topics.aggregate(topics.AggregateScope.GROUP, "eu")].devices == 1
    rollout = by_topic[topics.aggregate(topics.AggregateScope.ROLLOUT, "r1")]
    assert rollout.states == {"SUCCEEDED": 1}


def test_fleet_table_shows_every_device() -> None:
    """The rendered table has a row per device with its model and status."""
    f = Fleet()
    f.apply(birth("d1", 1), 0)
    f.apply(state("d2", "r1", ExecStatus.REJECTED, 1), 0)
    console = Console(width=160, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_table(f, now=5.0))
    text = console.export_text()
    assert "d1" in text
    assert "1.0.0" in text
    assert "REJECTED" in text
