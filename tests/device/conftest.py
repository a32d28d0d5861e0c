"""Real parts for the device tests: a broker on a free port, signed deploys, a tiny chunk server, an
observer of everything devices publish, and agent processes started with ``python -m schemas.cli``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from publisher.modelgen import ModelSpec, build_model, model_ops, reference_output, tensor_signature
from schemas import topics
from schemas.codec import decode, encode
from schemas.messages import Chunk, Deploy, Fetch, GoldenCase, Manifest, Message, State, TensorSig
from schemas.signing import generate_keypair, key_id, sign
from tests.helpers import fleetbus_broker, free_port

REPO = Path(__file__).resolve().parents[2]


# --- keys and manifests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    private: Any
    kid: str
    public_hex: str


def make_keys() -> Keys:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv_hex, pub_hex = generate_keypair()
    return Keys(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(priv_hex)), key_id(pub_hex), pub_hex)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return make_keys()


def _sig(info: Any) -> TensorSig:
    return TensorSig(
        name=info.name, shape=list(info.shape), dtype=info.dtype, scale=info.scale, zero_point=info.zero_point
    )


def make_manifest(
    model: bytes,
    version: str,
    *,
    rollout_id: str | None = None,
    chunk_size: int = 4096,
    spec: ModelSpec | None = None,
    golden: bool = True,
    **extra: Any,
) -> Manifest:
    """A manifest for ``model`` the way the publisher builds one (hashes, contract, golden cases)."""
    chunks = [model[i : i + chunk_size] for i in range(0, len(model), chunk_size)]
    try:
        ins, outs = tensor_signature(model)
        ops = model_ops(model)
    except ValueError:
        ins, outs, ops = [], [], []
    cases: list[GoldenCase] = []
    if golden and spec is not None:
        x = np.linspace(-1, 1, spec.input_size, dtype=np.float32).reshape(1, -1)
        y = reference_output(spec, x)
        cases.append(GoldenCase(inputs=[x.ravel().tolist()], expected=[y.ravel().tolist()]))
    fields: dict[str, Any] = {
        "rollout_id": rollout_id or f"r-{version}",
        "version": version,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "chunk_size": chunk_size,
        "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks],
        "inputs": [_sig(i) for i in ins],
        "outputs": [_sig(o) for o in outs],
        "ops": ops,
        "golden": cases,
        "timeout_s": 120.0,
    }
    fields.update(extra)
    return Manifest(**fields)


# --- MQTT helpers ---------------------------------------------------------------------------------


def client(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_deploy(port: int, deploy: Deploy, *, device: str | None = None, group: str | None = None) -> None:
    """Publish a deploy retained on a device's or a group's desired topic, and wait for the PUBACK."""
    topic = topics.device_desired(device) if device else topics.group_desired(group or "")
    c = client(port, "operator")
    try:
        c.publish(topic, encode(deploy), qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def publish_raw(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    c = client(port, "raw")
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


class Observer:
    """Collects every message devices publish, decoded; tests wait on predicates over them."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Message]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{time.monotonic_ns()}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *a: c.subscribe(topics.device_stream_filter(), qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(Exception):
            m = decode(msg.payload)
            with self._lock:
                self.messages.append((msg.topic, m))

    def mark(self) -> int:
        """A position in the message log; `of(..., since=mark)` sees only what came after it."""
        with self._lock:
            return len(self.messages)

    def of(self, device: str, kind: str, since: int = 0) -> list[Any]:
        with self._lock:
            return [
                m
                for t, m in self.messages[since:]
                if m.kind == kind and getattr(m, "device_id", None) == device
            ]

    def last_state(self, device: str) -> State | None:
        states = self.of(device, "state")
        return max(states, key=lambda s: s.version_number) if states else None

    def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def wait_state(
        self, device: str, status: str, rollout: str, timeout: float = 30.0, since: int = 0
    ) -> State:
        def hit() -> State | None:
            for s in self.of(device, "state", since):
                if s.rollout_id == rollout and s.status.value == status:
                    return s  # type: ignore[no-any-return]
            return None

        try:
            return self.wait(hit, timeout, f"{device} {status} for {rollout}")  # type: ignore[no-any-return]
        except AssertionError:
            last = self.last_state(device)
            raise AssertionError(
                f"{device} never reported {status} for {rollout}; last state: "
                f"{last.status.value if last else None} {last.details if last else ''} "
                f"{last.reason if last else ''}"
            ) from None

    def results_for(self, device: str, version: str, since: int = 0) -> list[Any]:
        return [r for r in self.of(device, "results", since) if r.model_version == version and r.outputs]

    def counters(self, device: str, since: int = 0) -> dict[str, int]:
        """The counters of the device's latest health report after ``since``."""
        healths = self.of(device, "health", since)
        return dict(healths[-1].counters) if healths else {}

    def wait_health(self, device: str, since: int, timeout: float = 10.0) -> dict[str, int]:
        """Counters from a health report made after ``since`` (health comes every 0.5 s in tests)."""
        start = len(self.of(device, "health", since))
        self.wait(lambda: len(self.of(device, "health", since)) > start, timeout, f"{device} health")
        return self.counters(device, since)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class TinyChunkServer:
    """Answers fetches per docs/protocol.md: up to ``window`` missing chunks, each once per tick,
    on blob/ when two or more devices want it, else on repair/{device}/; chunks sent to a device in
    the last ``quiet_s`` are not sent again for it (they may still be on their way)."""

    def __init__(self, port: int, tick_s: float = 0.02, quiet_s: float = 1.0) -> None:
        self.files: dict[str, bytes] = {}
        self.chunk_size: dict[str, int] = {}
        self.sent: Counter[tuple[str, int]] = Counter()  # (device or "*", index)
        self.fetches: list[Fetch] = []
        self.tamper: Callable[[int, bytes], bytes] | None = None
        self.paused = False
        self.budget: int | None = None  # stop sending after this many chunks (None: no limit)
        self._pending: dict[str, Fetch] = {}
        self._recent: dict[tuple[str, str, int], float] = {}
        self._lock = threading.Lock()
        self._tick = tick_s
        self._quiet = quiet_s
        self._stop = threading.Event()
        self._port = port
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chunks-{time.monotonic_ns()}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *a: c.subscribe(
            topics.device_stream_filter(topics.DeviceStream.FETCH), qos=1
        )
        self._client.reconnect_delay_set(0.2, 1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def serve(self, model: bytes, manifest: Manifest) -> None:
        self.files[manifest.model_sha256] = model
        self.chunk_size[manifest.model_sha256] = manifest.chunk_size

    def sent_to(self, device: str) -> int:
        with self._lock:
            return sum(n for (d, _), n in self.sent.items() if d in (device, "*"))

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            fetch = decode(msg.payload)
        except Exception:
            return
        if isinstance(fetch, Fetch) and fetch.sha256 in self.files:
            with self._lock:
                self.fetches.append(fetch)
                self._pending[fetch.device_id] = fetch

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            if self.paused:
                continue
            with self._lock:
                pending, self._pending = self._pending, {}
            now = time.monotonic()
            demand: dict[tuple[str, int], list[str]] = defaultdict(list)
            for dev, f in pending.items():
                picked = 0
                for i in range(f.chunk_count):
                    if picked >= f.window:
                        break
                    if f.bitmap[i // 8] & (1 << (i % 8)):
                        continue
                    if now - self._recent.get((dev, f.sha256, i), -1e9) < self._quiet:
                        continue
                    demand[(f.sha256, i)].append(dev)
                    picked += 1
            for (sha, i), devs in sorted(demand.items()):
                if self.budget is not None:
                    if self.budget <= 0:
                        break
                    self.budget -= 1
                data = self._chunk(sha, i)
                if self.tamper is not None:
                    data = self.tamper(i, data)
                payload = encode(Chunk(sha256=sha, index=i, data=data))
                topic = topics.blob(sha, i) if len(devs) > 1 else topics.repair(devs[0], sha, i)
                self._client.publish(topic, payload, qos=1)
                with self._lock:
                    self.sent[("*" if len(devs) > 1 else devs[0], i)] += 1
                for d in devs:
                    self._recent[(d, sha, i)] = now

    def _chunk(self, sha: str, i: int) -> bytes:
        cs = self.chunk_size[sha]
        return self.files[sha][i * cs : (i + 1) * cs]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._client.disconnect()
        self._client.loop_stop()


# --- agent processes ------------------------------------------------------------------------------


def write_config(
    path: Path,
    device: str,
    port: int,
    keys: list[str],
    state_dir: Path,
    *,
    groups: tuple[str, ...] = (),
    source: str = "synthetic",
    extra: str = "",
) -> Path:
    groups_toml = ", ".join(f'"{g}"' for g in groups)
    keys_toml = ", ".join(f'"{k}"' for k in keys)
    path.write_text(
        f"""[device]
id = "{device}"
groups = [{groups_toml}]
state_dir = "{state_dir}"

[mqtt]
host = "127.0.0.1"
port = {port}
keepalive = 10

[trust]
publisher_keys = [{keys_toml}]

[inference]
source = "{source}"
interval_s = 0.02
batch_max = 10
batch_interval_s = 0.3

[health]
interval_s = 0.5

[transfer]
window = 8
fetch_timeout_s = 1.0
fetch_backoff_max_s = 4.0
fsync_every = 4

[watchdog]
window = 10
{extra}
"""
    )
    return path


@dataclass
class AgentProc:
    """One `fleetbus device run` process."""

    device: str
    config: Path
    state_dir: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    def start(self, crash_at: str | None = None) -> AgentProc:
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        env.pop("FLEETBUS_CRASH_AT", None)
        if crash_at:
            env["FLEETBUS_CRASH_AT"] = crash_at
        self.runs += 1
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        out.write(f"\n--- run {self.runs} crash_at={crash_at}\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "schemas.cli",
                "--log-level",
                "info",
                "device",
                "run",
                "--config",
                str(self.config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        out.close()
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class Rig:
    """A broker, an observer, a chunk server and a way to start agents, all on one free port."""

    port: int
    tmp: Path
    keys: Keys
    observer: Observer
    chunks: TinyChunkServer
    agents: list[AgentProc] = field(default_factory=list)

    def agent(
        self,
        device: str,
        *,
        groups: tuple[str, ...] = (),
        source: str = "synthetic",
        keys: list[str] | None = None,
        extra: str = "",
        env: dict[str, str] | None = None,
    ) -> AgentProc:
        state = self.tmp / device
        state.mkdir(exist_ok=True)
        cfg = write_config(
            self.tmp / f"{device}.toml",
            device,
            self.port,
            keys if keys is not None else [self.keys.public_hex],
            state,
            groups=groups,
            source=source,
            extra=extra,
        )
        a = AgentProc(device, cfg, state, self.tmp / f"{device}.log", env or {})
        self.agents.append(a)
        return a

    def deploy(
        self,
        model: bytes,
        manifest: Manifest,
        *,
        device: str | None = None,
        group: str | None = None,
        keys: Keys | None = None,
    ) -> Deploy:
        k = keys or self.keys
        d = sign(manifest, k.private, k.kid)
        self.chunks.serve(model, manifest)
        publish_deploy(self.port, d, device=device, group=group)
        return d


@pytest.fixture
def rig(tmp_path: Path, keys: Keys) -> Iterator[Rig]:
    with fleetbus_broker() as port:
        obs = Observer(port)
        srv = TinyChunkServer(port)
        r = Rig(port, tmp_path, keys, obs, srv)
        try:
            yield r
        finally:
            for a in r.agents:
                a.stop()
            srv.close()
            obs.close()


def seed_active(state_dir: Path, model: bytes, version: str) -> str:
    """Put ``model`` in an agent's active slot before it starts, as a previous rollout would have."""
    from device.store import AgentState, ModelRef, Store

    store = Store(state_dir)
    store.active.write_bytes(model)
    sha = hashlib.sha256(model).hexdigest()
    store.save_state(AgentState(active=ModelRef(version, sha)))
    return sha


def staged_bits(state_dir: Path, sha: str) -> int:
    """How many chunks the persisted bitmap of a download claims."""
    bitmap = state_dir / "models" / f"staging-{sha}.bitmap"
    if not bitmap.exists():
        return 0
    return sum(bin(b).count("1") for b in bitmap.read_bytes())


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = [
    "REPO",
    "AgentProc",
    "Keys",
    "ModelSpec",
    "Observer",
    "Rig",
    "TinyChunkServer",
    "build_model",
    "free_port",
    "make_keys",
    "make_manifest",
    "publish_deploy",
    "publish_raw",
    "seed_active",
    "sha_file",
    "staged_bits",
    "write_config",
]
