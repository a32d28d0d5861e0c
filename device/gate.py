"""The commit gate: a staged model must prove itself before it may serve.

`precheck` runs before any byte is downloaded and decides INCOMPATIBLE from what the manifest
declares (ops, arena).  `run_gate` loads the staged file and checks, in order: that it loads, its
tensor contract against the manifest, the golden cases within their tolerances, the latency budget
(median of a few invokes) and the arena budget.  The first failure is the reason reported with
REJECTED; on success the loaded model is handed back so the agent swaps it in without reloading.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import ModelLoadError
from device.runtime import InferenceRuntime, LoadedModel, TensorSpec
from schemas.plain import GoldenCase, Manifest, TensorSig


@dataclass
class GateResult:
    ok: bool
    reason: str
    model: LoadedModel | None = None
    latency_ms: float | None = None
    arena_bytes: int | None = None
    checks: list[str] = field(default_factory=list)


def precheck(manifest: Manifest, supported_ops: Iterable[str], ram_bytes: int) -> str | None:
    """Why the device cannot run this model, judged from the manifest alone; None if it can."""
    supported = set(supported_ops)
    missing = sorted(op for op in manifest.ops if op not in supported)
    if missing:
        return f"runtime lacks ops {', '.join(missing)}"
    if manifest.arena_bytes is not None and ram_bytes > 0 and manifest.arena_bytes > ram_bytes:
        return f"model needs a {manifest.arena_bytes}-byte arena; the device advertises {ram_bytes} bytes"
    return None


def _contract(kind: str, declared: Sequence[TensorSig], actual: Sequence[TensorSpec]) -> str | None:
    if not declared:
        return None
    if len(declared) != len(actual):
        return f"manifest declares {len(declared)} {kind}s, the model has {len(actual)}"
    for i, (want, got) in enumerate(zip(declared, actual, strict=True)):
        if tuple(want.shape) != tuple(got.shape):
            return f"{kind} {i} ({got.name}) has shape {list(got.shape)}, manifest says {list(want.shape)}"
        if want.dtype != got.dtype:
            return f"{kind} {i} ({got.name}) is {got.dtype}, manifest says {want.dtype}"
        if (want.scale is None) != (got.scale is None):
            return f"{kind} {i} ({got.name}) has scale {got.scale}, manifest says {want.scale}"
        if (
            want.scale is not None
            and got.scale is not None
            and not math.isclose(want.scale, got.scale, rel_tol=1e-6)
        ):
            return f"{kind} {i} ({got.name}) has scale {got.scale}, manifest says {want.scale}"
        if want.zero_point is not None and want.zero_point != got.zero_point:
            return f"{kind} {i} ({got.name}) has zero point {got.zero_point}, manifest says {want.zero_point}"
    return None


def _arrays(values: Sequence[Sequence[float]], specs: Sequence[TensorSpec]) -> list[npt.NDArray[Any]]:
    if len(values) != len(specs):
        raise ValueError(f"golden case gives {len(values)} inputs, the model takes {len(specs)}")
    pairs = zip(values, specs, strict=True)
    return [np.asarray(v, dtype=np.dtype(s.dtype)).reshape(s.shape) for v, s in pairs]


def _golden(model: LoadedModel, cases: Sequence[GoldenCase]) -> str | None:
    for n, case in enumerate(cases):
        try:
            outputs = model.invoke(_arrays(case.inputs, model.inputs))
        except (ValueError, RuntimeError) as exc:
            return f"golden case {n}: {exc}"
        if len(outputs) != len(case.expected):
            return f"golden case {n}: model gave {len(outputs)} outputs, {len(case.expected)} expected"
        for k, (got, want) in enumerate(zip(outputs, case.expected, strict=True)):
            actual = np.asarray(got, dtype=np.float64).ravel()
            expected = np.asarray(want, dtype=np.float64).ravel()
            if actual.shape != expected.shape:
                return f"golden case {n} output {k}: {actual.size} values, {expected.size} expected"
            if not np.all(np.isfinite(actual)):
                return f"golden case {n} output {k}: model gave NaN or infinity"
            if not np.allclose(actual, expected, atol=case.atol, rtol=case.rtol):
                worst = float(np.max(np.abs(actual - expected)))
                return (
                    f"golden case {n} output {k}: off by up to {worst:g} "
                    f"(atol {case.atol:g}, rtol {case.rtol:g})"
                )
    return None


def sample_inputs(specs: Sequence[TensorSpec]) -> list[npt.NDArray[Any]]:
    """Zero inputs of the right shape and dtype, for timing."""
    return [np.zeros(s.shape, dtype=np.dtype(s.dtype)) for s in specs]


def _median_latency_ms(model: LoadedModel, inputs: list[npt.NDArray[Any]], runs: int) -> float:
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model.invoke(inputs)
        times.append((time.perf_counter() - t0) * 1000.0)
    return _median(times)


def _median(values: Sequence[float]) -> float:
    # statistics.median's answer; importing statistics brings fractions and decimal (C) with it.
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_gate(
    runtime: InferenceRuntime, path: str | os.PathLike[str], manifest: Manifest, latency_runs: int = 5
) -> GateResult:
    """Load ``path`` and check it against ``manifest``; the loaded model is kept only on success."""
    checks: list[str] = []
    try:
        model = runtime.load(path)
    except ModelLoadError as exc:
        return GateResult(False, f"load: {exc}")
    checks.append("load")
    keep = False
    try:
        problem = _contract("input", manifest.inputs, model.inputs) or _contract(
            "output", manifest.outputs, model.outputs
        )
        if problem:
            return GateResult(False, f"contract: {problem}", checks=checks)
        checks.append("contract")
        problem = _golden(model, manifest.golden)
        if problem:
            return GateResult(False, problem, checks=checks)
        checks.append("golden")
        try:
            latency = _median_latency_ms(model, sample_inputs(model.inputs), latency_runs)
        except (ValueError, RuntimeError) as exc:
            return GateResult(False, f"invoke: {exc}", checks=checks)
        budget = manifest.latency_budget_ms
        if budget is not None and latency > budget:
            return GateResult(
                False, f"latency: median {latency:.3f} ms is over the {budget:g} ms budget", checks=checks
            )
        checks.append("latency")
        arena = model.arena_bytes()
        if manifest.arena_budget_bytes is not None and arena > manifest.arena_budget_bytes:
            return GateResult(
                False,
                f"arena: {arena} bytes is over the {manifest.arena_budget_bytes}-byte budget",
                checks=checks,
            )
        checks.append("arena")
        keep = True
        return GateResult(True, "passed " + ", ".join(checks), model, latency, arena, checks)
    finally:
        if not keep:
            model.close()
