"""The rollout state machine: one transition table, pure and I/O-free (h11 / Mender style).

The agent feeds it events and carries out the effects it returns; nothing here touches a socket, a
file or an interpreter, so tests drive every (state, event) pair directly.

    IDLE --deploy--> QUEUED --start--> DOWNLOADING --complete--> VERIFYING --verified--> STAGED
      STAGED --gate--> GATING --passed--> ACTIVATING --activated--> SUCCEEDED
      SUCCEEDED --watchdog_trip--> ROLLING_BACK --rolled_back--> FAILED (details: rolled_back)
    side exits: incompatible -> INCOMPATIBLE, refused / gate_failed -> REJECTED, timeout -> TIMED_OUT,
                already_active -> SUCCEEDED (the same model again is a no-op),
                cancel / superseded -> CANCELED, error / hash_mismatch -> FAILED,
                crash_loop -> FAILED before activation, ROLLING_BACK from activation on.

A pair missing from the table is not an exception: it moves the rollout to FAILED with a reason
that names the pair, so an unexpected input can never leave the machine in an undefined state.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from schemas.constants import ExecStatus


class Step(str, enum.Enum):
    """Where a rollout is on this device; saved in state.json before each step (see UNPERSISTED)."""

    IDLE = "IDLE"
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    GATING = "GATING"
    ACTIVATING = "ACTIVATING"
    SUCCEEDED = "SUCCEEDED"
    ROLLING_BACK = "ROLLING_BACK"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    INCOMPATIBLE = "INCOMPATIBLE"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Event(str, enum.Enum):
    """What can happen to a rollout: a small enum, as in Mender."""

    DEPLOY = "deploy"  # a verified, newer manifest arrived
    INCOMPATIBLE = "incompatible"  # the pre-check found an op or memory need the device lacks
    REFUSED = "refused"  # the pre-check refused it (a downgrade without a signed rollback)
    ALREADY_ACTIVE = "already_active"  # the manifest names the model that already serves
    START = "start"  # pre-check passed, begin fetching
    COMPLETE = "complete"  # every chunk is held
    VERIFIED = "verified"  # the whole file's SHA-256 matches
    HASH_MISMATCH = "hash_mismatch"
    GATE = "gate"  # begin the commit gate
    PASSED = "passed"
    GATE_FAILED = "gate_failed"
    ACTIVATED = "activated"
    TIMEOUT = "timeout"
    CANCEL = "cancel"
    SUPERSEDED = "superseded"  # a newer deploy replaced this one
    WATCHDOG_TRIP = "watchdog_trip"
    ROLLED_BACK = "rolled_back"
    ERROR = "error"  # an I/O or runtime failure outside the gate
    CRASH_LOOP = "crash_loop"  # one state was resumed too many times


class Effect(str, enum.Enum):
    """What the agent must do after a transition; the table returns them in order."""

    PRECHECK = "precheck"  # compare manifest ops and arena against the runtime and RAM
    FETCH = "fetch"  # subscribe to the blob topic and ask for missing chunks
    STOP_FETCH = "stop_fetch"  # unsubscribe from the blob topic
    VERIFY = "verify"  # hash the staged file
    GATE = "gate"  # load and check the staged model
    ACTIVATE = "activate"  # atomic swap into the active slot and hot-swap the interpreter
    ROLLBACK = "rollback"  # restore the previous slot and its interpreter
    DISCARD = "discard"  # delete the staging file and its bitmap
    WATCH = "watch"  # arm the watchdog on the new model
    ADVANCE = "advance"  # a resting state with nothing to wait for: go on (STAGED -> gate)


TERMINAL = frozenset(
    {Step.SUCCEEDED, Step.FAILED, Step.REJECTED, Step.TIMED_OUT, Step.CANCELED, Step.INCOMPATIBLE}
)
# States where the new model is not yet in the active slot: failing here leaves the old one serving.
BEFORE_ACTIVATION = frozenset({Step.QUEUED, Step.DOWNLOADING, Step.VERIFYING, Step.STAGED, Step.GATING})
# Ends a new deploy may start from.
IDLE_LIKE = frozenset({Step.IDLE}) | TERMINAL

_S, _E, _F = Step, Event, Effect
_DOWNLOAD_STOP = (_F.STOP_FETCH, _F.DISCARD)

# (state, event) -> (next state, effects).  Everything the agent may legitimately see is listed,
# including the inputs a state ignores on purpose (e.g. a cancel after commit).
TABLE: dict[tuple[Step, Event], tuple[Step, tuple[Effect, ...]]] = {
    **{(s, _E.DEPLOY): (_S.QUEUED, (_F.PRECHECK,)) for s in IDLE_LIKE},
    **{(s, _E.SUPERSEDED): (_S.CANCELED, (*_DOWNLOAD_STOP,)) for s in BEFORE_ACTIVATION},
    **{(s, _E.CANCEL): (_S.CANCELED, (*_DOWNLOAD_STOP,)) for s in BEFORE_ACTIVATION},
    **{(s, _E.CANCEL): (s, ()) for s in (*TERMINAL, _S.IDLE, _S.ACTIVATING, _S.ROLLING_BACK)},
    **{(s, _E.ERROR): (_S.FAILED, (*_DOWNLOAD_STOP,)) for s in BEFORE_ACTIVATION},
    **{(s, _E.CRASH_LOOP): (_S.FAILED, (*_DOWNLOAD_STOP,)) for s in BEFORE_ACTIVATION},
    **{(s, _E.TIMEOUT): (_S.TIMED_OUT, (*_DOWNLOAD_STOP,)) for s in (_S.QUEUED, _S.DOWNLOADING)},
    # The timeout covers the transfer; once every byte is here a late timer tick changes nothing.
    **{
        (s, _E.TIMEOUT): (s, ())
        for s in (*TERMINAL, _S.IDLE, _S.VERIFYING, _S.STAGED, _S.GATING, _S.ACTIVATING, _S.ROLLING_BACK)
    },
    (_S.QUEUED, _E.INCOMPATIBLE): (_S.INCOMPATIBLE, ()),
    (_S.QUEUED, _E.REFUSED): (_S.REJECTED, ()),
    (_S.QUEUED, _E.ALREADY_ACTIVE): (_S.SUCCEEDED, ()),
    (_S.QUEUED, _E.START): (_S.DOWNLOADING, (_F.FETCH,)),
    (_S.DOWNLOADING, _E.COMPLETE): (_S.VERIFYING, (_F.STOP_FETCH, _F.VERIFY)),
    (_S.VERIFYING, _E.VERIFIED): (_S.STAGED, (_F.ADVANCE,)),
    (_S.VERIFYING, _E.HASH_MISMATCH): (_S.FAILED, (_F.DISCARD,)),
    (_S.STAGED, _E.GATE): (_S.GATING, (_F.GATE,)),
    (_S.GATING, _E.PASSED): (_S.ACTIVATING, (_F.ACTIVATE,)),
    (_S.GATING, _E.GATE_FAILED): (_S.REJECTED, (_F.DISCARD,)),
    (_S.ACTIVATING, _E.ACTIVATED): (_S.SUCCEEDED, (_F.WATCH,)),
    (_S.ACTIVATING, _E.ERROR): (_S.ROLLING_BACK, (_F.ROLLBACK,)),
    (_S.ACTIVATING, _E.CRASH_LOOP): (_S.ROLLING_BACK, (_F.ROLLBACK,)),
    (_S.SUCCEEDED, _E.WATCHDOG_TRIP): (_S.ROLLING_BACK, (_F.ROLLBACK,)),
    (_S.SUCCEEDED, _E.CRASH_LOOP): (_S.ROLLING_BACK, (_F.ROLLBACK,)),
    (_S.ROLLING_BACK, _E.ROLLED_BACK): (_S.FAILED, ()),
    # A rollback that itself keeps crashing has nothing older to fall back to: stop trying.
    (_S.ROLLING_BACK, _E.CRASH_LOOP): (_S.FAILED, ()),
    (_S.ROLLING_BACK, _E.ERROR): (_S.FAILED, ()),
}


@dataclass(frozen=True)
class Transition:
    """The outcome of one event: where the rollout goes, what to do, and why if it is an error."""

    state: Step
    effects: tuple[Effect, ...] = ()
    reason: str | None = None

    @property
    def undefined(self) -> bool:
        return self.reason is not None and self.reason.startswith("undefined transition")


def transition(state: Step, event: Event) -> Transition:
    """Look up (state, event); an unlisted pair goes to FAILED with a reason naming it."""
    hit = TABLE.get((state, event))
    if hit is None:
        effects: tuple[Effect, ...] = _DOWNLOAD_STOP if state in BEFORE_ACTIVATION else ()
        return Transition(Step.FAILED, effects, f"undefined transition: {event.value} in {state.value}")
    return Transition(hit[0], hit[1])


# --- resume -------------------------------------------------------------------------------------

# Where a rollout persisted in a state continues after the agent restarts.  Each step is idempotent
# from its start: a download resends its bitmap, verification rehashes, the gate reruns, and the
# swap checks which file the active slot holds before it does anything.
RESUME: dict[Step, Step] = {
    Step.IDLE: Step.IDLE,
    Step.QUEUED: Step.QUEUED,
    Step.DOWNLOADING: Step.DOWNLOADING,
    Step.VERIFYING: Step.VERIFYING,
    # A staged file is rehashed: the crash may have come before its last write reached the disk.
    Step.STAGED: Step.VERIFYING,
    Step.GATING: Step.GATING,
    Step.ACTIVATING: Step.ACTIVATING,
    Step.SUCCEEDED: Step.SUCCEEDED,
    Step.ROLLING_BACK: Step.ROLLING_BACK,
    Step.FAILED: Step.FAILED,
    Step.REJECTED: Step.REJECTED,
    Step.TIMED_OUT: Step.TIMED_OUT,
    Step.CANCELED: Step.CANCELED,
    Step.INCOMPATIBLE: Step.INCOMPATIBLE,
}

# Steps reported but not persisted on their own: a record of them would buy nothing, and each costs
# two fsyncs (file and directory) on the path of every delivery.  They are numbered from the
# reserve, like download progress (so they are persisted after all when the reserve runs out).
# - QUEUED lasts only for the pre-check, a pure function, before it moves on in the same call.  A
#   restart there finds the rollout before it (deploy.bin is saved, state.json not yet), and the
#   retained deploy, delivered again on connect, starts it afresh.
# - VERIFYING and STAGED: a restart finds DOWNLOADING with every chunk held, which resumes into the
#   same work (COMPLETE, VERIFY, STAGED follow at once).
# GATING is persisted although it would resume the same way: a model that kills the agent in the
# gate must show up as a crash loop in GATING, where its resumes are counted.
UNPERSISTED = frozenset({Step.QUEUED, Step.VERIFYING, Step.STAGED})

DEFAULT_MAX_RESUMES = 3


def resume(state: Step, resumes: int, max_resumes: int = DEFAULT_MAX_RESUMES) -> tuple[Step, Event | None]:
    """Where to continue after a restart, and CRASH_LOOP when this state has been resumed too often.

    ``resumes`` counts restarts that found the rollout in ``state`` (this one included).  Terminal
    states never loop; SUCCEEDED counts only while the watchdog still watches (the agent resets the
    counter once the model has proved itself).
    """
    target = RESUME[state]
    if target in TERMINAL and target is not Step.SUCCEEDED:
        return target, None
    if target is Step.IDLE:
        return target, None
    if resumes > max_resumes:
        return target, Event.CRASH_LOOP
    return target, None


# --- reporting ----------------------------------------------------------------------------------

_REPORTED: dict[Step, ExecStatus | None] = {
    Step.IDLE: None,
    Step.QUEUED: ExecStatus.QUEUED,
    Step.DOWNLOADING: ExecStatus.IN_PROGRESS,
    Step.VERIFYING: ExecStatus.IN_PROGRESS,
    Step.STAGED: ExecStatus.IN_PROGRESS,
    Step.GATING: ExecStatus.IN_PROGRESS,
    Step.ACTIVATING: ExecStatus.IN_PROGRESS,
    Step.SUCCEEDED: ExecStatus.SUCCEEDED,
    Step.ROLLING_BACK: ExecStatus.IN_PROGRESS,
    Step.FAILED: ExecStatus.FAILED,
    Step.REJECTED: ExecStatus.REJECTED,
    Step.TIMED_OUT: ExecStatus.TIMED_OUT,
    Step.CANCELED: ExecStatus.CANCELED,
    Step.INCOMPATIBLE: ExecStatus.INCOMPATIBLE,
}
_DETAIL_STEP: dict[Step, str] = {
    Step.QUEUED: "queued",
    Step.DOWNLOADING: "downloading",
    Step.VERIFYING: "verifying",
    Step.STAGED: "staged",
    Step.GATING: "gating",
    Step.ACTIVATING: "activating",
    Step.ROLLING_BACK: "rolling_back",
}


@dataclass(frozen=True)
class Report:
    """What the publisher sees of a step: AWS-style status plus a details map."""

    status: ExecStatus
    details: dict[str, str] = field(default_factory=dict)


def report(state: Step, *, percent: int | None = None, rolled_back: bool = False) -> Report | None:
    """The execution status and details for ``state``; None for IDLE, which is never reported."""
    status = _REPORTED[state]
    if status is None:
        return None
    details: dict[str, str] = {}
    if state in _DETAIL_STEP:
        details["step"] = _DETAIL_STEP[state]
    if state is Step.DOWNLOADING and percent is not None:
        details["percent"] = str(max(0, min(100, percent)))
    if rolled_back:
        details["step"] = "rolled_back"
        details["rolled_back"] = "true"
    return Report(status, details)


# --- versions -----------------------------------------------------------------------------------

_PART_RE = re.compile(r"\d+|[A-Za-z]+")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key for model versions: numeric runs compare as numbers, letters as text.

    "1.10" > "1.9" and "2.0" > "2.0rc1" is not attempted: a pre-release tag sorts after its base,
    which is the conservative reading for anti-rollback (it never lets an older build through).
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in _PART_RE.findall(version))


def is_downgrade(candidate: str, active: str | None) -> bool:
    """True when ``candidate`` is older than the active version (equal is not a downgrade)."""
    if active is None:
        return False
    return version_key(candidate) < version_key(active)
