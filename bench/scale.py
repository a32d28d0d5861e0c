"""Scale: a full staged rollout of a 1 MB model to 1,000 simulated devices on the embedded broker.

    python bench/scale.py                       # 1,000 devices, 1 MB, 4 agent processes
    python bench/scale.py --devices 200 --size-mb 1 --workers 2

What runs, all on this machine:

* the embedded broker (``python -m broker.server``: fleetbus's hardened amqtt, anonymous) in its own
  process;
* ``fleetbus serve --http --key`` in its own process: the rollout driver, the chunk server, the
  aggregator and its SQLite store, exactly as deployed;
* the devices: the REAL agent code (``device.agent.Agent``: the rollout table, chunk book, staging
  store with fsync, verify, commit gate, activation, state reports over MQTT), many agents per worker
  process as threads.
  **Simulator inference stub**: each worker process loads a model file into ONE real LiteRT interpreter
  and hands every agent in that process a proxy to it (``SharedRuntime`` below), instead of one
  interpreter per agent. Gate checks (tensor contract, golden outputs, latency, arena) still run real
  inference through it. This is the only part lighter than on a board.

The document has three waves (1 %, 10 %, 100 %, no soak) and an abort criterion. The figure is the
wall time from submitting the document (upload included) to COMPLETED. The baseline, measured in the
same run on the same broker, is a bare fan-out: the same chunks published once each to the same
number of plain paho subscribers, until every subscriber has all of them; the ratio says what the
protocol, the agents and the controller cost over moving the bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PY = sys.executable


def chunk_size() -> int:
    """The rollout's chunk size (publisher/plan.py's default), so the baseline moves the same chunks."""
    from publisher.plan import DEFAULT_CHUNK_SIZE

    return DEFAULT_CHUNK_SIZE


# --- the simulator inference stub ------------------------------------------------------------------


class _SharedModel:
    """A proxy to one real interpreter shared by every agent of the process (simulator stub)."""

    def __init__(self, real: Any, lock: threading.Lock) -> None:
        self._real = real
        self._lock = lock

    @property
    def inputs(self) -> Any:
        return self._real.inputs

    @property
    def outputs(self) -> Any:
        return self._real.outputs

    def invoke(self, inputs: Any) -> Any:
        with self._lock:
            return self._real.invoke(inputs)

    def arena_bytes(self) -> int:
        return int(self._real.arena_bytes())

    def close(self) -> None:
        pass  # the shared interpreter lives as long as the process

    def __enter__(self) -> _SharedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedRuntime:
    """SIMULATOR STUB: one real LiteRT interpreter per distinct model file, shared by all agents."""

    def __init__(self) -> None:
        from device.runtime import default_runtime

        self._real = default_runtime()
        self._models: dict[str, tuple[Any, threading.Lock]] = {}
        self._lock = threading.Lock()
        self._ops: list[str] | None = None

    @property
    def name(self) -> str:
        return str(self._real.name)

    @property
    def version(self) -> str:
        return str(self._real.version)

    def supported_ops(self) -> list[str]:
        with self._lock:
            if self._ops is None:
                self._ops = list(self._real.supported_ops())
            return self._ops

    def load(self, path: str | os.PathLike[str], num_threads: int = 1) -> _SharedModel:
        # The file is hashed anyway: a different file is never served by a cached interpreter.
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        with self._lock:
            found = self._models.get(digest)
            if found is None:
                found = self._models[digest] = (self._real.load(path, num_threads), threading.Lock())
        return _SharedModel(*found)


# --- worker processes ------------------------------------------------------------------------------


def agent_worker(port: int, start: int, count: int, root: str, public_hex: str) -> None:
    """Run ``count`` real agents in this process until stdin closes."""
    from device.agent import Agent
    from device.config import settings_from_dict
    from schemas.logs import configure_logging

    # A thousand agents logging every step at info would measure the terminal, not the rollout.
    configure_logging("warning")
    # The agent loads its signature check on the first deploy (a board's process pays it once).
    # Here 250 agent threads would queue on that one load while the GIL is shared among 750 threads
    # (with `cryptography`'s import this stalled every agent of the process for 5-40 s): load it
    # before they start, the libcrypto binding or, without it, the fallback.
    from schemas.openssl_ed25519 import load

    if load() is None:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401

    runtime = SharedRuntime()
    agents = []
    for k in range(start, start + count):
        settings = settings_from_dict(
            {
                "device": {"id": f"sim-{k:04d}", "groups": ["fleet"], "state_dir": f"{root}/sim-{k:04d}"},
                "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 120},
                "trust": {"publisher_keys": [public_hex]},
                "inference": {"interval_s": 10.0, "batch_interval_s": 10.0},
                "health": {"interval_s": 30.0},
                "transfer": {"window": 16, "fetch_timeout_s": 3.0, "fsync_every": 16},
                "gate": {"latency_runs": 1},
            }
        )
        agents.append(Agent(settings, runtime=runtime))
    for agent in agents:
        agent.start()
        time.sleep(0.004)  # amqtt's CONNECT path walks every subscription: do not stampede it
    print("started", flush=True)
    sys.stdin.read()
    for agent in agents:
        agent.stop(timeout=2)


# --- the trace ------------------------------------------------------------------------------------


class Tracer:
    """Writes one JSON line per deploy, fetch and state report as the broker delivers them.

    With ``--trace FILE`` this shows where a rollout's wall time goes: when each device's deploy
    passed the broker, when the device asked for chunks, and when it reported each state.
    """

    def __init__(self, port: int, path: Path) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from schemas import topics

        self.out = open(path, "w")  # noqa: SIM115 - closed in close()
        self.t0 = time.monotonic()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"trace-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=120)
        self.client.subscribe(
            [
                (topics.device_desired_filter(), 0),
                (topics.device_stream_filter(topics.DeviceStream.FETCH), 0),
                (topics.device_stream_filter(topics.DeviceStream.STATE), 0),
            ]
        )
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from schemas import topics
        from schemas.codec import decode

        now = time.monotonic() - self.t0
        parsed = topics.parse(msg.topic)
        row: dict[str, Any] = {"t": round(now, 3), "device": parsed.device}
        try:
            body = decode(msg.payload) if msg.payload else None
        except Exception as exc:  # a trace must not stop on one odd payload
            row["error"] = str(exc)
            body = None
        if parsed.kind == "desired_dev":
            row["what"] = "deploy"
            row["retained"] = bool(msg.retain)
        elif msg.topic.endswith("/fetch"):
            row["what"] = "fetch"
            bitmap = getattr(body, "bitmap", b"") or b""
            row["have"] = sum(bin(b).count("1") for b in bitmap)
        else:
            row["what"] = "state"
            row["state"] = str(getattr(body, "status", ""))
            row["details"] = dict(getattr(body, "details", {}) or {})
        self.out.write(json.dumps(row) + "\n")

    def mark(self, what: str) -> None:
        self.out.write(json.dumps({"t": round(time.monotonic() - self.t0, 3), "what": what}) + "\n")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.out.close()


# --- the bench ------------------------------------------------------------------------------------


@contextlib.contextmanager
def process(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, text=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def split(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    out, at = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((at, n))
        at += n
    return out


def baseline(port: int, devices: int, workers: int, model: bytes) -> float:
    """Seconds for a bare fan-out of the model's chunks to ``devices`` plain subscribers."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    size = chunk_size()
    chunks = [model[i : i + size] for i in range(0, len(model), size)]
    topic = "bench/raw/+"
    procs = []
    with contextlib.ExitStack() as stack:
        for _, n in split(devices, workers):
            procs.append(
                stack.enter_context(
                    process(
                        [PY, __file__, "_raw-worker", str(port), str(n), topic, str(len(chunks))],
                        stdout=subprocess.PIPE,
                    )
                )
            )
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("raw subscribers did not start")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-publisher")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        t0 = time.monotonic()
        infos = [pub.publish(f"bench/raw/{i}", c, qos=1) for i, c in enumerate(chunks)]
        for info in infos:
            info.wait_for_publish(60)
        ends = []
        for p in procs:
            assert p.stdout is not None
            ends.append(float(p.stdout.readline()))
        pub.disconnect()
        pub.loop_stop()
    return max(ends) - t0


def rollout(
    port: int, devices: int, workers: int, model_path: Path, root: Path, *, trace: Path | None = None
) -> dict[str, Any]:
    """Start agents and serve, submit the staged document, and time it to COMPLETED."""
    from broker.testing import free_port, wait_port
    from publisher.document import load_document
    from publisher.http import fetch_json, submit_rollout, upload_blob
    from publisher.plan import digest_file
    from publisher.submission import sign_submission
    from schemas.signing import load_private_key, write_keypair

    private_path, public_path = write_keypair(root / "keys")
    http = free_port()
    url = f"http://127.0.0.1:{http}"
    doc_path = root / "scale.toml"
    doc_path.write_text(
        f'id = "scale-1"\nseed = "bench"\n[model]\npath = "{model_path}"\nversion = "2.0.0"\n'
        '[targets]\ngroups = ["fleet"]\n'
        "[[waves]]\npercent = 1\n[[waves]]\npercent = 10\n[[waves]]\npercent = 100\n"
        '[[abort]]\nfailure_type = "ALL"\nthreshold_pct = 10\nmin_executed = 20\n'
    )
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        serve_log = stack.enter_context(open(root / "serve.log", "w"))
        stack.enter_context(
            process(
                [
                    PY,
                    "-m",
                    "schemas.cli",
                    "serve",
                    "--broker",
                    f"127.0.0.1:{port}",
                    "--db",
                    str(root / "serve.db"),
                    "--http",
                    f"127.0.0.1:{http}",
                    "--key",
                    str(private_path),
                    "--aggregate-every",
                    "5",
                ],
                stdout=serve_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_port(http, timeout=30)
        t_agents = time.monotonic()
        workers_procs = []
        for start, n in split(devices, workers):
            workers_procs.append(
                stack.enter_context(
                    process(
                        [
                            PY,
                            __file__,
                            "_agent-worker",
                            str(port),
                            str(start),
                            str(n),
                            str(root / "agents"),
                            public_path.read_text().strip(),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,  # nobody reads it: a full pipe would stall the agents
                        stderr=subprocess.DEVNULL,
                    )
                )
            )
        deadline = time.monotonic() + 300
        online = 0
        while time.monotonic() < deadline:
            online = int(fetch_json(url, "/api/fleet")["online"])
            if online >= devices:
                break
            time.sleep(0.5)
        out["agents_online_s"] = time.monotonic() - t_agents
        out["online"] = online
        if online < devices:
            raise RuntimeError(f"only {online} of {devices} agents came online")
        time.sleep(2.0)  # let the retained births settle in serve's fleet
        tracer = stack.enter_context(contextlib.closing(Tracer(port, trace))) if trace else None
        doc = load_document(doc_path)
        private, kid = load_private_key(private_path)
        t0 = time.monotonic()
        if tracer is not None:
            tracer.mark("submit")
        digest = digest_file(model_path)
        upload_blob(url, str(model_path), digest.sha256)
        submit_rollout(url, sign_submission(doc, digest.sha256, digest.size, private=private, key_id=kid))
        last: dict[str, Any] = {}
        while time.monotonic() - t0 < 600:
            last = fetch_json(url, "/api/rollouts/scale-1")["rollout"]
            if last["state"] in ("COMPLETED", "ABORTED", "ROLLED_BACK", "CANCELED"):
                break
            time.sleep(0.2)
        out["rollout_s"] = time.monotonic() - t0
        out["state"] = last.get("state")
        out["succeeded"] = last.get("states", {}).get("SUCCEEDED", 0)
        out["waves"] = [(w["devices"], w["states"]) for w in last.get("waves", [])]
        counters = fetch_json(url, "/api/fleet")["counters"]
        out["chunk_bytes_sent"] = counters.get("rollout_chunk_bytes_sent")
        out["deploys_published"] = counters.get("rollout_deploys_published")
        out["blob_sent"] = counters.get("rollout_chunk_blob_sent")
        out["repair_sent"] = counters.get("rollout_chunk_repair_sent")
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "_agent-worker":
        agent_worker(int(args[1]), int(args[2]), int(args[3]), args[4], args[5])
        return
    if args and args[0] == "_raw-worker":
        from bench.fanout import raw_subscribers

        raw_subscribers(int(args[1]), int(args[2]), args[3], int(args[4]), stagger_s=0.004)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--size-mb", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=4, help="agent processes (agents run as threads)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--trace", type=Path, help="write every deploy, fetch and state report seen (JSON lines)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare fan-out (for traced runs)")
    opts = p.parse_args(args)

    from broker.testing import free_port, wait_port
    from publisher.modelgen import ModelSpec, write_model

    with tempfile.TemporaryDirectory(prefix="fleetbus-scale-") as tmp:
        root = Path(tmp)
        model_path = root / "model.tflite"
        write_model(model_path, ModelSpec(seed=11, bias_add=0.5, pad_to=int(opts.size_mb * 1_000_000)))
        model = model_path.read_bytes()
        port = free_port()
        config = root / "broker.toml"
        config.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {port}\nallow_anonymous = true\n')
        broker_log = open(root / "broker.log", "w")  # noqa: SIM115 - closed with the directory's life
        with process([PY, "-m", "broker.server", str(config)], stdout=broker_log, stderr=subprocess.STDOUT):
            wait_port(port, timeout=30)
            t_base = float("nan") if opts.no_baseline else baseline(port, opts.devices, opts.workers, model)
            figures = rollout(port, opts.devices, opts.workers, model_path, root, trace=opts.trace)
    figures.update(
        devices=opts.devices,
        model_bytes=len(model),
        baseline_fanout_s=round(t_base, 2),
        rollout_s=round(figures["rollout_s"], 2),
        ratio=round(figures["rollout_s"] / t_base, 2),
        target_s=60,
    )
    if opts.json:
        print(json.dumps(figures))
        return
    print(
        f"devices                   {opts.devices} (real agent code; simulator inference stub, see docstring)"
    )
    size = chunk_size()
    print(f"model                     {len(model)} bytes, {-(-len(model) // size)} chunks of {size} bytes")
    print(f"agents online after       {figures['agents_online_s']:.1f} s")
    print(f"baseline bare fan-out     {t_base:.2f} s (same chunks to {opts.devices} paho subscribers)")
    print(
        f"staged rollout            {figures['rollout_s']:.2f} s -> {figures['state']}, "
        f"{figures['succeeded']} SUCCEEDED (target <= 60 s)"
    )
    print(f"ratio rollout / fan-out   {figures['ratio']:.2f}")
    print(f"waves                     {figures['waves']}")
    print(
        f"chunks sent               {figures['blob_sent']} on blob, {figures['repair_sent']} as repairs, "
        f"{figures['chunk_bytes_sent']} bytes ({figures['deploys_published']} deploys)"
    )


if __name__ == "__main__":
    main()
