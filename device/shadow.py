"""Shadow mode on the device: run a candidate beside the active model and report how often they agree.

A deploy whose manifest has ``shadow = true`` is fetched, verified and gated like any other, but at
the activation step the agent calls ``begin`` instead of swapping models: the active model keeps
serving, and a ``ShadowRun`` thread feeds the same inputs to a second instance of the active model and
to the candidate, compares their outputs within the manifest's golden tolerances, and publishes a
``shadow`` message (cumulative ``samples`` and ``agreed`` for this execution) about once a second.
The execution then reports SUCCEEDED (the shadow run is installed), the staged file is left in place,
and the real deploy that may follow finds it complete and activates it without a second download.
``end`` stops the run; the agent calls it on the next deploy and on a cancel.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from device.errors import InputError, ModelLoadError
from device.inputs import InputSource, SyntheticSource, make_source
from device.rollout import Event
from schemas import topics
from schemas.plain import Manifest, Shadow, encode

if TYPE_CHECKING:
    from device.agent import Agent
    from device.runtime import LoadedModel

log = structlog.get_logger("device.shadow")

REPORT_EVERY_S = 1.0
_ATTR = "_shadow_run"


class ShadowRun:
    """Compares a candidate with the active model on the same inputs, in its own thread."""

    def __init__(
        self,
        agent: Agent,
        manifest: Manifest,
        active: LoadedModel,
        candidate: LoadedModel,
        *,
        source: InputSource,
        interval_s: float,
    ) -> None:
        self.agent = agent
        self.manifest = manifest
        self.active = active
        self.candidate = candidate
        self.source = source
        self.interval_s = max(0.01, interval_s)
        case = manifest.golden[0] if manifest.golden else None
        self.atol = case.atol if case else 1e-5
        self.rtol = case.rtol if case else 1e-4
        self.samples = 0
        self.agreed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleetbus-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self._report()
        for model in (self.active, self.candidate):
            model.close()
        self.source.close()

    def compare_once(self) -> bool | None:
        """One sample through both models: True when they agree, None when there was no input."""
        try:
            sample = self.source.next(self.active.inputs, 0.1)
        except InputError:
            return None
        if sample is None:
            return None
        want = self.active.invoke(sample)
        got = self.candidate.invoke(sample)
        same = len(want) == len(got) and all(
            a.shape == b.shape and bool(np.allclose(b, a, atol=self.atol, rtol=self.rtol))
            for a, b in zip(want, got, strict=False)
        )
        self.samples += 1
        self.agreed += int(same)
        return same

    def _run(self) -> None:
        next_report = time.monotonic() + REPORT_EVERY_S
        while not self._stop.wait(self.interval_s):
            try:
                self.compare_once()
            except (ValueError, RuntimeError) as exc:  # a model that cannot run this input disagrees
                self.samples += 1
                log.warning("shadow_invoke_failed", device=self.agent.device_id, error=str(exc))
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + REPORT_EVERY_S
                self._report()

    def _report(self) -> None:
        message = Shadow(
            device_id=self.agent.device_id,
            seq=self.agent._next_seq(),
            rollout_id=self.manifest.rollout_id,
            candidate_version=self.manifest.version,
            samples=self.samples,
            agreed=self.agreed,
        )
        topic = topics.device_stream(self.agent.device_id, topics.DeviceStream.SHADOW)
        self.agent.link.publish(topic, encode(message), qos=1)


def begin(agent: Agent, manifest: Manifest) -> tuple[Event, str | None]:
    """At the activation step of a shadow deploy: start comparing instead of activating."""
    end(agent)
    candidate: Any = agent._candidate
    agent._candidate = None
    try:
        if candidate is None:
            part, _ = agent.store.staging_paths(manifest.model_sha256)
            candidate = agent.runtime.load(part)
        if not agent.store.active.exists():
            candidate.close()
            return Event.ERROR, "shadow mode needs an active model to compare the candidate with"
        active = agent.runtime.load(agent.store.active)
    except ModelLoadError as exc:
        return Event.ERROR, f"shadow: {exc}"
    spec = agent.settings.inference.source
    # A socket source can be bound only once: the shadow run then compares on synthetic inputs.
    source = SyntheticSource() if spec.startswith("socket:") else make_source(spec)
    run = ShadowRun(
        agent, manifest, active, candidate, source=source, interval_s=agent.settings.inference.interval_s
    )
    setattr(agent, _ATTR, run)
    run.start()
    log.info("shadow_started", device=agent.device_id, rollout=manifest.rollout_id, version=manifest.version)
    return Event.ACTIVATED, None


def end(agent: Agent) -> None:
    """Stop the agent's shadow run, if one is going (its last counts are reported)."""
    run: ShadowRun | None = getattr(agent, _ATTR, None)
    if run is not None:
        setattr(agent, _ATTR, None)
        run.stop()
        log.info("shadow_ended", device=agent.device_id, samples=run.samples, agreed=run.agreed)
