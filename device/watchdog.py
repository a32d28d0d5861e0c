"""The post-commit watchdog: judges a window of a new model's outputs, without I/O.

After a commit the agent feeds every inference (its outputs, or the fact that it raised) into a
`Watchdog`.  Once the window is full it gives one verdict; anything but OK makes the agent roll
back to the previous model and report why.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass


class Verdict(str, enum.Enum):
    OK = "ok"
    ERRORS = "errors"  # too many inferences raised
    NONFINITE = "nonfinite"  # an output held NaN or infinity
    COLLAPSED = "collapsed"  # every output was the same over the whole window


@dataclass(frozen=True)
class WatchdogResult:
    verdict: Verdict
    reason: str

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


class Watchdog:
    """Collects ``window`` inferences, then decides once.

    ``max_error_ratio`` is the share of failed inferences tolerated.  ``collapse_tolerance`` is the
    largest spread (max - min of every output element over the window) that still counts as
    constant; a negative value turns the collapse check off.
    """

    def __init__(self, window: int = 20, max_error_ratio: float = 0.1, collapse_tolerance: float = 0.0):
        if window < 2:
            raise ValueError("the watchdog window must hold at least 2 inferences")
        self.window = window
        self.max_error_ratio = max_error_ratio
        self.collapse_tolerance = collapse_tolerance
        self._seen = 0
        self._errors = 0
        self._nonfinite = 0
        self._lo: list[float] | None = None
        self._hi: list[float] | None = None
        self._result: WatchdogResult | None = None

    @property
    def result(self) -> WatchdogResult | None:
        return self._result

    def error(self) -> WatchdogResult | None:
        """Record an inference that raised."""
        self._errors += 1
        return self._count()

    def output(self, values: Sequence[float]) -> WatchdogResult | None:
        """Record one inference's flattened outputs."""
        if self._result is not None:
            return self._result
        if any(not math.isfinite(v) for v in values):
            self._nonfinite += 1
        elif self._lo is None or self._hi is None or len(self._lo) != len(values):
            self._lo, self._hi = list(values), list(values)
        else:
            lo, hi = self._lo, self._hi
            for i, v in enumerate(values):
                if v < lo[i]:
                    lo[i] = v
                elif v > hi[i]:
                    hi[i] = v
        return self._count()

    def _count(self) -> WatchdogResult | None:
        if self._result is not None:
            return self._result
        self._seen += 1
        if self._seen >= self.window:
            self._result = self._judge()
        return self._result

    def _judge(self) -> WatchdogResult:
        n = self._seen
        if self._nonfinite:
            bad = self._nonfinite
            return WatchdogResult(Verdict.NONFINITE, f"{bad} of {n} inferences gave NaN or infinity")
        if self._errors / n > self.max_error_ratio:
            return WatchdogResult(
                Verdict.ERRORS,
                f"{self._errors} of {n} inferences failed (more than {self.max_error_ratio:.0%})",
            )
        if self.collapse_tolerance >= 0 and self._lo is not None and self._hi is not None:
            finite = n - self._errors
            spread = max((h - lo for lo, h in zip(self._lo, self._hi, strict=True)), default=0.0)
            if finite >= 2 and spread <= self.collapse_tolerance:
                return WatchdogResult(
                    Verdict.COLLAPSED, f"outputs were constant over {finite} inferences (spread {spread:g})"
                )
        return WatchdogResult(Verdict.OK, f"{n} inferences look healthy")
