"""Real parts for the staged-rollout tests: agent processes, a `fleetbus serve` process, a deploy counter.

Everything runs as it does in the field: `python -m schemas.cli device run` per device,
`python -m schemas.cli serve --http --key` for the service, `python -m schemas.cli rollout ...` for the
operator, all over one fleetbus broker on a free port.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.fleet import Fleet
from publisher.http import fetch_json
from schemas import topics
from schemas.codec import decode, decode_as
from schemas.errors import DecodeError
from schemas.messages import Deploy, Health, RolloutStatus
from tests.helpers import free_port, wait_port
from tests.publisher.live import RawClient, wait_until

PY = sys.executable


def agent_toml(
    device_id: str,
    port: int,
    public_key: str,
    groups: Sequence[str] = ("lab",),
    *,
    interval_s: float = 0.05,
    health_s: float = 0.5,
) -> str:
    group_list = ", ".join(f'"{g}"' for g in groups)
    return (
        f'[device]\nid = "{device_id}"\ngroups = [{group_list}]\nstate_dir = "state"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[trust]\npublisher_keys = ["{public_key}"]\n\n'
        f"[inference]\ninterval_s = {interval_s}\nbatch_interval_s = 0.5\n\n"
        f"[health]\ninterval_s = {health_s}\n\n"
        "[transfer]\nfetch_timeout_s = 1.0\n"
    )


@dataclass
class Agents:
    """Agent processes by device id, with their home directories."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    homes: dict[str, Path] = field(default_factory=dict)

    def start(self, root: Path, port: int, public_key: str, device_id: str, **toml: Any) -> None:
        home = root / device_id
        home.mkdir(parents=True, exist_ok=True)
        (home / "device.toml").write_text(agent_toml(device_id, port, public_key, **toml))
        with open(home / "agent.log", "ab") as log:
            self.procs[device_id] = subprocess.Popen(
                [PY, "-m", "schemas.cli", "device", "run", "--config", "device.toml"],
                cwd=home,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.homes[device_id] = home

    def kill(self, device_id: str) -> None:
        proc = self.procs.pop(device_id)
        proc.kill()
        proc.wait(10)

    def kill_all(self) -> None:
        for device_id in list(self.procs):
            self.kill(device_id)


@contextmanager
def agents(root: Path, port: int, public_key: str, ids: Sequence[str], **toml: Any) -> Iterator[Agents]:
    running = Agents()
    try:
        for device_id in ids:
            running.start(root, port, public_key, device_id, **toml)
        yield running
    finally:
        running.kill_all()


class Serve:
    """A `fleetbus serve --http --key` process that can be SIGKILLed and started again on its store."""

    def __init__(self, root: Path, port: int, key: Path, *extra: str) -> None:
        self.root = root
        self.port = port
        self.key = key
        self.extra = extra
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.starts = 0

    def start(self) -> Serve:
        self.starts += 1
        with open(self.root / f"serve-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "schemas.cli",
                    "serve",
                    "--broker",
                    f"127.0.0.1:{self.port}",
                    "--db",
                    str(self.root / "serve.db"),
                    "--http",
                    f"127.0.0.1:{self.http_port}",
                    "--key",
                    str(self.key),
                    "--flush-every",
                    "0.5",
                    "--aggregate-every",
                    "1",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.http_port, 30)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def api(self, path: str) -> Any:
        return fetch_json(self.url, path)

    def devices_online(self) -> int:
        return int(self.api("/api/fleet")["online"])

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("serve-*.log")))


class Observer:
    """A raw paho subscriber: every deploy published per device, every rollout status, device streams."""

    def __init__(self, port: int) -> None:
        self.client = RawClient(port)
        self.client.subscribe(
            topics.PREFIX + "/desired/dev/+", topics.rollout_filter("status"), topics.device_stream_filter()
        )

    def deploys(self) -> list[tuple[str, str, bool]]:
        """(device, execution id, rollback flag) of every non-empty deploy seen, in order."""
        from schemas.messages import Manifest

        out = []
        for topic, payload, _ in list(self.client.received):
            parsed = topics.parse(topic)
            if parsed.kind != "desired_dev" or not payload:
                continue
            deploy = decode_as(payload, Deploy)
            manifest = decode_as(deploy.manifest, Manifest)
            out.append((str(parsed.device), deploy.rollout_id, manifest.rollback))
        return out

    def pushed(self, execution: str) -> dict[str, int]:
        """Per device, the ``pushed`` count of its deploys of ``execution``."""
        out = {}
        for topic, payload, _ in list(self.client.received):
            parsed = topics.parse(topic)
            if parsed.kind == "desired_dev" and payload:
                deploy = decode_as(payload, Deploy)
                if deploy.rollout_id == execution:
                    out[str(parsed.device)] = deploy.pushed
        return out

    def health_counter(self, device: str, name: str) -> int:
        """A counter from the device's latest health message (0 before any)."""
        value = 0
        health = topics.device_stream(device, topics.DeviceStream.HEALTH)
        for topic, payload, _ in list(self.client.received):
            if topic == health:
                value = decode_as(payload, Health).counters.get(name, 0)
        return value

    def deploy_counts(self) -> Counter[str]:
        return Counter(device for device, _, _ in self.deploys())

    def status(self, rollout_id: str) -> RolloutStatus | None:
        latest = None
        for topic, payload, _ in list(self.client.received):
            if topic == topics.rollout_status(rollout_id) and payload:
                latest = decode_as(payload, RolloutStatus)
        return latest

    def wait_status(
        self, rollout_id: str, predicate: Callable[[RolloutStatus], bool], timeout: float = 60.0
    ) -> RolloutStatus:
        def ok() -> bool:
            status = self.status(rollout_id)
            return status is not None and predicate(status)

        try:
            wait_until(ok, timeout, what=f"rollout {rollout_id} status condition")
        except TimeoutError:
            seen = [t for t, _, _ in list(self.client.received) if t == topics.rollout_status(rollout_id)]
            raise TimeoutError(f"{len(seen)} statuses seen; the last: {self.status(rollout_id)}") from None
        found = self.status(rollout_id)
        assert found is not None
        return found

    def fleet(self) -> Fleet:
        fleet = Fleet()
        for topic, payload, _ in list(self.client.received):
            if topics.parse(topic).kind != "dev":
                continue
            try:
                fleet.apply(decode(payload), 0.0)
            except DecodeError:
                continue
        return fleet

    def wait_online(self, ids: Sequence[str], timeout: float = 60.0) -> None:
        wait_until(
            lambda: all((v := self.fleet().devices.get(d)) is not None and v.online for d in ids),
            timeout,
            what=f"{len(ids)} agents online",
        )

    def close(self) -> None:
        self.client.close()


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `fleetbus ARGS` as the operator does."""
    return subprocess.run(
        [PY, "-m", "schemas.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def push(
    doc: Path, key: Path, port: int, serve: Serve, *extra: str, timeout: float = 120.0
) -> dict[str, Any]:
    """`fleetbus rollout push DOC --json` to completion; the final status as JSON (exit code inside)."""
    proc = cli(
        "rollout",
        "push",
        str(doc),
        "--key",
        str(key),
        "--broker",
        f"127.0.0.1:{port}",
        "--server",
        serve.url,
        "--json",
        "--timeout",
        str(timeout),
        *extra,
        timeout=timeout + 30,
    )
    try:
        out: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        out = {}
    out["_exit"] = proc.returncode
    out["_stderr"] = proc.stderr
    return out


def document(
    path: Path, rollout_id: str, model: str, version: str, *, body: str = "", waves: str = ""
) -> Path:
    """Write a rollout document; ``waves`` defaults to one 100 % wave."""
    path.write_text(
        f'id = "{rollout_id}"\nseed = "test"\n{body}\n'
        f'[model]\npath = "{model}"\nversion = "{version}"\n\n'
        '[targets]\ngroups = ["lab"]\n\n' + (waves or "[[waves]]\npercent = 100\n")
    )
    return path


def wait(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    wait_until(predicate, timeout, what)


def sleep_briefly(seconds: float) -> None:
    time.sleep(seconds)
