"""The publisher's commands: ``rollout push``, ``keys generate``, ``serve`` and ``tail``.

``schemas/cli.py`` loads these lazily as ``publisher.cli:rollout``, ``:serve``, ``:tail`` and ``:keys``.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from publisher.bus import BrokerAddress, Bus
from publisher.errors import PublisherError
from publisher.opconfig import load_operator_config
from publisher.plan import DEFAULT_CHUNK_SIZE, PlanOptions
from publisher.progress import RolloutProgress, Targets


@dataclass(frozen=True)
class Connection:
    """The broker options every bus command takes (``_connection_options``), combined on demand."""

    broker: str | None
    username: str | None
    password: str | None
    tls: bool
    cafile: str | None
    config: Path | None

    def resolve(self) -> tuple[BrokerAddress, Path | None]:
        """The broker address (--config, with command-line overrides) and --config's signing key."""
        base, key = BrokerAddress(), None
        if self.config is not None:
            loaded = load_operator_config(self.config)
            base, key = loaded.address, loaded.key
        address = BrokerAddress.parse(self.broker, tls=self.tls or base.tls) if self.broker else base
        return replace(
            address,
            username=self.username if self.username is not None else base.username,
            password=self.password if self.password is not None else base.password,
            ca_file=self.cafile or base.ca_file,
        ), key


def _connection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the broker options; the command receives them as one ``connection: Connection``."""

    @functools.wraps(func)
    def command(
        *args: Any,
        broker: str | None,
        username: str | None,
        password: str | None,
        tls: bool,
        cafile: str | None,
        config: Path | None,
        **kwargs: Any,
    ) -> Any:
        return func(*args, connection=Connection(broker, username, password, tls, cafile, config), **kwargs)

    wrapped: Callable[..., Any] = command
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
        wrapped = option(wrapped)
    return wrapped


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
@click.option(
    "--server",
    envvar="FLEETBUS_SERVER",
    metavar="URL",
    help="Rollout document: `fleetbus serve --http` that drives it (or [publisher] server in --config).",
)
@click.option("--token", envvar="FLEETBUS_TOKEN", help="Bearer token of that server (serve --token).")
@click.option("--no-follow", is_flag=True, help="Rollout document: hand it over and return at once.")
def push(
    *,
    model: Path,
    version: str,
    to: tuple[str, ...],
    group: tuple[str, ...],
    key: Path | None,
    connection: Connection,
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
    server: str | None,
    token: str | None,
    no_follow: bool,
) -> None:
    """Sign and publish MODEL as VERSION to devices and groups, serve its chunks, follow to the end.

    MODEL may instead be a rollout document (.toml, .yaml; docs/rollouts.md). With --dry-run the plan
    is computed against the fleet the broker knows (retained births) and printed. Without it the
    document is checked, signed and handed with its model to `fleetbus serve` (--server), which
    drives its waves; a progress bar per wave follows it, and Ctrl-C detaches (the rollout goes on).

    Exits 0 when every target reports SUCCEEDED (a document: the rollout COMPLETED), 1 when any
    failed or the timeout passed.
    """
    from publisher.client import Publisher

    if model.suffix.lower() in _DOCUMENT_SUFFIXES:
        with _errors():
            address, config_key = connection.resolve()
            code = _push_document(
                model,
                address,
                key or config_key,
                _server(server, token, connection.config) if not dry_run else None,
                as_json=as_json,
                dry_run=dry_run,
                follow=not no_follow,
                timeout=timeout,
            )
        sys.exit(code)
    if dry_run:
        raise click.UsageError("--dry-run plans a rollout document (.toml or .yaml), not a model file")
    if not version:
        raise click.UsageError("a model needs --version V")
    with _errors():
        address, config_key = connection.resolve()
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
            f"sent {chunks.get('pushed', 0)} with the deploy, {chunks.get('blob_sent', 0)} on blob, "
            f"{chunks.get('repair_sent', 0)} as repairs"
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


def _document_dry_run(path: Path, address: BrokerAddress, *, as_json: bool) -> None:
    """Plan a rollout document against the live fleet and print the plan."""
    from device.runtime import default_runtime
    from publisher.document import load_document
    from publisher.plan import build_manifest
    from publisher.snapshot import collect
    from publisher.waves import ModelNeeds, plan_rollout, render_plan, render_plan_json

    doc = load_document(path)

    manifest = build_manifest(
        doc.model.path, doc.model.version, options=PlanOptions(golden_count=1), runtime=default_runtime()
    )
    with Bus(address) as bus:
        fold = collect(bus)
    plan = plan_rollout(doc, fold.fleet(), ModelNeeds(frozenset(manifest.ops), manifest.arena_bytes))
    click.echo(render_plan_json(plan) if as_json else render_plan(plan))


def _succeeded(result: Any) -> list[str]:
    return [d for d, o in result.outcomes.items() if o.status is not None and o.status.value == "SUCCEEDED"]


def _push_document(
    path: Path,
    address: BrokerAddress,
    key: Path | None,
    server: tuple[str, str | None] | None,
    *,
    as_json: bool,
    dry_run: bool,
    follow: bool,
    timeout: float,
) -> int:
    if dry_run or server is None:
        _document_dry_run(path, address, as_json=as_json)
        return 0
    if key is None:
        raise click.UsageError("a signing key is needed: --key FILE, or [publisher] key in --config")
    rollout_id = _document_submit(path, key, server[0], server[1], as_json=as_json)
    if not follow:
        if as_json:
            click.echo(json.dumps({"rollout_id": rollout_id}))
        return 0
    return _follow(address, rollout_id, as_json=as_json, timeout=timeout)


def _server(server: str | None, token: str | None, config: Path | None) -> tuple[str, str | None]:
    """The URL of `fleetbus serve --http` and its token, from options or operator.toml."""
    if config is not None and (server is None or token is None):
        loaded = load_operator_config(config)
        server = server or loaded.server
        token = token if token is not None else loaded.token
    if not server:
        raise click.UsageError(
            "a rollout document is driven by `fleetbus serve --http HOST:PORT --key KEY`: give its URL "
            "with --server, FLEETBUS_SERVER or [publisher] server in --config "
            "(or see the plan with --dry-run)"
        )
    if "://" not in server:
        server = f"http://{server}"
    return server, token


def _document_submit(path: Path, key: Path, server: str, token: str | None, *, as_json: bool) -> str:
    """Check and sign a rollout document, upload its model and hand both to serve; the rollout id."""
    from publisher.document import load_document, validate_document
    from publisher.http import submit_rollout, upload_blob
    from publisher.plan import digest_file
    from publisher.submission import sign_submission
    from schemas.signing import SignatureError, load_private_key

    doc = validate_document(load_document(path))  # the model file exists; serve checks the fleet
    try:
        private, kid = load_private_key(key)
    except SignatureError as exc:
        raise click.ClickException(str(exc)) from None
    digest = digest_file(doc.model.path)
    signed = sign_submission(doc, digest.sha256, digest.size, private=private, key_id=kid)
    upload_blob(server, doc.model.path, digest.sha256, token=token)
    answer = submit_rollout(server, signed, token=token)
    rollout = answer.get("rollout") or {}
    rollout_id = str(rollout.get("rollout_id") or doc.rollout_id)
    if not as_json:
        click.echo(
            f"rollout {rollout_id} handed to {server}: {rollout.get('devices', '?')} devices in "
            f"{len(rollout.get('waves') or [])} waves, {rollout.get('skipped', 0)} skipped",
            err=True,
        )
    return rollout_id


def _follow(address: BrokerAddress, rollout_id: str, *, as_json: bool, timeout: float) -> int:
    """Follow a rollout's retained status until it is final; the exit code (0: COMPLETED)."""
    from publisher.fleetview import rollout_json
    from publisher.follow import FINAL_STATES, StatusWatch, WaveBars

    deadline = time.monotonic() + timeout
    status = None
    bars = None if as_json else WaveBars()
    # Ctrl-C detaches wherever it lands, also while the bus is still (re)connecting: the rollout
    # is already in serve's hands, so this is never an abort.
    try:
        with Bus(address) as bus:
            watch = StatusWatch(bus, rollout_id).start()
            seen = 0
            if bars is not None:
                bars.progress.start()
            while True:
                status = watch.get(rollout_id)
                if status is not None and bars is not None:
                    bars.update(status)
                if status is not None and status.state in FINAL_STATES:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                seen = watch.wait_change(seen, min(left, 0.5))
    except KeyboardInterrupt:
        if bars is not None:
            bars.progress.stop()
        click.echo(
            f"detached: rollout {rollout_id} keeps running in fleetbus serve; "
            f"`fleetbus rollout status {rollout_id}` shows it",
            err=True,
        )
        return 130
    finally:
        if bars is not None:
            bars.progress.stop()
    if as_json:
        click.echo(json.dumps(rollout_json(status) if status else {"rollout_id": rollout_id}, indent=2))
    if status is None or status.state not in FINAL_STATES:
        click.echo(
            f"rollout {rollout_id} still {status.state if status else 'unreported'} after {timeout:.0f}s; "
            "it keeps running",
            err=True,
        )
        return 1
    if not as_json:
        click.echo(f"rollout {rollout_id}: {status.state}" + (f" ({status.reason})" if status.reason else ""))
    return 0 if status.state == "COMPLETED" else 1


def _watch_statuses(address: BrokerAddress, rollout_id: str | None, wait: float) -> list[Any]:
    from publisher.follow import StatusWatch

    with Bus(address) as bus:
        watch = StatusWatch(bus, rollout_id).start()
        if rollout_id is not None:
            found = watch.get(rollout_id, wait)
            return [found] if found is not None else []
        # Retained statuses follow the SUBACK at once, but nothing marks their end: wait a moment.
        time.sleep(wait)
        return watch.snapshot()


@rollout.command("status")
@click.argument("rollout_id")
@_connection_options
@click.option("--wait", default=3.0, show_default=True, help="Seconds to wait for the retained status.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(
    *,
    rollout_id: str,
    connection: Connection,
    wait: float,
    as_json: bool,
) -> None:
    """Show one rollout's waves, device states and KPIs (its retained rollout_status)."""
    from rich.console import Console

    from publisher.fleetview import rollout_json
    from publisher.follow import status_table

    with _errors():
        address, _ = connection.resolve()
        found = _watch_statuses(address, rollout_id, wait)
    if not found:
        raise click.ClickException(f"no status for rollout {rollout_id!r} (is `fleetbus serve` driving it?)")
    if as_json:
        click.echo(json.dumps(rollout_json(found[0]), indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(status_table(found[0]))


@rollout.command("list")
@_connection_options
@click.option("--wait", default=1.0, show_default=True, help="Seconds to gather retained statuses.")
@click.option("--json", "as_json", is_flag=True, help="Print the rollouts as a JSON list.")
def list_command(
    *,
    connection: Connection,
    wait: float,
    as_json: bool,
) -> None:
    """List every rollout `fleetbus serve` drives or drove, with its state."""
    from publisher.fleetview import rollout_json

    with _errors():
        address, _ = connection.resolve()
        found = _watch_statuses(address, None, wait)
    if as_json:
        click.echo(json.dumps([rollout_json(s) for s in found], indent=2))
        return
    for s in found:
        ok = s.states.get("SUCCEEDED", 0)
        click.echo(
            f"{s.rollout_id:<40} {s.version:<12} {s.state:<12} wave {s.wave + 1}/{len(s.waves)} "
            f"{ok}/{s.devices} succeeded" + (f"  ({s.reason})" if s.reason else "")
        )


_EXPECTED = {"pause": ("PAUSED",), "resume": ("RUNNING", "COMPLETED"), "cancel": ("CANCELED",)}


def _control_command(action: str) -> Callable[..., None]:
    @_connection_options
    @click.argument("rollout_id")
    @click.option("--reason", help="Why (shown in the rollout's status).")
    @click.option("--by", "by", help="Who (default: $USER).", envvar="USER")
    @click.option("--server", envvar="FLEETBUS_SERVER", metavar="URL", help="Use serve's HTTP API (sync).")
    @click.option("--token", envvar="FLEETBUS_TOKEN", help="Bearer token of that server.")
    @click.option("--wait", default=10.0, show_default=True, help="Seconds to wait for the confirmation.")
    @click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
    def command(
        *,
        rollout_id: str,
        reason: str | None,
        by: str | None,
        server: str | None,
        token: str | None,
        connection: Connection,
        wait: float,
        as_json: bool,
    ) -> None:
        from publisher.fleetview import rollout_json

        with _errors():
            address, _ = connection.resolve()
            if server is not None:
                from publisher.http import post_control

                url = server if "://" in server else f"http://{server}"
                answer = post_control(url, rollout_id, action, by=by, reason=reason, token=token)  # type: ignore[arg-type]
                result = answer.get("rollout") or answer
                click.echo(
                    json.dumps(result, indent=2)
                    if as_json
                    else f"rollout {rollout_id}: {result.get('state')}"
                )
                return
            status = _control_over_mqtt(address, rollout_id, action, by=by, reason=reason, wait=wait)
        click.echo(
            json.dumps(rollout_json(status), indent=2) if as_json else f"rollout {rollout_id}: {status.state}"
        )

    command.__doc__ = (
        f"{action.capitalize()} a staged rollout (over MQTT, or serve's HTTP API with --server)."
    )
    return command


def _control_over_mqtt(
    address: BrokerAddress, rollout_id: str, action: str, *, by: str | None, reason: str | None, wait: float
) -> Any:
    from publisher.errors import RolloutError
    from publisher.follow import StatusWatch
    from schemas import topics
    from schemas.codec import encode
    from schemas.messages import RolloutControl

    command = RolloutControl(rollout_id=rollout_id, action=action, by=by, reason=reason)  # type: ignore[arg-type]
    with Bus(address) as bus:
        watch = StatusWatch(bus, rollout_id).start()
        before = watch.get(rollout_id, 2.0)
        if before is None:
            raise RolloutError(f"no status for rollout {rollout_id!r}: is `fleetbus serve` driving it?")
        bus.wait_published([bus.publish(topics.rollout_control(rollout_id), encode(command), qos=1)])
        deadline = time.monotonic() + wait
        seen = 0
        while time.monotonic() < deadline:
            current = watch.get(rollout_id)
            if current is not None and current.ts > before.ts and current.state in _EXPECTED[action]:
                return current
            seen = watch.wait_change(seen, 0.5)
    raise RolloutError(
        f"{action} sent, but rollout {rollout_id} is still {before.state} after {wait:g}s; the controller "
        "refuses it in this state, or `fleetbus serve` is not running"
    )


for _action in ("pause", "resume", "cancel"):
    rollout.command(_action)(_control_command(_action))


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
@click.option(
    "--share",
    help="Join shared subscription $share/SHARE/... (Mosquitto or the fleetbus broker).",
)
@click.option("--http", "http_bind", metavar="HOST:PORT", help="Serve the dashboard, JSON API and /metrics.")
@click.option("--client-id", help="MQTT client id (default: random).")
@click.option(
    "--key",
    "-k",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 key that signs deploys: drives staged rollouts (or [publisher] key in --config).",
)
@click.option(
    "--blobs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where model files are kept, by SHA-256 (default: DB.blobs next to --db).",
)
@click.option("--trust", multiple=True, help="Also accept documents signed by this public key (hex or .pub).")
@click.option(
    "--token", envvar="FLEETBUS_TOKEN", help="Require 'Authorization: Bearer TOKEN' on HTTP writes."
)
def serve(
    *,
    connection: Connection,
    db: Path,
    flush_every: float,
    aggregate_every: float,
    table_every: float,
    share: str | None,
    http_bind: str | None,
    client_id: str | None,
    key: Path | None,
    blobs: Path | None,
    trust: tuple[str, ...],
    token: str | None,
) -> None:
    """Aggregate fleet telemetry: store it, publish aggregates, print the fleet table on request.

    With a signing key it also drives staged rollouts: documents arrive on the HTTP API (--http,
    from `fleetbus rollout push DOC`), pause/resume/cancel over MQTT or HTTP (docs/rollouts.md).
    """
    import structlog

    from publisher.driver import RolloutDriver
    from publisher.service import Aggregator, ServeOptions
    from publisher.store import SqliteStore

    log = structlog.get_logger("publisher.serve")
    driver: RolloutDriver | None = None
    with _errors():
        address, config_key = connection.resolve()
        store = SqliteStore(db)
        bus = Bus(address, client_id=client_id or None)
        options = ServeOptions(
            flush_s=flush_every, aggregate_s=aggregate_every, table_s=table_every, share=share
        )
        aggregator = Aggregator(bus, store, options)
        restored = aggregator.restore()
        signing_key = key or config_key
        if signing_key is not None:
            driver = RolloutDriver(
                bus, store, signing_key, blobs or db.with_name(db.name + ".blobs"), trusted=trust
            )
            driver.attach(aggregator)
            driver.restore()
        bus.connect()
        if driver is not None:
            driver.start()
        aggregator.start()
        if http_bind:
            host, _, port = http_bind.rpartition(":")
            handle = aggregator.serve_http(host or "127.0.0.1", int(port), token=token)
            log.info("http listening", url=f"{handle.url}/", api=f"{handle.url}/api/fleet")
    signal.signal(signal.SIGUSR1, lambda *_: aggregator.request_table())
    signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
    log.info("serving", broker=str(address), db=str(db), restored=restored)
    try:
        aggregator.run()
    except KeyboardInterrupt:
        aggregator.stop()
    finally:
        if driver is not None:
            driver.stop()
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
    connection: Connection,
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
        address, _ = connection.resolve()
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
