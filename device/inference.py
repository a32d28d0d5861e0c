"""The inference loop: inputs in, outputs batched out, latency measured, models swapped without a gap.

It runs in its own thread.  `swap` hands it a loaded model; the loop picks it up between two
invokes and closes the old one itself, so no invoke ever runs on a closed interpreter and no
interval passes without a model.  Results are batched by count and by time (`Batcher`, pure), so a
device costs the broker about one message per batch interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from device.errors import InputError
from device.health import Counters, LatencyStats
from device.inputs import InputSource
from device.runtime import LoadedModel

log = structlog.get_logger("device.inference")


@dataclass
class Batch:
    """Results ready to publish."""

    model_version: str | None
    outputs: list[list[float]] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0


class Batcher:
    """Collects results and says when a batch is due: ``batch_max`` of them or ``interval_s`` old."""

    def __init__(self, batch_max: int, interval_s: float) -> None:
        self.batch_max = batch_max
        self.interval_s = interval_s
        self._batch: Batch | None = None
        self._opened = 0.0
        self._last = 0.0

    def _open(self, version: str | None, now: float) -> Batch:
        if self._batch is None or self._batch.model_version != version:
            self._batch = Batch(version, first_ts=time.time())
            self._opened = now
        return self._batch

    def add(self, version: str | None, outputs: list[float], latency_ms: float, now: float) -> Batch | None:
        """Add one result; returns a full batch when one is due (a new version closes the old one).

        ``now`` is a perf_counter reading; wall-clock stamps are taken once per batch, not per result.
        """
        batch = self._batch
        flushed = None
        if batch is None or batch.model_version != version:
            flushed = self.take()
            batch = self._open(version, now)
        batch.outputs.append(outputs)
        batch.latency_ms.append(latency_ms)
        self._last = now
        return flushed or self.due(now)

    def add_error(self, version: str | None, now: float) -> Batch | None:
        flushed = self._take_if_other(version)
        batch = self._open(version, now)
        batch.errors += 1
        self._last = now
        return flushed or self.due(now)

    def _take_if_other(self, version: str | None) -> Batch | None:
        if self._batch is not None and self._batch.model_version != version:
            return self.take()
        return None

    def due(self, now: float) -> Batch | None:
        """The batch if it is full or old enough, else None."""
        b = self._batch
        if b is None:
            return None
        if len(b.outputs) + b.errors >= self.batch_max or now - self._opened >= self.interval_s:
            return self.take()
        return None

    def take(self) -> Batch | None:
        b, self._batch = self._batch, None
        if b is not None:
            b.last_ts = time.time() - max(0.0, time.perf_counter() - self._last)
            b.latency_ms = [round(ms, 4) for ms in b.latency_ms]
        return b


Observer = Callable[[list[float] | None], None]


class InferenceLoop:
    """Runs the active model on inputs from a source, forever, in a thread."""

    def __init__(
        self,
        source: InputSource,
        publish: Callable[[Batch], None],
        *,
        interval_s: float = 0.1,
        batch_max: int = 50,
        batch_interval_s: float = 1.0,
        stats: LatencyStats | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._source = source
        self._publish = publish
        self._interval = interval_s
        self._batcher = Batcher(batch_max, batch_interval_s)
        self.stats = stats or LatencyStats()
        self.counters = counters or Counters()
        self._lock = threading.Lock()
        self._next: tuple[LoadedModel | None, str | None] | None = None
        self._model: LoadedModel | None = None
        self._version: str | None = None
        self._observer: Observer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    @property
    def version(self) -> str | None:
        return self._version

    def swap(self, model: LoadedModel | None, version: str | None) -> None:
        """Serve ``model`` from the next inference on; the old one is closed by the loop."""
        with self._lock:
            pending = self._next
            self._next = (model, version)
        if pending is not None and pending[0] is not None and pending[0] is not model:
            pending[0].close()  # superseded before the loop ever took it
        if self._thread is None:
            self._take_next()

    def observe(self, observer: Observer | None) -> None:
        """Call ``observer`` with every inference's outputs (None when it failed); None stops."""
        self._observer = observer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleetbus-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        batch = self._batcher.take()
        if batch is not None:
            self._publish(batch)
        if self._model is not None:
            self._model.close()
            self._model = None

    def _take_next(self) -> None:
        with self._lock:
            nxt, self._next = self._next, None
        if nxt is None:
            return
        old = self._model
        self._model, self._version = nxt
        if old is not None and old is not self._model:
            old.close()
        # Health's p50/p95 are then the new model's alone (health names the version they belong to);
        # a window mixing both would blur the KPI gate's comparison with the previous model.
        self.stats.new_window()

    def step(self, timeout: float = 0.1) -> bool:
        """One inference, if a model and an input are there; True when it ran or failed."""
        if self._next is not None:
            self._take_next()
        model = self._model
        if model is None:
            return False
        try:
            sample = self._source.next(model.inputs, timeout)
        except InputError as exc:
            self.counters.inc("input_errors")
            self.last_error = str(exc)
            return False
        if sample is None:
            return False
        now = time.perf_counter()
        try:
            outputs = model.invoke(sample)
        except (ValueError, RuntimeError) as exc:
            self.stats.error()
            self.counters.inc("inference_errors")
            self.last_error = f"invoke: {exc}"
            if self._observer is not None:
                self._observer(None)
            self._emit(self._batcher.add_error(self._version, time.perf_counter()))
            return True
        done = time.perf_counter()
        latency_ms = (done - now) * 1000.0
        self.stats.add(latency_ms)
        if len(outputs) == 1:
            flat: list[float] = outputs[0].ravel().tolist()
        else:
            flat = [v for out in outputs for v in out.ravel().tolist()]
        if self._observer is not None:
            self._observer(flat)
        self._emit(self._batcher.add(self._version, flat, latency_ms, done))
        return True

    def _emit(self, batch: Batch | None) -> None:
        if batch is not None:
            self._publish(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.step()
            except Exception as exc:  # the loop must outlive any single bad sample or model
                self.counters.inc("inference_errors")
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("inference_failed", error=self.last_error)
                ran = False
            self._emit(self._batcher.due(time.perf_counter()))
            if not ran:
                self._stop.wait(0.02 if self._model is not None else 0.05)
            elif self._interval > 0:
                self._stop.wait(self._interval)
