"""`rollout push DOC --dry-run`: the stage-2 planner run against the fleet the broker holds."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from publisher.modelgen import ModelSpec, write_model
from publisher.snapshot import BirthFold
from schemas import topics
from schemas.cli import cli
from schemas.codec import encode
from schemas.messages import Birth, Death
from tests.helpers import fleetbus_broker
from tests.publisher.live import RawClient


def birth(dev: str, bdseq: int = 1, ops: tuple[str, ...] = ("ADD", "FULLY_CONNECTED")) -> Birth:
    return Birth(
        device_id=dev,
        bdseq=bdseq,
        groups=["lab"],
        agent_version="0",
        runtime="litert",
        runtime_version="2.3",
        ops=list(ops),
        model_version="1.0.0",
    )


def test_birth_fold_applies_the_bdseq_rule() -> None:
    """The snapshot keeps the newest birth and calls a device offline only for a death of that session."""
    fold = BirthFold()
    fold.apply(birth("a", 2))
    fold.apply(Death(device_id="a", bdseq=1))
    fold.apply(birth("b", 3))
    fold.apply(Death(device_id="b", bdseq=3))
    fold.apply(birth("a", 1))
    assert fold.births["a"].bdseq == 2
    assert fold.online("a")
    assert not fold.online("b")
    assert fold.fleet()["b"].online is False


def test_dry_run_plans_waves_and_skips_incompatible_devices(tmp_path: Path) -> None:
    """A two-wave document is planned over retained births: incompatible and offline devices are shown."""
    write_model(tmp_path / "m.tflite", ModelSpec())
    (tmp_path / "rollout.toml").write_text(
        'seed = "s1"\n[model]\npath = "m.tflite"\nversion = "2.0.0"\n[targets]\ngroups = ["lab"]\n'
        "[[waves]]\npercent = 50\n[[waves]]\npercent = 100\n"
    )
    with fleetbus_broker() as port:
        dev = RawClient(port)
        for d in ("p1", "p2", "p3", "p4"):
            dev.publish(topics.device_stream(d, topics.DeviceStream.BIRTH), encode(birth(d)), retain=True)
        dev.publish(
            topics.device_stream("old", topics.DeviceStream.BIRTH),
            encode(birth("old", ops=("ADD",))),
            retain=True,
        )
        dev.publish(
            topics.device_stream("p4", topics.DeviceStream.DEATH),
            encode(Death(device_id="p4", bdseq=1)),
            retain=True,
        )
        dev.close()
        result = CliRunner().invoke(
            cli,
            [
                "rollout",
                "push",
                str(tmp_path / "rollout.toml"),
                "--dry-run",
                "--json",
                "--broker",
                f"127.0.0.1:{port}",
            ],
        )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output.strip().splitlines()[-1])
    assert plan["version"] == "2.0.0"
    assert plan["targets"] == 5
    assert plan["eligible"] == 4
    assert [s["device_id"] for s in plan["skipped"]] == ["old"]
    assert len(plan["waves"]) == 2
    assert json.dumps(plan).count('"p4"') >= 1


def test_document_without_dry_run_is_refused_before_anything_is_published(tmp_path: Path) -> None:
    """Publishing a document is not wired yet: the command says so and publishes nothing."""
    write_model(tmp_path / "m.tflite", ModelSpec())
    (tmp_path / "r.toml").write_text(
        '[model]\npath = "m.tflite"\nversion = "1"\n[targets]\ngroups = ["lab"]\n'
    )
    result = CliRunner().invoke(cli, ["rollout", "push", str(tmp_path / "r.toml"), "--broker", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--dry-run" in result.output


def test_bad_document_says_what_to_fix(tmp_path: Path) -> None:
    """A document whose waves do not add up is refused with the problem named."""
    (tmp_path / "r.toml").write_text(
        '[model]\npath = "missing.tflite"\nversion = "1"\n[targets]\ngroups = ["lab"]\n'
        "[[waves]]\npercent = 50\n"
    )
    result = CliRunner().invoke(
        cli, ["rollout", "push", str(tmp_path / "r.toml"), "--dry-run", "--broker", "127.0.0.1:1"]
    )
    assert result.exit_code == 1
    assert "percent = 100" in result.output
    assert "nothing was published" in result.output


def test_document_naming_a_missing_model_is_refused(tmp_path: Path) -> None:
    """A document whose model file does not exist is refused, naming the file."""
    (tmp_path / "r.toml").write_text(
        '[model]\npath = "missing.tflite"\nversion = "1"\n[targets]\ngroups = ["lab"]\n'
    )
    result = CliRunner().invoke(
        cli, ["rollout", "push", str(tmp_path / "r.toml"), "--dry-run", "--broker", "127.0.0.1:1"]
    )
    assert result.exit_code == 1
    assert "missing.tflite" in result.output
