"""Raw paho clients for the publisher's tests over a real broker: they record what arrives."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class RawClient:
    """A paho client that records (topic, payload, retain) of everything it receives."""

    def __init__(self, port: int, client_id: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex[:12])
        self.received: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subacks: set[int] = set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, 10):
                raise TimeoutError(f"no SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 20.0
    ) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.received), timeout):
                raise TimeoutError(f"condition not met; received {len(self.received)} messages")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def raw_clients(port: int, n: int, prefix: str = "raw") -> Iterator[list[RawClient]]:
    clients = [RawClient(port, f"{prefix}-{i}-{uuid.uuid4().hex[:6]}") for i in range(n)]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def device_toml(device_id: str, port: int, public_key: str, groups: tuple[str, ...] = ("lab",)) -> str:
    group_list = ", ".join(f'"{g}"' for g in groups)
    return (
        f'[device]\nid = "{device_id}"\ngroups = [{group_list}]\nstate_dir = "state"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[trust]\npublisher_keys = ["{public_key}"]\n\n'
        "[inference]\ninterval_s = 0.05\nbatch_interval_s = 0.3\n\n[health]\ninterval_s = 0.5\n"
    )


@contextmanager
def agent_processes(
    root: Path, port: int, public_key: str, ids: list[str], groups: tuple[str, ...] = ("lab",)
) -> Iterator[dict[str, Path]]:
    """Real `fleetbus device run` processes, one home dir each; SIGKILLed on the way out."""
    import subprocess
    import sys

    homes: dict[str, Path] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for device_id in ids:
            home = root / device_id
            home.mkdir(parents=True, exist_ok=True)
            (home / "device.toml").write_text(device_toml(device_id, port, public_key, groups))
            log = open(home / "agent.log", "wb")  # noqa: SIM115 - closed with the process below
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "schemas.cli", "device", "run", "--config", "device.toml"],
                    cwd=home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
            homes[device_id] = home
        yield homes
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
