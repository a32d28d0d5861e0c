"""What the agent measures about itself: memory, CPU, disk, counters and latency percentiles.

Read from /proc directly (no psutil on a board), each figure a cheap call.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Iterable


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_bytes() -> int:
    """Resident set size now."""
    return _proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The high-water mark of the resident set size."""
    return _proc_status_kib("VmHWM") * 1024


def meminfo() -> tuple[int, int]:
    """(total, available) RAM in bytes, from /proc/meminfo; zeros where it is missing."""
    total = avail = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


class CpuMeter:
    """CPU use of this process since the previous reading, in percent of one core."""

    def __init__(self) -> None:
        self._cpu, self._wall = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def percent(self) -> float:
        cpu, wall = self._now()
        d_cpu, d_wall = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return 0.0 if d_wall <= 0 else round(100.0 * d_cpu / d_wall, 1)


class Counters:
    """Named counts shared by the agent's threads (bad messages, rejected chunks, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


class LatencyStats:
    """The last ``keep`` inference latencies, for p50 and p95."""

    def __init__(self, keep: int = 1024) -> None:
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=keep)
        self.count = 0
        self.errors = 0

    def add(self, ms: float) -> None:
        # One writer (the inference thread); deque.append and list(deque) are atomic under the GIL.
        self._recent.append(ms)
        self.count += 1

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def new_window(self) -> None:
        """Forget the recent latencies (a new model took over); the counts keep going."""
        self._recent.clear()

    @property
    def samples(self) -> int:
        """Latencies p50 and p95 are taken over."""
        return len(self._recent)

    def p50_p95(self) -> tuple[float | None, float | None]:
        recent = list(self._recent)
        return percentile(recent, 50), percentile(recent, 95)
