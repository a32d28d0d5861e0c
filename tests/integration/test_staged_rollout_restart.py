"""`fleetbus serve` SIGKILLed twice mid-rollout: it reloads its state, finishes, notifies nobody twice."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from publisher.modelgen import ModelSpec, write_model
from schemas.signing import write_keypair
from tests.helpers import fleetbus_broker
from tests.integration.staged_rig import Observer, Serve, agents, cli, document, wait

DEVICES = [f"rs-{i}" for i in range(6)]
LATE = "rs-late"


def test_serve_restarts_mid_rollout_and_completes_without_notifying_anyone_twice(tmp_path: Path) -> None:
    """Killed while a wave soaks and again while the next downloads, serve resumes; late devices catch up."""
    private, public = write_keypair(tmp_path / "keys")
    write_model(tmp_path / "m.tflite", ModelSpec(seed=4, bias_add=0.5, pad_to=1_000_000))
    sha = hashlib.sha256((tmp_path / "m.tflite").read_bytes()).hexdigest()
    doc = document(
        tmp_path / "doc.toml",
        "restart-1",
        "m.tflite",
        "1.0.0",
        waves="[[waves]]\ncount = 2\nmin_soak_s = 8\n\n[[waves]]\npercent = 100\n",
    )
    key = public.read_text().strip()
    with fleetbus_broker() as port, agents(tmp_path, port, key, [*DEVICES, LATE]) as running:
        observer = Observer(port)
        serve = Serve(tmp_path, port, private).start()
        try:
            observer.wait_online([*DEVICES, LATE])
            wait(lambda: serve.devices_online() == len(DEVICES) + 1, what="serve sees the agents")
            running.kill(LATE)  # SIGKILL: its Last Will marks it offline; it is planned, but deferred
            wait(lambda: serve.devices_online() == len(DEVICES), what="serve sees the late device go")
            handed = cli(
                "rollout",
                "push",
                str(doc),
                "--key",
                str(private),
                "--server",
                serve.url,
                "--broker",
                f"127.0.0.1:{port}",
                "--no-follow",
            )
            assert handed.returncode == 0, handed.stderr

            # First kill: the canary wave succeeded and is soaking; nothing else was notified yet.
            observer.wait_status("restart-1", lambda s: s.waves[0].states.get("SUCCEEDED") == 2)
            serve.kill()
            assert len(observer.deploys()) == 2
            serve.start()

            # Second kill: the second wave has just been notified and is downloading 1 MB each.
            observer.wait_status("restart-1", lambda s: s.waves[1].notified > 0, timeout=60)
            serve.kill()
            serve.start()

            done = observer.wait_status(
                "restart-1", lambda s: s.state == "COMPLETED" and s.states.get("SUCCEEDED") == 6, timeout=90
            )
            assert done.deferred == 1
            # The late device comes back after the rollout completed, and still gets it.
            running.start(tmp_path, port, key, LATE)
            observer.wait_status("restart-1", lambda s: s.states.get("SUCCEEDED") == 7, timeout=60)

            counts = Counter(d for d, r, _ in observer.deploys() if r == "restart-1")
            assert counts == Counter({d: 1 for d in [*DEVICES, LATE]})
            assert all(r == "restart-1" for _, r, _ in observer.deploys())
            for device in [*DEVICES, LATE]:
                active = running.homes[device] / "state" / "models" / "active.tflite"
                assert hashlib.sha256(active.read_bytes()).hexdigest() == sha
            assert "rollouts=1" in (tmp_path / "serve-3.log").read_text()
        finally:
            serve.stop()
            observer.close()
