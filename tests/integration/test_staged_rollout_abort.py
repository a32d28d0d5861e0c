"""A staged rollout to 20 real agents where a share fails the commit gate: abort at the threshold, roll back.

The failing share is real, not faked: three agent processes are given less memory (``RLIMIT_AS``,
as a smaller board has) than the candidate model's tensor arena needs, so their commit gate cannot
load it and they report REJECTED, while the other devices commit it.
"""

from __future__ import annotations

import hashlib
import resource
from collections import Counter
from pathlib import Path

from publisher.document import rank
from publisher.modelgen import ModelSpec, build_broken, write_model
from schemas.messages import ExecStatus
from schemas.signing import write_keypair
from tests.helpers import fleetbus_broker
from tests.integration.staged_rig import Observer, Serve, agents, document, push, wait

N = 20
DEVICES = [f"ab-{i:02d}" for i in range(N)]
#: Address space left to a constrained agent above what it uses: less than the candidate's arena.
MEMORY_MARGIN = 6 << 20


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


def _active_sha(home: Path) -> str:
    return hashlib.sha256((home / "state" / "models" / "active.tflite").read_bytes()).hexdigest()


def test_abort_at_the_threshold_then_roll_back_the_devices_that_committed(tmp_path: Path) -> None:
    """3 of the canary wave's 10 devices fail the gate: 30 % trips the 30 % criterion, 7 roll back."""
    private, public = write_keypair(tmp_path / "keys")
    spec = ModelSpec(seed=3, bias_add=0.5)
    write_model(tmp_path / "v1.tflite", spec)
    # The same function through an 8 MiB intermediate tensor: a ~14 MB arena.
    (tmp_path / "v2.tflite").write_bytes(build_broken("huge_arena", spec))
    v1_sha = hashlib.sha256((tmp_path / "v1.tflite").read_bytes()).hexdigest()
    v2_sha = hashlib.sha256((tmp_path / "v2.tflite").read_bytes()).hexdigest()
    with (
        fleetbus_broker() as port,
        agents(tmp_path, port, public.read_text().strip(), DEVICES, interval_s=0.25, health_s=2.0) as running,
    ):
        observer = Observer(port)
        serve = Serve(tmp_path, port, private).start()
        try:
            observer.wait_online(DEVICES, timeout=120)
            wait(lambda: serve.devices_online() == N, 60, "serve sees 20 agents")
            base = push(
                document(tmp_path / "base.toml", "base-1", "v1.tflite", "1.0.0"), private, port, serve
            )
            assert base.get("state") == "COMPLETED", base

            # Wave 0 is the first 10 devices in seed order; constrain 3 of them.
            order = rank("test", DEVICES)
            canary, rest = order[:10], order[10:]
            constrained = [canary[1], canary[4], canary[8]]
            for device in constrained:
                pid = running.procs[device].pid
                resource.prlimit(
                    pid, resource.RLIMIT_AS, (_vm_size(pid) + MEMORY_MARGIN, resource.RLIM_INFINITY)
                )

            doc = document(
                tmp_path / "big.toml",
                "big-2",
                "v2.tflite",
                "2.0.0",
                body='on_abort = "rollback"\n\n[[abort]]\nfailure_type = "ALL"\nthreshold_pct = 30\n'
                "min_executed = 10\n",
                waves="[[waves]]\ncount = 10\nmin_soak_s = 600\n\n[[waves]]\npercent = 100\n",
            )
            out = push(doc, private, port, serve, timeout=120)
            assert out["_exit"] == 1, out
            assert out["state"] == "ROLLED_BACK"
            assert out["reason"] == "3 of 10 executed devices ended ALL (30.0% >= 30%)"
            waves = out["waves"]
            assert isinstance(waves, list)
            assert waves[0]["states"] == {"SUCCEEDED": 7, "REJECTED": 3}
            assert waves[1]["notified"] == 0

            deploys = observer.deploys()
            assert Counter(d for d, r, _ in deploys if r == "big-2") == Counter(canary)
            assert not {d for d, r, _ in deploys if r.startswith("big-2")} & set(rest)
            committed = set(canary) - set(constrained)
            rolled = [d for d, r, rollback in deploys if r == "big-2:rb"]
            assert sorted(rolled) == sorted(committed)
            assert all(rollback for _, r, rollback in deploys if r == "big-2:rb")

            final = observer.wait_status("big-2", lambda s: s.states.get("ROLLBACK_SUCCEEDED") == 7, 90)
            assert final.state == "ROLLED_BACK"
            for device in DEVICES:
                assert _active_sha(running.homes[device]) == v1_sha, device
            fleet = observer.fleet()
            for device in constrained:
                view = fleet.devices[device]
                assert view.rollout_id == "big-2"
                assert view.rollout_status is ExecStatus.REJECTED
                assert "load" in (view.rollout_reason or "")
            assert v2_sha != v1_sha
            # Rollback executions (`big-2:rb`) belong to the rollout: no anomaly is counted for them.
            assert serve.api("/api/fleet")["counters"].get("anomalies", 0) == 0
        finally:
            serve.stop()
            observer.close()
