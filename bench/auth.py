"""Authentication cost of a reconnect storm on the embedded broker: argon2 (cold) vs the cache (warm).

    python bench/auth.py [--devices 200] [--profile owasp|library]

N registered devices connect at once (paho clients in this process) to a fresh embedded broker: the
first round pays one argon2 check per device (what happens after a broker restart), the second round
is served by the registry's cache of successful checks (a network blip while the broker stays up).
``--profile library`` hashes with argon2-cffi's defaults (64 MiB, t=3, p=4) instead of the registry's
OWASP profile (19 MiB, t=2, p=1), to show what that choice saves. The ratio cold/warm is what counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import argon2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.registry import Registry, default_hasher
from broker.server import BrokerSettings, run_in_thread


def storm(port: int, passwords: dict[str, str]) -> float:
    """Seconds until every device has its CONNACK."""
    accepted = threading.Semaphore(0)
    failures: list[str] = []

    def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            failures.append(str(rc))
        accepted.release()

    clients = []
    start = time.perf_counter()
    for device, password in passwords.items():
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
        client.username_pw_set(device, password)
        client.on_connect = on_connect
        client.connect_async("127.0.0.1", port, keepalive=60)
        client.loop_start()
        clients.append(client)
    for _ in passwords:
        if not accepted.acquire(timeout=900):
            raise TimeoutError("devices did not all connect")
    elapsed = time.perf_counter() - start
    for client in clients:
        client.disconnect()
        client.loop_stop()
    if failures:
        raise RuntimeError(f"{len(failures)} connects refused: {failures[0]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--profile", choices=["owasp", "library"], default="owasp")
    args = parser.parse_args()
    hasher = default_hasher() if args.profile == "owasp" else argon2.PasswordHasher()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.json"
        passwords = Registry.load(path, hasher).add_many(
            (f"dev-{i:05d}", "device", ()) for i in range(args.devices)
        )
        with run_in_thread(BrokerSettings(host="127.0.0.1", port=0, registry=path)) as handle:
            cold = storm(handle.port, passwords)
            time.sleep(1)  # let the broker finish closing the first round's sessions
            warm = storm(handle.port, passwords)
    n = args.devices
    print(f"profile {args.profile}, {n} devices connecting at once")
    print(f"  cold (one argon2 check each): {cold:7.2f} s  {cold / n * 1000:7.2f} ms/connect")
    print(f"  warm (registry cache):        {warm:7.2f} s  {warm / n * 1000:7.2f} ms/connect")
    print(f"  cold / warm: {cold / warm:.1f}x; 5,000 devices cold ~ {cold / n * 5000 / 60:.1f} min")


if __name__ == "__main__":
    main()
