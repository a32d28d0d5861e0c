"""`fleetbus rollout push DOC` handed to a real `fleetbus serve`, driven in waves to real agent processes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from publisher.modelgen import ModelSpec, write_model
from schemas.signing import write_keypair
from tests.helpers import fleetbus_broker
from tests.integration.staged_rig import Agents, Observer, Serve, agents, cli, document, push, wait

DEVICES = ["st-1", "st-2", "st-3"]


@dataclass
class Rig:
    root: Path
    port: int
    key: Path
    public: str
    agents: Agents
    serve: Serve
    observer: Observer


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A broker, three agents in group `lab`, `fleetbus serve` with a key, and a raw observer."""
    root = tmp_path_factory.mktemp("staged")
    private, public = write_keypair(root / "keys")
    with fleetbus_broker() as port, agents(root, port, public.read_text().strip(), DEVICES) as running:
        observer = Observer(port)
        serve = Serve(root, port, private).start()
        try:
            observer.wait_online(DEVICES)
            wait(lambda: serve.devices_online() == len(DEVICES), what="serve sees the agents")
            yield Rig(root, port, private, public.read_text().strip(), running, serve, observer)
        finally:
            serve.stop()
            observer.close()


@pytest.fixture(scope="module")
def completed(rig: Rig) -> dict[str, object]:
    """One two-wave rollout (a one-device canary, then the rest) pushed with the CLI and followed."""
    write_model(rig.root / "m1.tflite", ModelSpec(seed=1, bias_add=0.5, pad_to=150_000))
    doc = document(
        rig.root / "canary.toml",
        "canary-1",
        "m1.tflite",
        "1.0.0",
        waves="[[waves]]\ncount = 1\n\n[[waves]]\npercent = 100\n",
    )
    return push(doc, rig.key, rig.port, rig.serve)


def test_push_of_a_document_completes_every_wave_on_real_agents(
    rig: Rig, completed: dict[str, object]
) -> None:
    """The CLI hands the document to serve, follows it to COMPLETED (exit 0), and every agent runs it."""
    assert completed["_exit"] == 0, completed
    assert completed["state"] == "COMPLETED"
    waves = completed["waves"]
    assert isinstance(waves, list)
    assert [(w["devices"], w["state"], w["states"]) for w in waves] == [
        (1, "PASSED", {"SUCCEEDED": 1}),
        (2, "PASSED", {"SUCCEEDED": 2}),
    ]
    sha = hashlib.sha256((rig.root / "m1.tflite").read_bytes()).hexdigest()
    for home in rig.agents.homes.values():
        active = home / "state" / "models" / "active.tflite"
        assert hashlib.sha256(active.read_bytes()).hexdigest() == sha


def test_each_device_gets_exactly_one_deploy_with_the_rollout_id(
    rig: Rig, completed: dict[str, object]
) -> None:
    """Serve publishes one retained deploy per device, carrying the rollout id as its execution id."""
    deploys = [d for d in rig.observer.deploys() if d[1] == "canary-1"]
    assert sorted(d for d, _, _ in deploys) == DEVICES
    assert all(not rollback for _, _, rollback in deploys)


def test_small_waves_take_the_first_chunks_pushed_with_their_deploys(
    rig: Rig, completed: dict[str, object]
) -> None:
    """Waves of up to 8 devices: each deploy says its file's first chunk follows on the device's repair
    topic, and each agent started its download waiting for it instead of fetching."""
    assert rig.observer.pushed("canary-1") == dict.fromkeys(DEVICES, 1)  # 150 kB: one 256 KiB chunk
    wait(
        lambda: all(rig.observer.health_counter(d, "pushes_awaited") >= 1 for d in DEVICES),
        what="health showing the push awaited on every agent",
    )


def test_status_and_list_show_the_rollout(rig: Rig, completed: dict[str, object]) -> None:
    """`rollout status --json` and `rollout list --json` read the retained status serve published."""
    status = cli("rollout", "status", "canary-1", "--broker", f"127.0.0.1:{rig.port}", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "COMPLETED"
    listed = cli("rollout", "list", "--broker", f"127.0.0.1:{rig.port}", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "canary-1" in {r["rollout_id"] for r in json.loads(listed.stdout)}
    table = cli("rollout", "status", "canary-1", "--broker", f"127.0.0.1:{rig.port}")
    assert "COMPLETED" in table.stdout
    assert "PASSED" in table.stdout


def test_metrics_after_a_real_rollout_parse_with_prometheus_client(
    rig: Rig, completed: dict[str, object]
) -> None:
    """`/metrics` after the rollout is valid Prometheus text with the devices and the completed rollout."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def read() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        with urllib.request.urlopen(f"{rig.serve.url}/metrics", timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    samples = read()
    online = next(v for k, v in samples.items() if "online" in k and "device" in k)
    assert sum(online.values()) == len(DEVICES)
    rollouts = next(v for k, v in samples.items() if "rollouts" in k and "state" in str(list(v)))
    assert rollouts[(("state", "COMPLETED"),)] >= 1
    ingested = next(v for k, v in samples.items() if "ingested" in k)
    assert sum(ingested.values()) > 0


def test_dashboard_shows_the_rollout_in_headless_chromium(rig: Rig, completed: dict[str, object]) -> None:
    """The dashboard served by serve, loaded in real Chromium, shows the rollout's waves and the devices."""
    from tests.publisher.chromium import load_dom, require_chromium

    require_chromium()
    dom = load_dom(f"{rig.serve.url}/", budget_ms=4000)
    card = dom.find_all("div", cls="rollout", data_rollout="canary-1")[0]
    assert card.attrs["data-state"] == "COMPLETED"
    waves = card.find_all("tr", cls="wave")
    assert [(w.attrs["data-state"], w.attrs["data-succeeded"], w.attrs["data-devices"]) for w in waves] == [
        ("PASSED", "1", "1"),
        ("PASSED", "2", "2"),
    ]
    rows = {r.attrs["data-device"]: r for r in dom.find_all("tr", cls="device")}
    assert set(DEVICES) <= set(rows)
    assert all(rows[d].attrs["data-version"] == "1.0.0" for d in DEVICES)


def test_document_naming_an_unknown_device_is_refused_before_anything_is_published(
    rig: Rig, completed: dict[str, object]
) -> None:
    """Serve refuses a document that targets a device it has never seen; no deploy goes out."""
    before = len(rig.observer.deploys())
    doc = rig.root / "bad.toml"
    doc.write_text(
        'id = "bad-1"\n[model]\npath = "m1.tflite"\nversion = "9.0.0"\n[targets]\ndevices = ["nobody-7"]\n'
    )
    out = push(doc, rig.key, rig.port, rig.serve, timeout=20)
    assert out["_exit"] != 0
    assert "unknown device 'nobody-7'" in str(out["_stderr"])
    assert "nothing was published" in str(out["_stderr"])
    missing = rig.root / "nofile.toml"
    missing.write_text('[model]\npath = "gone.tflite"\nversion = "1"\n[targets]\ngroups = ["lab"]\n')
    out = push(missing, rig.key, rig.port, rig.serve, timeout=20)
    assert out["_exit"] != 0
    assert "no model file" in str(out["_stderr"])
    assert len(rig.observer.deploys()) == before


SHADOW = "[shadow]\nmin_samples = 20\nmin_agreement = 0.99\n"


def test_shadow_run_that_agrees_then_switches_every_wave(rig: Rig, completed: dict[str, object]) -> None:
    """A candidate computing the same function runs beside the active model, agrees, then is deployed."""
    # Same weights as m1, a different file: the candidate agrees with what the devices run.
    write_model(rig.root / "same.tflite", ModelSpec(seed=1, bias_add=0.5, pad_to=60_000))
    doc = document(
        rig.root / "shadow.toml",
        "shadow-ok",
        "same.tflite",
        "2.5.0",
        body=SHADOW,
        waves="[[waves]]\ncount = 1\n\n[[waves]]\npercent = 100\n",
    )
    out = push(doc, rig.key, rig.port, rig.serve, timeout=90)
    assert out["_exit"] == 0, out
    waves = out["waves"]
    assert isinstance(waves, list)
    assert [w["shadow_agreement"] for w in waves] == [1.0, 1.0]
    assert [w["states"] for w in waves] == [{"SUCCEEDED": 1}, {"SUCCEEDED": 2}]
    sent = [(d, r) for d, r, _ in rig.observer.deploys() if r.startswith("shadow-ok")]
    for device in DEVICES:
        assert [r for d, r in sent if d == device] == ["shadow-ok:shadow", "shadow-ok"]
    shadow_reports = [t for t, _, _ in rig.observer.client.received if t.endswith("/shadow")]
    assert len(shadow_reports) >= 3


def test_shadow_run_that_disagrees_fails_the_wave_and_nothing_is_activated(
    rig: Rig, completed: dict[str, object]
) -> None:
    """A candidate whose outputs differ never leaves shadow mode: the wave fails, devices keep their model."""
    write_model(rig.root / "other.tflite", ModelSpec(seed=1, bias_add=0.9))
    doc = document(
        rig.root / "shadow-bad.toml",
        "shadow-bad",
        "other.tflite",
        "2.6.0",
        body=SHADOW,
        waves="[[waves]]\ncount = 1\n\n[[waves]]\npercent = 100\n",
    )
    out = push(doc, rig.key, rig.port, rig.serve, timeout=90)
    assert out["_exit"] == 1, out
    assert out["state"] == "ABORTED"
    assert "shadow agreement 0.000 < 0.99" in str(out["reason"])
    sent = [(d, r) for d, r, _ in rig.observer.deploys() if r.startswith("shadow-bad")]
    assert [r for _, r in sent] == ["shadow-bad:shadow"]
    same = hashlib.sha256((rig.root / "same.tflite").read_bytes()).hexdigest()
    for home in rig.agents.homes.values():
        assert hashlib.sha256((home / "state" / "models" / "active.tflite").read_bytes()).hexdigest() == same


def test_kpi_gate_stops_a_wave_whose_model_is_slower(rig: Rig, completed: dict[str, object]) -> None:
    """A canary running a model many times slower than the previous one fails the p95 gate: ABORTED."""
    # 32 extra 256-wide layers: the same outputs, roughly twice the per-inference time in the agent.
    write_model(rig.root / "slow.tflite", ModelSpec(seed=1, bias_add=0.5, slow=32, hidden=256))
    # The gate compares with the previous model's figures on the same device: let them accumulate.
    start = {d["device_id"]: d["inference_count"] for d in rig.serve.api("/api/devices")["devices"]}
    wait(
        lambda: all(
            d["inference_count"] >= start[d["device_id"]] + 150
            for d in rig.serve.api("/api/devices")["devices"]
        ),
        what="150 inferences of the current model on every device",
    )
    doc = document(
        rig.root / "slow.toml",
        "slow-3",
        "slow.tflite",
        "3.0.0",
        waves=(
            "[[waves]]\ncount = 1\n[waves.success]\nmax_p95_latency_ratio = 1.5\nmin_samples = 100\n\n"
            "[[waves]]\npercent = 100\n"
        ),
    )
    out = push(doc, rig.key, rig.port, rig.serve, timeout=90)
    assert out["_exit"] == 1, out
    assert out["state"] == "ABORTED"
    reason = str(out["reason"])
    assert "wave 0 failed: KPI gate: p95 latency" in reason
    waves = out["waves"]
    assert isinstance(waves, list)
    assert waves[0]["gate"] == "fail"
    assert waves[0]["kpis"]["p95_ratio"] > 1.5
    assert waves[0]["states"] == {"SUCCEEDED": 1}
    assert waves[1]["notified"] == 0
    # Only the canary was ever sent the slow model.
    assert len([d for d, r, _ in rig.observer.deploys() if r == "slow-3"]) == 1


def test_pause_resume_and_cancel_from_the_cli(rig: Rig, completed: dict[str, object]) -> None:
    """`rollout pause|resume|cancel` over MQTT move a running rollout; a refused one says why."""
    write_model(rig.root / "m2.tflite", ModelSpec(seed=2, bias_add=0.25))
    doc = document(
        rig.root / "soak.toml",
        "soak-1",
        "m2.tflite",
        "4.0.0",
        waves="[[waves]]\ncount = 1\nmin_soak_s = 3600\n\n[[waves]]\npercent = 100\n",
    )
    handed = cli(
        "rollout",
        "push",
        str(doc),
        "--key",
        str(rig.key),
        "--server",
        rig.serve.url,
        "--broker",
        f"127.0.0.1:{rig.port}",
        "--no-follow",
        "--json",
    )
    assert handed.returncode == 0, handed.stderr
    broker = ("--broker", f"127.0.0.1:{rig.port}")
    rig.observer.wait_status("soak-1", lambda s: s.states.get("SUCCEEDED") == 1)
    paused = cli("rollout", "pause", "soak-1", *broker, "--reason", "lunch", "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["state"] == "PAUSED"
    again = cli("rollout", "pause", "soak-1", "--server", rig.serve.url, "--json")
    assert again.returncode != 0
    assert "PAUSED" in again.stderr
    resumed = cli("rollout", "resume", "soak-1", *broker, "--json")
    assert json.loads(resumed.stdout)["state"] == "RUNNING"
    canceled = cli("rollout", "cancel", "soak-1", *broker, "--json")
    assert json.loads(canceled.stdout)["state"] == "CANCELED"
    # The canary's wave never passed its soak, so the other two devices were never notified.
    assert {d for d, r, _ in rig.observer.deploys() if r.startswith("soak-1")} <= {
        d for d, r, _ in rig.observer.deploys() if r == "soak-1"
    }
    assert len([1 for _, r, _ in rig.observer.deploys() if r == "soak-1"]) == 1


def test_ctrl_c_detaches_the_cli_and_the_rollout_keeps_running(
    rig: Rig, completed: dict[str, object]
) -> None:
    """SIGINT to a following `rollout push` exits 130 after drawing the waves; serve keeps driving it."""
    import signal
    import subprocess
    import sys

    write_model(rig.root / "m5.tflite", ModelSpec(seed=2, bias_add=0.75))
    doc = document(
        rig.root / "detach.toml",
        "detach-5",
        "m5.tflite",
        "5.0.0",
        waves="[[waves]]\ncount = 1\nmin_soak_s = 3600\n\n[[waves]]\npercent = 100\n",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "schemas.cli",
            "rollout",
            "push",
            str(doc),
            "--key",
            str(rig.key),
            "--server",
            rig.serve.url,
            "--broker",
            f"127.0.0.1:{rig.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rig.observer.wait_status("detach-5", lambda s: s.states.get("SUCCEEDED") == 1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "detached: rollout detach-5 keeps running" in err
    assert "wave 0" in out
    assert "wave 1" in out
    status = cli("rollout", "status", "detach-5", "--broker", f"127.0.0.1:{rig.port}", "--json")
    assert json.loads(status.stdout)["state"] == "RUNNING"
    cli("rollout", "cancel", "detach-5", "--broker", f"127.0.0.1:{rig.port}")
