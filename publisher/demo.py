"""``fleetbus demo``: a broker, the aggregator and five device agents as processes, two real rollouts.

Everything runs on free loopback ports in a temporary directory.  The broker is ``fleetbus broker``
with a registry: every device, the publisher, the aggregator and the demo's own observer log in with
credentials of their role (``--broker amqtt`` runs a stock anonymous amqtt instead).  The demo
generates a real .tflite model (v1.0.0), pushes it to the fleet, then pushes v1.1.0 (another bias),
showing progress.  It succeeds (exit 0) only when every device reports v1.1.0 as SUCCEEDED, the
aggregator's retained fleet aggregate shows every device online on v1.1.0, and inference results made
by v1.1.0 have arrived from every device.  Every child process is terminated (then killed) on the
way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from publisher.bus import BrokerAddress

DEMO_GROUP = "demo"
V1, V2 = "1.0.0", "1.1.0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{what} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise click.ClickException(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


OPERATOR, AGGREGATOR, WATCHER = "demo-operator", "demo-aggregator", "demo-watch"


def broker_command(workdir: Path, port: int, kind: str) -> list[str]:
    """The broker process: ``fleetbus broker`` with a registry, or a stock anonymous amqtt."""
    if kind == "amqtt":
        return [sys.executable, "-m", "publisher._stock_broker", str(port)]
    return [sys.executable, "-m", "schemas.cli", "broker", "--config", str(workdir / "broker.toml")]


def register_principals(workdir: Path, port: int, device_ids: list[str]) -> dict[str, str]:
    """Write broker.toml and a registry with every principal the demo uses; returns their passwords.

    Devices get the device role (their own subtree only), the publisher and the aggregator operator
    credentials of their own, and the demo's observer a reader's.
    """
    from broker.registry import Registry, Role

    registry = Registry.load(workdir / "registry.json")
    passwords = {d: registry.add(d, Role.DEVICE, [DEMO_GROUP]) for d in device_ids}
    passwords[OPERATOR] = registry.add(OPERATOR, Role.OPERATOR)
    passwords[AGGREGATOR] = registry.add(AGGREGATOR, Role.OPERATOR)
    passwords[WATCHER] = registry.add(WATCHER, Role.READER)
    (workdir / "broker.toml").write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nregistry = "registry.json"\nallow_anonymous = false\n'
    )
    return passwords


@dataclass
class Children:
    """Child processes with their log files; ``stop_all`` always runs in ``finally``."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs[name], self.logs[name] = proc, log
        return proc

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop_all(self, grace: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.01, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        for log in self.logs.values():
            log.close()


def _device_toml(device_id: str, port: int, public_key: str, password: str | None) -> str:
    login = f'username = "{device_id}"\npassword = "{password}"\n' if password else ""
    return f"""[device]
id = "{device_id}"
groups = ["{DEMO_GROUP}"]
state_dir = "state"

[mqtt]
host = "127.0.0.1"
port = {port}
{login}
[trust]
publisher_keys = ["{public_key}"]

[inference]
interval_s = 0.05
batch_interval_s = 0.5

[health]
interval_s = 1.0
"""


class _Watch:
    """The demo's own view of the bus: a fleet fold plus the aggregator's retained aggregates."""

    def __init__(self) -> None:
        from publisher.fleet import Fleet
        from schemas.messages import Aggregate

        self.fleet = Fleet()
        self.aggregates: dict[str, Aggregate] = {}
        self.results_by_version: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def on_device(self, topic: str, payload: bytes) -> None:
        from schemas.codec import decode
        from schemas.errors import DecodeError
        from schemas.messages import Results

        try:
            message = decode(payload)
        except DecodeError:
            return
        with self.lock:
            self.fleet.apply(message, time.time())
            if isinstance(message, Results) and message.model_version and message.outputs:
                key = (message.device_id, message.model_version)
                self.results_by_version[key] = self.results_by_version.get(key, 0) + len(message.outputs)

    def on_aggregate(self, topic: str, payload: bytes) -> None:
        from schemas.codec import decode_as
        from schemas.errors import DecodeError
        from schemas.messages import Aggregate

        with contextlib.suppress(DecodeError):
            agg = decode_as(payload, Aggregate)
            with self.lock:
                self.aggregates[topic] = agg

    def check(self, fn: Callable[[_Watch], bool]) -> bool:
        with self.lock:
            return fn(self)


def _wait(what: str, predicate: Callable[[], bool], timeout: float, children: Children) -> float:
    started = time.monotonic()
    while not predicate():
        dead = children.dead()
        if dead:
            raise click.ClickException(f"while waiting for {what}: {', '.join(dead)} exited early (see logs)")
        if time.monotonic() - started > timeout:
            raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


@click.command()
@click.option("--devices", "-n", default=5, show_default=True, help="Device agents to start.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds allowed for each stage.")
@click.option("--pad-to", default=1_000_000, show_default=True, help="Pad the models to this many bytes.")
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["fleetbus", "amqtt"]),
    default="fleetbus",
    show_default=True,
    help="fleetbus: `fleetbus broker` with a registry and per-role credentials; amqtt: stock, anonymous.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep everything (configs, logs, state, db) here instead of a temp dir.",
)
def demo(devices: int, timeout: float, pad_to: int, broker_kind: str, workdir: Path | None) -> None:
    """Run a broker, the aggregator and device agents as processes; roll out v1.0.0 then v1.1.0."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    temp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="fleetbus-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    run = _DemoRun(console, root, devices, timeout, pad_to, broker_kind)
    ok = False
    try:
        ok = run.execute()
    finally:
        run.children.stop_all()
        if temp and ok:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            console.print(f"[yellow]logs and state kept in {root}[/]")
    if not ok:
        sys.exit(1)


@dataclass
class _DemoRun:
    """One demo: the processes it started and the steps it takes."""

    console: Any
    root: Path
    n: int
    timeout: float
    pad_to: int
    broker_kind: str = "fleetbus"
    children: Children = field(default_factory=Children)
    started: float = field(default_factory=time.monotonic)
    port: int = 0
    device_ids: list[str] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)

    def address(self, principal: str) -> BrokerAddress:
        from publisher.bus import BrokerAddress

        password = self.passwords.get(principal)
        if password is None:
            return BrokerAddress(port=self.port)
        return BrokerAddress(port=self.port, username=principal, password=password)

    def execute(self) -> bool:
        from publisher.bus import Bus
        from schemas import topics

        private = self.start_processes()
        watch = _Watch()
        observer = Bus(self.address(WATCHER), client_id="fleetbus-demo-watch")
        observer.on(topics.device_stream_filter(), watch.on_device)
        observer.on(topics.aggregate_filter(), watch.on_aggregate)
        observer.connect()
        try:
            observer.subscribe([topics.device_stream_filter(), topics.aggregate_filter()])
            took = self.wait(
                f"{self.n} devices to come online",
                lambda w: sum(v.online for v in w.fleet.devices.values()) >= self.n,
                watch,
            )
            self.console.print(f"[green]{self.n} devices online[/] after {took:.1f}s")
            for version, bias in ((V1, 0.0), (V2, 0.5)):
                if not self.rollout(private, version, bias):
                    return False
            return self.verify(watch)
        finally:
            observer.close()

    def start_processes(self) -> Path:
        """Broker, aggregator and agents; returns the signing key's path."""
        from schemas.signing import write_keypair

        self.port = _free_port()
        root, port = self.root, self.port
        self.device_ids = [f"dev-{i:02d}" for i in range(1, self.n + 1)]
        self.console.rule(f"fleetbus demo in {root}")
        if self.broker_kind == "fleetbus":
            self.passwords = register_principals(root, port, self.device_ids)
        argv = broker_command(root, port, self.broker_kind)
        proc = self.children.start("broker", argv, root, root / "broker.log")
        _wait_port(port, 30, proc, "the broker")
        self.console.print(f"broker      {self.broker_kind} on 127.0.0.1:{port} (pid {proc.pid})")
        private, public = write_keypair(root / "keys")
        public_hex = public.read_text().strip()
        fleetbus = [sys.executable, "-m", "schemas.cli"]
        serve = [
            *fleetbus,
            "serve",
            "--broker",
            f"127.0.0.1:{port}",
            "--db",
            str(root / "fleet.db"),
            "--aggregate-every",
            "0.5",
            "--flush-every",
            "0.5",
        ]
        if AGGREGATOR in self.passwords:
            serve += ["--username", AGGREGATOR]
        env = {"FLEETBUS_PASSWORD": self.passwords[AGGREGATOR]} if AGGREGATOR in self.passwords else {}
        agg = self.children.start("aggregator", serve, root, root / "aggregator.log", env)
        self.console.print(f"aggregator  fleetbus serve (pid {agg.pid})")
        for device_id in self.device_ids:
            home = root / device_id
            home.mkdir(exist_ok=True)
            toml = _device_toml(device_id, port, public_hex, self.passwords.get(device_id))
            (home / "device.toml").write_text(toml)
            argv = [*fleetbus, "device", "run", "--config", "device.toml"]
            p = self.children.start(device_id, argv, home, home / "agent.log")
            self.console.print(f"device      {device_id} (pid {p.pid})")
        return private

    def rollout(self, private: Path, version: str, bias: float) -> bool:
        from publisher.cli import DeviceProgressBars
        from publisher.client import Publisher
        from publisher.modelgen import ModelSpec, write_model
        from publisher.plan import PlanOptions
        from publisher.progress import Targets

        model = self.root / f"model-{version}.tflite"
        spec = ModelSpec(input_size=8, output_size=4, seed=7, bias_add=bias, pad_to=self.pad_to)
        size = write_model(model, spec)
        self.console.rule(f"rollout {version}: {model.name}, {size:,} bytes")
        view = DeviceProgressBars(version)
        with Publisher(self.address(OPERATOR), private) as pub, view.progress:
            result = pub.push(
                model,
                version,
                Targets(groups=(DEMO_GROUP,)),
                PlanOptions(),
                timeout=self.timeout,
                on_progress=view,
            )
        m, c = result.manifest, result.chunks
        self.console.print(
            f"{'[green]ok[/]' if result.ok else '[red]FAILED[/]'} {result.rollout_id}: "
            f"{len(result.outcomes)} devices in {result.elapsed_s:.1f}s; {m.size:,} bytes in "
            f"{m.chunk_count} chunks of {m.chunk_size // 1024} KiB; {c.get('pushed', 0)} pushed with the "
            f"deploy, {c.get('blob_sent', 0)} broadcast, {c.get('repair_sent', 0)} repaired"
        )
        if result.ok and len(result.outcomes) >= self.n:
            return True
        for device, outcome in sorted(result.outcomes.items()):
            self.console.print(f"  {device}: {outcome.as_dict()}")
        self.console.print(f"[red]rollout {version} did not succeed on all {self.n} devices[/]")
        return False

    def verify(self, watch: _Watch) -> bool:
        """Results from v2 everywhere, and the aggregator process agreeing; then the fleet table."""
        from publisher.fleet import render_table
        from schemas import topics

        took = self.wait(
            f"inference results from {V2} on every device",
            lambda w: all(w.results_by_version.get((d, V2), 0) > 0 for d in self.device_ids),
            watch,
        )
        self.console.print(f"[green]results from {V2} arrived from all {self.n} devices[/] ({took:.1f}s)")
        fleet_topic = topics.aggregate(topics.AggregateScope.FLEET)

        def aggregator_agrees(w: _Watch) -> bool:
            agg = w.aggregates.get(fleet_topic)
            return agg is not None and agg.online == self.n and agg.versions.get(V2) == self.n

        self.wait(f"the aggregator to report {self.n} devices online on {V2}", aggregator_agrees, watch)
        self.console.print(f"[green]aggregator (fleetbus serve) reports {self.n}/{self.n} online on {V2}[/]")
        with watch.lock:
            self.console.print(render_table(watch.fleet, time.time(), title="fleet"))
        self.console.rule(f"demo passed in {time.monotonic() - self.started:.1f}s")
        return True

    def wait(self, what: str, predicate: Callable[[_Watch], bool], watch: _Watch) -> float:
        return _wait(what, lambda: watch.check(predicate), self.timeout, self.children)
