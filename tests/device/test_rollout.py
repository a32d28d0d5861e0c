"""The rollout transition table, driven directly: no network, no files."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.rollout import (
    BEFORE_ACTIVATION,
    RESUME,
    TABLE,
    TERMINAL,
    Effect,
    Event,
    Step,
    is_downgrade,
    report,
    resume,
    transition,
)
from schemas.messages import ExecStatus

ALL_PAIRS = list(itertools.product(Step, Event))


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s.value}-{e.value}" for s, e in ALL_PAIRS])
def test_every_pair_lands_in_a_defined_state(state: Step, event: Event) -> None:
    """Every (state, event) pair gives a known state; unlisted pairs give FAILED with a reason."""
    t = transition(state, event)
    assert t.state in Step
    assert all(isinstance(e, Effect) for e in t.effects)
    if (state, event) in TABLE:
        assert t.reason is None
        assert (t.state, t.effects) == TABLE[(state, event)]
    else:
        assert t.state is Step.FAILED
        assert t.undefined
        assert state.value in (t.reason or "")
        assert event.value in (t.reason or "")


@given(st.sampled_from(Step), st.lists(st.sampled_from(Event), max_size=40))
def test_any_event_sequence_stays_inside_the_machine(start: Step, events: list[Event]) -> None:
    """Hypothesis: whatever events arrive in whatever order, the machine is always in a known state."""
    state = start
    for event in events:
        t = transition(state, event)
        assert t.state in Step
        # Leaving a pre-activation state for a terminal one always cleans up the download.
        if state in BEFORE_ACTIVATION and t.state in (Step.FAILED, Step.CANCELED, Step.TIMED_OUT):
            assert Effect.DISCARD in t.effects
        state = t.state


@given(st.sampled_from(sorted(TERMINAL, key=lambda s: s.value)), st.sampled_from(Event))
def test_terminal_states_only_leave_through_a_new_deploy_or_rollback(state: Step, event: Event) -> None:
    """A finished rollout moves only on a new deploy (or SUCCEEDED on a watchdog or crash loop)."""
    t = transition(state, event)
    if t.state is not state and not t.undefined:
        assert event is Event.DEPLOY or (
            state is Step.SUCCEEDED and event in (Event.WATCHDOG_TRIP, Event.CRASH_LOOP)
        )


def test_happy_path_chain() -> None:
    """Deploy to commit walks the expected chain, with the effects the agent must carry out."""
    chain = [
        (Event.DEPLOY, Step.QUEUED, (Effect.PRECHECK,)),
        (Event.START, Step.DOWNLOADING, (Effect.FETCH,)),
        (Event.COMPLETE, Step.VERIFYING, (Effect.STOP_FETCH, Effect.VERIFY)),
        (Event.VERIFIED, Step.STAGED, (Effect.ADVANCE,)),
        (Event.GATE, Step.GATING, (Effect.GATE,)),
        (Event.PASSED, Step.ACTIVATING, (Effect.ACTIVATE,)),
        (Event.ACTIVATED, Step.SUCCEEDED, (Effect.WATCH,)),
        (Event.WATCHDOG_TRIP, Step.ROLLING_BACK, (Effect.ROLLBACK,)),
        (Event.ROLLED_BACK, Step.FAILED, ()),
    ]
    state = Step.IDLE
    for event, expected, effects in chain:
        t = transition(state, event)
        assert (t.state, t.effects) == (expected, effects)
        state = t.state


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (Step.QUEUED, Event.INCOMPATIBLE, Step.INCOMPATIBLE),
        (Step.QUEUED, Event.REFUSED, Step.REJECTED),
        (Step.QUEUED, Event.ALREADY_ACTIVE, Step.SUCCEEDED),
        (Step.GATING, Event.GATE_FAILED, Step.REJECTED),
        (Step.DOWNLOADING, Event.TIMEOUT, Step.TIMED_OUT),
        (Step.DOWNLOADING, Event.CANCEL, Step.CANCELED),
        (Step.DOWNLOADING, Event.SUPERSEDED, Step.CANCELED),
        (Step.VERIFYING, Event.HASH_MISMATCH, Step.FAILED),
        (Step.GATING, Event.CRASH_LOOP, Step.FAILED),
        (Step.ACTIVATING, Event.CRASH_LOOP, Step.ROLLING_BACK),
        (Step.SUCCEEDED, Event.CRASH_LOOP, Step.ROLLING_BACK),
    ],
)
def test_side_exits(state: Step, event: Event, expected: Step) -> None:
    """Each failure input leads to the documented terminal or rollback state."""
    assert transition(state, event).state is expected


@pytest.mark.parametrize("state", [Step.SUCCEEDED, Step.ACTIVATING, Step.FAILED, Step.IDLE])
def test_cancel_after_commit_is_ignored(state: Step) -> None:
    """A cancel that arrives once the swap has started changes nothing and does nothing."""
    assert transition(state, Event.CANCEL).state is state
    assert transition(state, Event.CANCEL).effects == ()


def test_resume_table_covers_every_state_and_rehashes_staged_files() -> None:
    """Every persisted state has a resume point; a staged file is verified again after a crash."""
    assert set(RESUME) == set(Step)
    assert RESUME[Step.STAGED] is Step.VERIFYING
    for state in Step:
        assert resume(state, 1) == (RESUME[state], None)


@pytest.mark.parametrize("state", sorted(BEFORE_ACTIVATION | {Step.ACTIVATING, Step.SUCCEEDED}, key=str))
def test_resuming_one_state_too_often_is_a_crash_loop(state: Step) -> None:
    """Past max_resumes restarts in one working state, resume says CRASH_LOOP."""
    assert resume(state, 3, max_resumes=3)[1] is None
    assert resume(state, 4, max_resumes=3)[1] is Event.CRASH_LOOP


@pytest.mark.parametrize("state", [Step.FAILED, Step.REJECTED, Step.IDLE, Step.CANCELED])
def test_resting_states_never_loop(state: Step) -> None:
    """Restarting in a finished state is never a crash loop."""
    assert resume(state, 100)[1] is None


def test_reports_map_to_aws_statuses_with_details() -> None:
    """Sub-steps report IN_PROGRESS with a step and percent; a rollback is flagged."""
    dl = report(Step.DOWNLOADING, percent=42)
    assert dl is not None
    assert dl.status is ExecStatus.IN_PROGRESS
    assert dl.details == {"step": "downloading", "percent": "42"}
    assert report(Step.IDLE) is None
    rb = report(Step.FAILED, rolled_back=True)
    assert rb is not None
    assert rb.status is ExecStatus.FAILED
    assert rb.details["rolled_back"] == "true"
    assert report(Step.INCOMPATIBLE).status is ExecStatus.INCOMPATIBLE  # type: ignore[union-attr]
    for state in Step:
        r = report(state)
        assert r is None or r.status in ExecStatus


@pytest.mark.parametrize(
    ("candidate", "active", "older"),
    [
        ("1.9", "1.10", True),
        ("1.10", "1.9", False),
        ("2", "2", False),
        ("1.0", None, False),
        ("1.0rc1", "1.0", False),
        ("0.9", "1.0rc1", True),
    ],
)
def test_version_order_for_anti_rollback(candidate: str, active: str | None, older: bool) -> None:
    """Numeric parts compare as numbers, so 1.9 is older than 1.10."""
    assert is_downgrade(candidate, active) is older
