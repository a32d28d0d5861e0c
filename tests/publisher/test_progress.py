"""Following one rollout: targets, group membership from births, and the end condition."""

from __future__ import annotations

import pytest

from publisher.progress import RolloutProgress, Targets
from schemas.errors import TopicError
from schemas.messages import Birth, Death, ExecStatus, State


def birth(dev: str, bdseq: int = 1, groups: tuple[str, ...] = ("lab",)) -> Birth:
    return Birth(
        device_id=dev, bdseq=bdseq, groups=list(groups), agent_version="0", runtime="x", runtime_version="0"
    )


def st(dev: str, status: ExecStatus, vn: int, rollout: str = "r1", **details: str) -> State:
    return State(device_id=dev, rollout_id=rollout, status=status, version_number=vn, details=details)


def test_targets_parse_devices_groups_and_commas() -> None:
    """--to takes ids, comma lists and group:NAME; --group adds groups; duplicates collapse."""
    t = Targets.parse(["d1,d2", "group:lab", "d1"], ["eu"])
    assert t.devices == ("d1", "d2")
    assert t.groups == ("eu", "lab")
    assert len(t.desired_topics()) == 4


def test_targets_refuse_wildcards() -> None:
    """A target with MQTT wildcard characters is refused."""
    with pytest.raises(TopicError):
        Targets.parse(["d/+"])


def test_done_when_every_explicit_target_is_terminal() -> None:
    """Explicit devices are expected from the start; the rollout ends when all are terminal."""
    p = RolloutProgress("r1", Targets(("d1", "d2")))
    assert not p.done()
    p.apply_state(st("d1", ExecStatus.SUCCEEDED, 3))
    assert not p.done()
    p.apply_state(st("d2", ExecStatus.REJECTED, 2))
    assert p.done()
    assert p.succeeded == ["d1"]
    assert p.failed == ["d2"]


def test_group_members_are_expected_when_online() -> None:
    """Online members of a target group are expected; offline ones and other groups are not."""
    p = RolloutProgress("r1", Targets(groups=("lab",)))
    p.apply_birth(birth("a"))
    p.apply_death(Death(device_id="b", bdseq=1))  # retained death of b's last session comes first
    p.apply_birth(birth("b"))
    p.apply_birth(birth("c", groups=("eu",)))
    assert set(p.outcomes) == {"a"}


def test_expected_member_that_dies_stays_expected() -> None:
    """A member that goes offline mid-rollout stays in the count, so the rollout is not done."""
    p = RolloutProgress("r1", Targets(groups=("lab",)))
    p.apply_birth(birth("a"))
    p.apply_death(Death(device_id="a", bdseq=1))
    assert set(p.outcomes) == {"a"}
    assert p.unfinished == ["a"]


def test_states_for_other_rollouts_and_old_versions_are_ignored() -> None:
    """Reports for another rollout, or not newer than the last, change nothing."""
    p = RolloutProgress("r1", Targets(("d1",)))
    assert not p.apply_state(st("d1", ExecStatus.SUCCEEDED, 3, rollout="r0"))
    assert p.apply_state(st("d1", ExecStatus.IN_PROGRESS, 2, step="downloading", percent="40"))
    assert not p.apply_state(st("d1", ExecStatus.QUEUED, 1))
    o = p.outcomes["d1"]
    assert o.status is ExecStatus.IN_PROGRESS
    assert o.percent == 40.0
    assert o.step == "downloading"


def test_stray_reporter_is_counted_and_tracked() -> None:
    """A device reporting for the rollout without being targeted is counted as a stray."""
    p = RolloutProgress("r1", Targets(("d1",)))
    p.apply_state(st("zz", ExecStatus.IN_PROGRESS, 1))
    assert p.strays == 1
    assert "zz" in p.outcomes


def test_chunk_progress_is_a_floor_until_terminal() -> None:
    """Chunk-server progress raises the percent of an unfinished device, never lowers it."""
    p = RolloutProgress("r1", Targets(("d1",)))
    p.note_chunks("d1", 5, 10)
    assert p.outcomes["d1"].percent == 50.0
    p.note_chunks("d1", 2, 10)
    assert p.outcomes["d1"].percent == 50.0


def test_no_targets_known_is_never_done() -> None:
    """A group rollout with no known member does not count as finished."""
    p = RolloutProgress("r1", Targets(groups=("lab",)))
    assert not p.done()
