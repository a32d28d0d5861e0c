"""The post-commit watchdog's verdicts, from plain lists of outputs."""

from __future__ import annotations

import math

import pytest

from device.watchdog import Verdict, Watchdog


def feed(w: Watchdog, rows: list[list[float] | None]) -> Verdict | None:
    result = None
    for row in rows:
        result = w.error() if row is None else w.output(row)
    return result.verdict if result else None


def test_no_verdict_before_the_window_is_full() -> None:
    """The watchdog waits for a whole window before it judges."""
    assert feed(Watchdog(window=5), [[0.1], [0.2]]) is None


def test_varied_finite_outputs_are_ok() -> None:
    """Outputs that move and stay finite pass."""
    assert feed(Watchdog(window=4), [[0.1, 1.0], [0.2, 1.1], [0.3, 0.9], [0.4, 1.0]]) is Verdict.OK


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_infinity_trips(bad: float) -> None:
    """A single NaN or infinity in the window is enough to roll back."""
    assert feed(Watchdog(window=3), [[0.1], [bad], [0.2]]) is Verdict.NONFINITE


def test_collapsed_outputs_trip() -> None:
    """Outputs that never change over the window mean the model collapsed to a constant."""
    assert feed(Watchdog(window=4), [[0.5, 0.0]] * 4) is Verdict.COLLAPSED


def test_collapse_check_can_be_disabled() -> None:
    """A negative tolerance turns the collapse check off for models with legitimately fixed outputs."""
    assert feed(Watchdog(window=3, collapse_tolerance=-1), [[1.0]] * 3) is Verdict.OK


def test_too_many_errors_trip() -> None:
    """Inferences that raise count against the error ratio."""
    assert feed(Watchdog(window=4, max_error_ratio=0.25), [[0.1], None, None, [0.2]]) is Verdict.ERRORS
    assert feed(Watchdog(window=4, max_error_ratio=0.25), [[0.1], None, [0.3], [0.2]]) is Verdict.OK


def test_verdict_is_given_once_and_kept() -> None:
    """After the verdict, further outputs do not change it."""
    w = Watchdog(window=2)
    feed(w, [[1.0], [2.0]])
    assert w.output([math.nan]) is not None
    assert w.result is not None
    assert w.result.verdict is Verdict.OK
    with pytest.raises(ValueError, match="at least 2"):
        Watchdog(window=1)
