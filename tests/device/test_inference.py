"""The inference loop: batching by count and time, latency stats, and hot swaps without a gap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from device.health import Counters, CpuMeter, LatencyStats, meminfo, peak_rss_bytes, percentile, rss_bytes
from device.inference import Batch, Batcher, InferenceLoop
from device.inputs import SyntheticSource
from device.runtime import default_runtime
from publisher.modelgen import ModelSpec, build_model, reference_output


def test_batcher_flushes_by_count_and_by_time() -> None:
    """A batch is due at batch_max results or interval_s after it opened, whichever comes first."""
    b = Batcher(batch_max=3, interval_s=1.0)
    assert b.add("1", [0.1], 1.0, now=0.0) is None
    assert b.add("1", [0.2], 1.0, now=0.1) is None
    full = b.add("1", [0.3], 1.0, now=0.2)
    assert full is not None
    assert len(full.outputs) == 3
    assert b.add("1", [0.4], 1.0, now=5.0) is None
    assert b.due(5.5) is None
    old = b.due(6.1)
    assert old is not None
    assert old.outputs == [[0.4]]


def test_batcher_never_mixes_model_versions() -> None:
    """Results of a new model version close the previous version's batch."""
    b = Batcher(batch_max=10, interval_s=10.0)
    b.add("1", [0.1], 1.0, now=0.0)
    b.add_error("1", now=0.0)
    closed = b.add("2", [0.2], 1.0, now=0.1)
    assert closed is not None
    assert closed.model_version == "1"
    assert closed.errors == 1


def test_loop_runs_the_model_and_swaps_without_a_gap(tmp_path: Path) -> None:
    """Outputs match the model; after swap() the next inference uses the new model, with no idle run."""
    rt = default_runtime()
    specs = [ModelSpec(seed=1), ModelSpec(seed=2, bias_add=5.0)]
    paths = []
    for i, spec in enumerate(specs):
        paths.append(tmp_path / f"m{i}.tflite")
        paths[-1].write_bytes(build_model(spec))
    batches: list[Batch] = []
    src = SyntheticSource(seed=0)
    loop = InferenceLoop(src, batches.append, interval_s=0, batch_max=5, batch_interval_s=60)
    assert loop.step(0) is False  # no model yet
    loop.swap(rt.load(paths[0]), "1")
    seen: list[list[float] | None] = []
    loop.observe(seen.append)
    for _ in range(5):
        assert loop.step(0)
    loop.swap(rt.load(paths[1]), "2")
    for _ in range(5):
        assert loop.step(0)
    assert [b.model_version for b in batches] == ["1", "2"]
    # Every step ran a model: ten inferences, ten outputs, none lost around the swap.
    assert loop.stats.count == 10
    assert len(seen) == 10
    check = SyntheticSource(seed=0)
    x = check.next(loop._model.inputs)[0] if loop._model else None  # type: ignore[union-attr]
    assert x is not None
    assert np.allclose(batches[0].outputs[0], reference_output(specs[0], x).ravel(), atol=1e-5)
    assert all(v >= 4.0 for row in batches[1].outputs for v in row)  # relu(...) + 5
    loop.stop()


def test_loop_thread_publishes_and_stops(tmp_path: Path) -> None:
    """In its thread the loop publishes batches on time and flushes the last one on stop."""
    path = tmp_path / "m.tflite"
    path.write_bytes(build_model(ModelSpec()))
    got: list[Batch] = []
    done = threading.Event()

    def publish(b: Batch) -> None:
        got.append(b)
        done.set()

    loop = InferenceLoop(SyntheticSource(), publish, interval_s=0.001, batch_max=1000, batch_interval_s=0.05)
    loop.swap(default_runtime().load(path), "1")
    loop.start()
    assert done.wait(5)
    loop.stop()
    assert got
    assert got[0].outputs
    p50, p95 = loop.stats.p50_p95()
    assert p50 is not None
    assert p95 is not None
    assert p50 <= p95


def test_health_readings() -> None:
    """RSS, peak RSS, RAM and CPU come from /proc and are plausible; percentiles use nearest rank."""
    assert 0 < rss_bytes() <= peak_rss_bytes()
    total, avail = meminfo()
    assert 0 < avail <= total
    cpu = CpuMeter()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:
        pass
    assert cpu.percent() > 0
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([], 95) is None
    c = Counters()
    c.inc("x")
    c.inc("x", 2)
    assert c.snapshot() == {"x": 3}
    stats = LatencyStats(keep=3)
    for ms in (1.0, 2.0, 3.0, 100.0):
        stats.add(ms)
    assert stats.p50_p95() == (3.0, 100.0)
    assert stats.count == 4


def test_a_swap_starts_a_new_latency_window(tmp_path: Path) -> None:
    """After a model swap, p50/p95 cover only the new model's inferences; the counts keep going."""
    rt = default_runtime()
    path = tmp_path / "m.tflite"
    path.write_bytes(build_model(ModelSpec(seed=3)))
    loop = InferenceLoop(
        SyntheticSource(seed=1), lambda b: None, interval_s=0, batch_max=100, batch_interval_s=60
    )
    loop.swap(rt.load(path), "1")
    for _ in range(20):
        assert loop.step(0)
    assert loop.stats.samples == 20
    loop.swap(rt.load(path), "2")
    for _ in range(5):
        assert loop.step(0)
    assert loop.stats.samples == 5
    assert loop.stats.count == 25
    loop.stop()
