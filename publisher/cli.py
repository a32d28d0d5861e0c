"""The publisher's commands: ``rollout push``, ``keys generate``, ``serve`` and ``tail``.

``schemas/cli.py`` loads these lazily as ``publisher.cli:rollout``, ``:serve``, ``:tail`` and ``:keys``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from publisher.bus import BrokerAddress, Bus
from publisher.errors import PublisherError
from publisher.opconfig import load_operator_config
from publisher.plan import DEFAULT_CHUNK_SIZE, PlanOptions
from publisher.progress import RolloutProgress, Targets


def _address(
    *,
    broker: str | None,
    username: str | None,
    password: str | None,
    config: Path | None,
    tls: bool = False,
    cafile: str | None = None,
) -> tuple[BrokerAddress, Path | None]:
    """Combine --config with command-line overrides."""
    base, key = BrokerAddress(), None
    if config is not None:
        loaded = load_operator_config(config)
        base, key = loaded.address, loaded.key
    address = BrokerAddress.parse(broker, tls=tls or base.tls) if broker else base
    return replace(
        address,
        username=username if username is not None else base.username,
        password=password if password is not None else base.password,
        ca_file=cafile or base.ca_file,
    ), key


def _connection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--broker", "-b", metavar="HOST:PORT", help="Broker address (default 127.0.0.1:1883)."
            ),
            click.option("--username", "-u", help="MQTT username."),
            click.option("--password", "-p", help="MQTT password.", envvar="FLEETBUS_PASSWORD"),
            click.option("--tls", is_flag=True, help="Connect with TLS."),
            click.option("--cafile", type=click.Path(dir_okay=False), help="CA bundle for --tls."),
            click.option(
                "--config",
                "-c",
                type=click.Path(dir_okay=False, path_type=Path),
                help="operator.toml with [mqtt] and [publisher] key.",
            ),
        ]
    ):
        func = option(func)
    return func


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except PublisherError as exc:
        raise click.ClickException(str(exc)) from None


# --- keys -----------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Ed25519 signing keys for rollouts."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="publisher", show_default=True, help="File stem: NAME.key and NAME.pub.")
def keys_generate(directory: Path, name: str) -> None:
    """Write a new key pair into DIRECTORY (the private key with mode 0600); pin NAME.pub on devices."""
    from schemas.signing import SignatureError, key_id, write_keypair

    try:
        private, public = write_keypair(directory, name)
    except SignatureError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"private key {private}\npublic key  {public}\nkey id      {key_id(public.read_text().strip())}"
    )


# --- rollout --------------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Publish model rollouts and follow them."""


class DeviceProgressBars:
    """A rich progress bar per device, updated from the follow loop."""

    def __init__(self, title: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.title = title
        self.tasks: dict[str, Any] = {}

    def __call__(self, state: RolloutProgress) -> None:
        for device, outcome in sorted(state.outcomes.items()):
            status = outcome.status.value if outcome.status else "waiting"
            if outcome.step and not outcome.terminal:
                status = f"{status} {outcome.step}"
            if outcome.reason and outcome.terminal and outcome.status and outcome.status.value != "SUCCEEDED":
                status = f"{status}: {outcome.reason[:60]}"
            task = self.tasks.get(device)
            if task is None:
                task = self.tasks[device] = self.progress.add_task(device, total=100.0, status=status)
            self.progress.update(task, completed=outcome.percent, status=status)


_DOCUMENT_SUFFIXES = (".toml", ".yaml", ".yml")


@rollout.command("push")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "-V", "version", help="Model version to publish, e.g. 1.2.0 (MODEL form).")
@click.option(
    "--to", "to", multiple=True, help="Target device id, or group:NAME (repeatable, or comma-separated)."
)
@click.option("--group", "-g", multiple=True, help="Target group (repeatable).")
@click.option(
    "--key",
    "-k",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 private key (from `fleetbus keys generate`).",
)
@_connection_options
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to follow before giving up.")
@click.option("--chunk-size", default=DEFAULT_CHUNK_SIZE, show_default=True, help="Bytes per chunk.")
@click.option("--golden", default=3, show_default=True, help="Golden cases for the device's commit gate.")
@click.option("--latency-budget-ms", type=float, help="Commit gate: max median latency on the device.")
@click.option("--arena-budget", type=int, help="Commit gate: max tensor arena bytes.")
@click.option("--rollback", is_flag=True, help="Mark as an explicit (signed) downgrade.")
@click.option("--no-strict", is_flag=True, help="Publish even a model that fails planning checks.")
@click.option("--rollout-id", help="Rollout id (default: VERSION-SHA8-TIME).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON, no progress bars.")
@click.option("--dry-run", is_flag=True, help="Rollout document: print the plan (waves, skipped) and stop.")
def push(
    *,
    model: Path,
    version: str,
    to: tuple[str, ...],
    group: tuple[str, ...],
    key: Path | None,
    broker: str | None,
    username: str | None,
    password: str | None,
    tls: bool,
    cafile: str | None,
    config: Path | None,
    timeout: float,
    chunk_size: int,
    golden: int,
    latency_budget_ms: float | None,
    arena_budget: int | None,
    rollback: bool,
    no_strict: bool,
    rollout_id: str | None,
    as_json: bool,
    dry_run: bool,
) -> None:
    """Sign and publish MODEL as VERSION to devices and groups, serve its chunks, follow to the end.

    MODEL may instead be a rollout document (.toml, .yaml; docs/rollouts.md): with --dry-run the plan
    is computed against the fleet the broker knows (retained births) and printed.

    Exits 0 when every target reports SUCCEEDED, 1 when any failed or the timeout passed.
    """
    from publisher.client import Publisher

    if model.suffix.lower() in _DOCUMENT_SUFFIXES:
        with _errors():
            address, _ = _address(
                broker=broker, username=username, password=password, config=config, tls=tls, cafile=cafile
            )
            _document_dry_run(model, address, as_json=as_json, dry_run=dry_run)
        return
    if dry_run:
        raise click.UsageError("--dry-run plans a rollout document (.toml or .yaml), not a model file")
    if not version:
        raise click.UsageError("a model needs --version V")
    with _errors():
        address, config_key = _address(
            broker=broker, username=username, password=password, config=config, tls=tls, cafile=cafile
        )
        try:
            targets = Targets.parse(to, group)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--to/--group") from None
        if not targets:
            raise click.UsageError(
                "name at least one target with --to DEVICE, --to group:NAME or --group NAME"
            )
        signing_key = key or config_key
        if signing_key is None:
            raise click.UsageError("a signing key is needed: --key FILE, or [publisher] key in --config")
        options = PlanOptions(
            chunk_size=chunk_size,
            golden_count=golden,
            latency_budget_ms=latency_budget_ms,
            arena_budget_bytes=arena_budget,
            rollback=rollback,
            strict=not no_strict,
        )
        view = None if as_json else DeviceProgressBars(f"{model.name} {version}")
        try:
            with Publisher(address, signing_key) as pub:
                if view is None:
                    result = pub.push(
                        model, version, targets, options, timeout=timeout, rollout_id=rollout_id
                    )
                else:
                    with view.progress:
                        result = pub.push(
                            model,
                            version,
                            targets,
                            options,
                            timeout=timeout,
                            rollout_id=rollout_id,
                            on_progress=view,
                        )
        except KeyboardInterrupt:
            # The deploy stays retained on the desired topics; only this process's chunk serving stops.
            click.echo(
                "detached: the rollout stays published; devices still downloading need a chunk "
                "server (push again, or let `fleetbus serve` drive it)",
                err=True,
            )
            sys.exit(130)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        chunks = result.chunks
        click.echo(
            f"rollout {result.rollout_id}: {len(_succeeded(result))}/{len(result.outcomes)} succeeded in "
            f"{result.elapsed_s:.1f}s; {result.manifest.size} bytes in {result.manifest.chunk_count} chunks; "
            f"sent {chunks.get('blob_sent', 0)} on blob, {chunks.get('repair_sent', 0)} as repairs"
        )
        for device, outcome in sorted(result.outcomes.items()):
            if outcome.status is None or outcome.status.value != "SUCCEEDED":
                click.echo(
                    f"  {device}: {outcome.status.value if outcome.status else 'no report'}"
                    f"{': ' + outcome.reason if outcome.reason else ''}",
                    err=True,
                )
        if result.timed_out:
            click.echo(f"  timed out after {timeout:.0f}s", err=True)
    if not result.ok:
        sys.exit(1)


def _document_dry_run(path: Path, address: BrokerAddress, *, as_json: bool, dry_run: bool) -> None:
    """Plan a rollout document against the live fleet and print the plan."""
    from publisher.document import load_document
    from publisher.plan import build_manifest
    from publisher.snapshot import collect
    from publisher.waves import ModelNeeds, plan_rollout, render_plan, render_plan_json

    doc = load_document(path)
    if not dry_run:
        raise click.UsageError(
            "publishing a rollout document needs `fleetbus serve` to drive its waves, which is not wired "
            "yet; use --dry-run to see the plan, or push the model with --to/--group"
        )
    from device.runtime import default_runtime

    manifest = build_manifest(
        doc.model.path, doc.model.version, options=PlanOptions(golden_count=1), runtime=default_runtime()
    )
    with Bus(address) as bus:
        fold = collect(bus)
    plan = plan_rollout(doc, fold.fleet(), ModelNeeds(frozenset(manifest.ops), manifest.arena_bytes))
    click.echo(render_plan_json(plan) if as_json else render_plan(plan))


def _succeeded(result: Any) -> list[str]:
    return [d for d, o in result.outcomes.items() if o.status is not None and o.status.value == "SUCCEEDED"]


# --- serve ----------------------------------------------------------------------------------------


@click.command()
@_connection_options
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("fleetbus.db"),
    show_default=True,
    help="SQLite store (WAL mode).",
)
@click.option("--flush-every", default=1.0, show_default=True, help="Seconds between batched store writes.")
@click.option(
    "--aggregate-every", default=5.0, show_default=True, help="Seconds between retained aggregates."
)
@click.option(
    "--table-every", default=0.0, show_default=True, help="Print the fleet table every N s (0: on SIGUSR1)."
)
@click.option("--share", help="Join shared subscription $share/SHARE/... (Mosquitto; amqtt has none).")
@click.option("--http", "http_bind", metavar="HOST:PORT", help="Serve the dashboard, JSON API and /metrics.")
@click.option("--client-id", help="MQTT client id (default: random).")
def serve(
    *,
    broker: str | None,
    username: str | None,
    password: str | None,
    tls: bool,
    cafile: str | None,
    config: Path | None,
    db: Path,
    flush_every: float,
    aggregate_every: float,
    table_every: float,
    share: str | None,
    http_bind: str | None,
    client_id: str | None,
) -> None:
    """Aggregate fleet telemetry: store it, publish aggregates, print the fleet table on request."""
    import structlog

    from publisher.service import Aggregator, ServeOptions
    from publisher.store import SqliteStore

    log = structlog.get_logger("publisher.serve")
    with _errors():
        address, _ = _address(
            broker=broker, username=username, password=password, config=config, tls=tls, cafile=cafile
        )
        store = SqliteStore(db)
        bus = Bus(address, client_id=client_id or None)
        options = ServeOptions(
            flush_s=flush_every, aggregate_s=aggregate_every, table_s=table_every, share=share
        )
        aggregator = Aggregator(bus, store, options)
        restored = aggregator.restore()
        bus.connect()
        aggregator.start()
        if http_bind:
            host, _, port = http_bind.rpartition(":")
            handle = aggregator.serve_http(host or "127.0.0.1", int(port))
            log.info("http listening", url=f"{handle.url}/", api=f"{handle.url}/api/fleet")
    signal.signal(signal.SIGUSR1, lambda *_: aggregator.request_table())
    signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
    log.info("serving", broker=str(address), db=str(db), restored=restored)
    try:
        aggregator.run()
    except KeyboardInterrupt:
        aggregator.stop()
    finally:
        aggregator.print_table()
        bus.close()
        store.close()


# --- tail -----------------------------------------------------------------------------------------


@click.command()
@click.argument("topic_filter", required=False)
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the default).")
@click.option("--table", "as_table", is_flag=True, help="A compact line per message for people.")
@click.option("--count", "-n", type=int, default=0, help="Stop after N messages (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0.0, help="Stop after N seconds (0: no limit).")
def tail(
    *,
    topic_filter: str | None,
    broker: str | None,
    username: str | None,
    password: str | None,
    tls: bool,
    cafile: str | None,
    config: Path | None,
    as_json: bool,
    as_table: bool,
    count: int,
    timeout: float,
) -> None:
    """Decode msgpack telemetry live (default filter: every device stream and the aggregates)."""
    from schemas import topics
    from schemas.codec import decode
    from schemas.errors import DecodeError

    filters = [topic_filter] if topic_filter else [topics.device_stream_filter(), topics.aggregate_filter()]
    seen = 0
    done = threading.Event()
    lock = threading.Lock()

    def show(topic: str, payload: bytes) -> None:
        nonlocal seen
        try:
            message = decode(payload)
            data: dict[str, Any] = message.model_dump(mode="json")
        except DecodeError as exc:
            data = {"kind": "undecodable", "error": str(exc), "bytes": len(payload)}
        for k, v in list(data.items()):
            if k in ("data", "bitmap", "manifest", "signature") and isinstance(v, str) and len(v) > 64:
                data[k] = f"<{len(v)} chars>"
        with lock:
            if count and seen >= count:
                return
            seen += 1
            if as_table and not as_json:
                extra = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("kind", "v", "ts"))
                click.echo(f"{time.strftime('%H:%M:%S')} {data.get('kind', '?'):<10} {topic}  {extra[:160]}")
            else:
                click.echo(json.dumps({"topic": topic, **data}, default=str))
            if count and seen >= count:
                done.set()

    with _errors():
        address, _ = _address(
            broker=broker, username=username, password=password, config=config, tls=tls, cafile=cafile
        )
        bus = Bus(address)
        for f in filters:
            bus.on(f, show)
        bus.connect()
        bus.subscribe(filters, qos=0)
    try:
        done.wait(timeout or None)
    except KeyboardInterrupt:
        pass
    finally:
        bus.close()
