"""The rollout document: loading TOML/YAML, and refusing bad documents with a message saying what to fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from publisher.document import (
    AbortCriterion,
    FailureType,
    MaintenanceWindow,
    RetryType,
    RolloutDocument,
    Targets,
    Wave,
    check_document,
    load_document,
    one_wave_document,
    parse_document,
    validate_document,
)
from publisher.errors import ConfigError
from schemas.topics import validate_id
from tests.publisher.rollout_helpers import document

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rollout.toml"
FLEET = {"d00": ["g"], "d01": ["g"], "d02": ["g", "h"], "cam-roof-01": []}


def _refusal(text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_document(text, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


MINIMAL = """
[model]
path = "m.tflite"
version = "2"
[targets]
groups = ["g"]
"""


def test_example_document_loads_with_the_model_path_relative_to_it(tmp_path: Path) -> None:
    """examples/rollout.toml parses; its model path is read from the document's folder."""
    copy = tmp_path / "rollout.toml"
    shutil.copy(EXAMPLE, copy)
    doc = load_document(copy)
    assert doc.rollout_id == "detector-2-1-lobby"
    assert doc.model.path == str(tmp_path / "models/detector-2.1.tflite")
    assert [w.percent for w in doc.waves] == [1, 10, 50, 100]
    assert doc.waves[0].success.on_fail == "pause"
    assert doc.retries_for(RetryType.TIMED_OUT) == 2
    assert doc.retries_for(RetryType.REJECTED) == 0
    assert doc.abort[1].failure_type is FailureType.REJECTED
    assert doc.on_abort == "rollback"
    assert doc.maintenance == MaintenanceWindow(start="22:00", end="05:00")


def test_yaml_document_equals_the_toml_one() -> None:
    """The same document written in YAML gives the same objects."""
    yaml_text = "model: {path: m.tflite, version: '2'}\ntargets: {groups: [g]}\n"
    assert parse_document(yaml_text, fmt="yaml") == parse_document(MINIMAL)


def test_defaults_are_one_full_wave_and_no_abort() -> None:
    """A minimal document rolls out to 100 % in one wave, with a 600 s timeout and no retries."""
    doc = parse_document(MINIMAL)
    assert doc.waves == [Wave(percent=100)]
    assert doc.abort == []
    assert doc.in_progress_timeout_s == 600
    assert doc.on_abort == "stop"


def test_derived_rollout_id_is_stable_valid_and_content_addressed() -> None:
    """Without an id, one is derived from model name, version and a hash of the document."""
    first, again = parse_document(MINIMAL), parse_document(MINIMAL)
    other = parse_document(MINIMAL.replace('groups = ["g"]', 'groups = ["h"]'))
    assert first.rollout_id == again.rollout_id
    assert first.rollout_id.startswith("model-2-")
    assert first.rollout_id != other.rollout_id
    assert validate_id(first.rollout_id, "rollout id") == first.rollout_id


def test_one_wave_document_is_the_push_shorthand() -> None:
    """`rollout push MODEL --version V --to ...` is a one-wave document to those devices or groups."""
    doc = one_wave_document("m.tflite", "3", devices=["d00"], groups=["g"])
    assert doc.waves == [Wave(percent=100)]
    assert doc.targets == Targets(devices=["d00"], groups=["g"])


@pytest.mark.parametrize(
    ("waves", "expected"),
    [
        (
            "[[waves]]\npercent = 10\n[[waves]]\npercent = 5\n[[waves]]\npercent = 100",
            "waves[1].percent = 5 does not increase",
        ),
        ("[[waves]]\npercent = 10\n[[waves]]\npercent = 50", "the last wave must be { percent = 100 }"),
        ("[[waves]]\npercent = 150", "waves[0].percent: Input should be less than or equal to 100 (got 150)"),
        ("[[waves]]\npercent = 0", "waves[0].percent: Input should be greater than 0"),
        ("[[waves]]\ncount = 5\npercent = 100", "exactly one of percent"),
        (
            "[[waves]]\ncount = 5\n[[waves]]\ncount = 3\n[[waves]]\npercent = 100",
            "waves[1].count = 3 does not increase",
        ),
        ("[[waves]]\npercent = 50\n[[waves]]\ncount = 30\n[[waves]]\npercent = 100", "put count waves first"),
        ("[[waves]]\npercent = 100\nmin_soak = 60", "waves[0].min_soak: unknown field"),
    ],
)
def test_waves_that_add_up_wrongly_are_refused(waves: str, expected: str) -> None:
    """Each wave mistake is refused with the field and what to change."""
    message = _refusal(MINIMAL + waves)
    assert expected in message
    assert "nothing was published" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "[[abort]]\nthreshold_pct = 120",
            "abort[0].threshold_pct: Input should be less than or equal to 100 (got 120)",
        ),
        ("[[abort]]\nthreshold_pct = -5", "abort[0].threshold_pct: Input should be greater than 0 (got -5)"),
        ("[[abort]]\nthreshold_pct = 5\nmin_executed = 0", "abort[0].min_executed"),
        ("[[abort]]\nthreshold_pct = 5\nfailure_type = 'BROKEN'", "abort[0].failure_type"),
        ("[retries]\nFAILED = 11", "retries.FAILED: Input should be less than or equal to 10 (got 11)"),
        ("[retries]\nEXPLODED = 1", "retries.EXPLODED"),
        ("[maintenance]\nstart = '25:00'\nend = '02:00'", "write the time as HH:MM in UTC"),
        ("[maintenance]\nstart = '02:00'\nend = '02:00'", "the window would be empty"),
        ("[shadow]\nmin_agreement = 1.5", "shadow.min_agreement"),
        ("on_abort = 'explode'", "on_abort: Input should be 'stop' or 'rollback'"),
    ],
)
def test_impossible_settings_are_refused(extra: str, expected: str) -> None:
    """Thresholds over 100 % or under 0, retries over 10 and malformed windows name the field."""
    assert expected in _refusal(extra + "\n" + MINIMAL)


def test_missing_sections_and_empty_targets_are_refused() -> None:
    """A document without a model, or whose targets name nothing, says what is missing."""
    assert "model: missing" in _refusal("[targets]\ngroups = ['g']")
    assert "name at least one device" in _refusal("[model]\npath='m'\nversion='2'\n[targets]\n")
    assert "not valid TOML" in _refusal("[model\n")
    assert "a table of keys" in _refusal("- a\n- b\n", fmt="yaml")


def test_every_problem_is_listed_at_once() -> None:
    """Several mistakes give one refusal with one line each, not a fix-one-retry loop."""
    message = _refusal(
        "[retries]\nFAILED = 11\n" + MINIMAL + "[[abort]]\nthreshold_pct = 120\n[[waves]]\npercent = 0"
    )
    assert "abort[0].threshold_pct" in message
    assert "retries.FAILED" in message
    assert "waves[0].percent" in message


def test_unknown_devices_and_groups_are_refused_against_the_fleet() -> None:
    """Targets are checked against the fleet the planner sees, naming each unknown id."""
    doc = document(targets=Targets(devices=["d00", "ghost"], groups=["g", "nowhere"]))
    problems = check_document(doc, FLEET, check_file=False)
    assert any("unknown device 'ghost'" in p for p in problems)
    assert any("no device is in group 'nowhere'; known groups: g, h" in p for p in problems)


def test_missing_model_file_is_refused(tmp_path: Path) -> None:
    """A model path with no file behind it is refused before planning."""
    doc = parse_document(MINIMAL, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"model.path: no model file at .*m\.tflite"):
        validate_document(doc, FLEET)
    (tmp_path / "m.tflite").write_bytes(b"x")
    assert validate_document(doc, FLEET) is doc


def test_counts_and_min_executed_beyond_the_targets_are_refused() -> None:
    """A count wave or a min_executed larger than the targets could never happen: refused."""
    doc = document(
        waves=[Wave(count=5), Wave(percent=100)],
        abort=[AbortCriterion(threshold_pct=10, min_executed=20)],
    )
    problems = check_document(doc, FLEET, check_file=False)
    assert "waves[0].count = 5 exceeds the 3 targeted devices; lower it or use percent" in problems
    assert any(
        "abort[0].min_executed = 20 exceeds the 3 targeted devices" in p and "at most 3" in p
        for p in problems
    )


def test_targets_that_select_nobody_are_refused() -> None:
    """A group with no members selects no device: refused rather than an empty rollout."""
    problems = check_document(document(targets=Targets(groups=["empty"])), FLEET, check_file=False)
    assert any("they select no device" in p for p in problems)


@pytest.mark.parametrize(
    ("threshold", "failures", "executed", "tripped"),
    [
        (10, 2, 20, True),
        (10, 1, 20, False),
        (33.3, 1, 3, True),
        (33.4, 1, 3, False),
        (100, 5, 5, True),
        (0.1, 1, 1000, True),
    ],
)
def test_abort_criterion_trips_at_exactly_its_share(
    threshold: float, failures: int, executed: int, tripped: bool
) -> None:
    """failures / executed >= threshold % trips, computed exactly (no float rounding at the edge)."""
    criterion = AbortCriterion(threshold_pct=threshold, min_executed=1)
    assert criterion.tripped(failures, executed) is tripped


@pytest.mark.parametrize(
    ("start", "end", "hhmm", "inside"),
    [
        ("01:00", "03:00", "01:00", True),
        ("01:00", "03:00", "03:00", False),
        ("22:00", "04:00", "23:59", True),
        ("22:00", "04:00", "03:59", True),
        ("22:00", "04:00", "12:00", False),
    ],
)
def test_maintenance_window_is_daily_utc_and_may_wrap_midnight(
    start: str, end: str, hhmm: str, inside: bool
) -> None:
    """The window includes its start, excludes its end, and wraps past midnight."""
    hours, minutes = map(int, hhmm.split(":"))
    now = 1_700_000_000 // 86400 * 86400 + hours * 3600 + minutes * 60
    assert MaintenanceWindow(start=start, end=end).contains(now) is inside


def test_documents_round_trip_as_json() -> None:
    """A document survives model_dump/model_validate, which is how the controller persists it."""
    doc = load_document(EXAMPLE)
    assert RolloutDocument.model_validate_json(doc.model_dump_json()) == doc


def test_rollout_ids_leave_room_for_execution_suffixes() -> None:
    """A ':' (the attempt separator) or more than 56 characters in an id is refused; derived ids fit."""
    assert "id: String should match pattern" in _refusal("id = 'a:b'\n" + MINIMAL)
    assert "id: String should have at most 56 characters" in _refusal(f"id = '{'a' * 57}'\n" + MINIMAL)
    long_version = MINIMAL.replace('version = "2"', f'version = "{"9" * 64}"')
    derived = parse_document(long_version).rollout_id
    assert len(derived) <= 56
    assert ":" not in derived


def test_retries_all_is_a_default_for_every_failure_type() -> None:
    """retries.ALL (as in AWS retryCriteria) applies to each type not named on its own; keys are any case."""
    doc = parse_document("[retries]\nall = 2\ntimed_out = 5\n" + MINIMAL)
    assert doc.retries_for(RetryType.FAILED) == 2
    assert doc.retries_for(RetryType.REJECTED) == 2
    assert doc.retries_for(RetryType.TIMED_OUT) == 5


def test_derived_rollout_id_does_not_depend_on_where_the_document_is(tmp_path: Path) -> None:
    """The same document loaded from two folders derives the same id."""
    one, two = tmp_path / "a", tmp_path / "b"
    one.mkdir()
    two.mkdir()
    for folder in (one, two):
        (folder / "rollout.toml").write_text(MINIMAL)
    assert load_document(one / "rollout.toml").rollout_id == load_document(two / "rollout.toml").rollout_id
