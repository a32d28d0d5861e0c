"""The publisher's commands: keys, rollout push argument checks, tail, serve and demo as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from publisher.modelgen import ModelSpec, write_model
from schemas import topics
from schemas.cli import cli
from schemas.codec import encode
from schemas.messages import Birth, Health
from tests.helpers import fleetbus_broker
from tests.publisher.live import RawClient, wait_until

FLEETBUS = [sys.executable, "-m", "schemas.cli"]


def test_keys_generate_writes_a_private_and_public_key(tmp_path: Path) -> None:
    """`keys generate DIR` writes publisher.key (0600) and publisher.pub and refuses to overwrite."""
    runner = CliRunner()
    result = runner.invoke(cli, ["keys", "generate", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "publisher.key").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "k" / "publisher.pub").read_text().strip()) == 64
    again = runner.invoke(cli, ["keys", "generate", str(tmp_path / "k")])
    assert again.exit_code != 0
    assert "refusing to overwrite" in again.output


def test_push_without_targets_or_key_says_what_is_missing(tmp_path: Path) -> None:
    """`rollout push` with no target, or no key, fails with a usage message naming the option."""
    model = tmp_path / "m.tflite"
    write_model(model, ModelSpec())
    runner = CliRunner()
    no_target = runner.invoke(cli, ["rollout", "push", str(model), "--version", "1"])
    assert no_target.exit_code == 2
    assert "--to" in no_target.output
    no_key = runner.invoke(cli, ["rollout", "push", str(model), "--version", "1", "--to", "d1"])
    assert no_key.exit_code == 2
    assert "--key" in no_key.output
    bad_target = runner.invoke(cli, ["rollout", "push", str(model), "--version", "1", "--to", "a/#"])
    assert bad_target.exit_code == 2


def test_push_to_an_unreachable_broker_fails_cleanly(tmp_path: Path) -> None:
    """An unreachable broker is a one-line error and exit 1, not a traceback."""
    from tests.helpers import free_port

    runner = CliRunner()
    runner.invoke(cli, ["keys", "generate", str(tmp_path / "k")])
    model = tmp_path / "m.tflite"
    write_model(model, ModelSpec())
    result = runner.invoke(
        cli,
        [
            "rollout",
            "push",
            str(model),
            "--version",
            "1",
            "--to",
            "d1",
            "--key",
            str(tmp_path / "k" / "publisher.key"),
            "--broker",
            f"127.0.0.1:{free_port()}",
        ],
    )
    assert result.exit_code == 1
    assert "cannot reach broker" in result.output


def test_operator_config_supplies_broker_and_key(tmp_path: Path) -> None:
    """--config operator.toml gives the broker address and the signing key."""
    from publisher.opconfig import load_operator_config

    (tmp_path / "operator.toml").write_text(
        '[mqtt]\nhost = "10.0.0.1"\nport = 1884\nusername = "ops"\npassword = "pw"\n\n'
        '[publisher]\nkey = "keys/publisher.key"\n'
    )
    conf = load_operator_config(tmp_path / "operator.toml")
    assert (conf.address.host, conf.address.port, conf.address.username) == ("10.0.0.1", 1884, "ops")
    assert conf.key == tmp_path / "keys" / "publisher.key"


def test_tail_decodes_telemetry_as_json_lines() -> None:
    """`tail -n 2` prints two decoded messages as JSON lines and exits."""
    with fleetbus_broker() as port:
        proc = subprocess.Popen(
            [*FLEETBUS, "tail", "--broker", f"127.0.0.1:{port}", "-n", "2", "--timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            publisher = RawClient(port)
            lines: list[str] = []
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                publisher.publish(
                    topics.device_stream("t1", topics.DeviceStream.HEALTH),
                    encode(Health(device_id="t1", inference_count=3)),
                    qos=0,
                )
                time.sleep(0.2)
            out, _ = proc.communicate(timeout=10)
            publisher.close()
            lines = out.strip().splitlines()
        finally:
            proc.kill()
    assert proc.returncode == 0
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["kind"] == "health"
    assert first["device_id"] == "t1"


def test_serve_prints_the_table_on_sigusr1_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`fleetbus serve` folds a birth, prints the fleet table on SIGUSR1 and exits 0 on SIGTERM."""
    with fleetbus_broker() as port:
        out_path = tmp_path / "serve.out"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(
                [*FLEETBUS, "serve", "--broker", f"127.0.0.1:{port}", "--db", str(tmp_path / "f.db")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "160"},
            )
        try:
            dev = RawClient(port)
            wait_until(lambda: "serving" in out_path.read_text(), what="serve started")
            dev.publish(
                topics.device_stream("srv-1", topics.DeviceStream.BIRTH),
                encode(
                    Birth(
                        device_id="srv-1",
                        bdseq=1,
                        agent_version="0",
                        runtime="litert",
                        runtime_version="2",
                        model_version="4.2.0",
                    )
                ),
                retain=False,
            )
            dev.close()
            time.sleep(0.5)
            proc.send_signal(signal.SIGUSR1)
            wait_until(lambda: "4.2.0" in out_path.read_text(), what="table printed")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            proc.kill()
    assert "srv-1" in out_path.read_text()


def test_demo_runs_end_to_end_and_exits_zero(tmp_path: Path) -> None:
    """`fleetbus demo` with 3 agents rolls out two versions and exits 0 with the fleet table."""
    proc = subprocess.run(
        [
            *FLEETBUS,
            "demo",
            "--devices",
            "3",
            "--pad-to",
            "300000",
            "--timeout",
            "60",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout
    assert proc.stdout.count("1.1.0") >= 3
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False)
    assert ps.stdout.strip() == "", "demo left child processes behind"
