"""The raw baseline both delivery benches measure against: bare paho subscribers in one process.

Run by the benches as a worker process (``python bench/device.py _raw-worker ...``): it connects
``count`` paho clients, subscribes each to ``topic`` at QoS 1, prints ``ready`` once every SUBACK
is in, then prints the monotonic time at which every client had received ``want`` messages.

With ``store_dir`` each subscriber also does the per-byte work no agent may skip (the floor): it
hashes every message with SHA-256, writes it at its offset in a file of its own, and fdatasyncs
that file once it has them all.  On one machine that work competes with the broker for the CPU and
with the other subscribers for the disk, as the agents' does.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def raw_subscribers(
    port: int, count: int, topic: str, want: int, *, stagger_s: float = 0.0, store_dir: str | None = None
) -> None:
    """``count`` subscribers that count (and with ``store_dir``, hash, write and sync what they get);
    prints 'ready', then when the last one had ``want``."""
    done = threading.Event()
    lock = threading.Lock()
    complete = [0]
    subacks = threading.Semaphore(0)
    clients = []
    for k in range(count):
        got = [0]
        fd = -1
        if store_dir:
            fd = os.open(os.path.join(store_dir, f"sub-{k}.part"), os.O_RDWR | os.O_CREAT, 0o644)

        def on_message(c: Any, u: Any, msg: Any, got: list[int] = got, fd: int = fd) -> None:
            if fd >= 0:
                data = msg.payload
                hashlib.sha256(data).digest()
                os.pwrite(fd, data, got[0] * len(data))
            got[0] += 1
            if got[0] == want:
                if fd >= 0:
                    os.fdatasync(fd)
                with lock:
                    complete[0] += 1
                    if complete[0] == count:
                        done.set()

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{os.getpid()}-{k}")
        c.on_message = on_message
        c.on_subscribe = lambda *a: subacks.release()
        c.connect("127.0.0.1", port, keepalive=120)
        c.loop_start()
        c.subscribe(topic, qos=1)
        clients.append(c)
        if stagger_s:
            time.sleep(stagger_s)  # amqtt's CONNECT path walks every subscription: do not stampede it
    for _ in range(count):
        subacks.acquire(timeout=60)
    print("ready", flush=True)
    done.wait(600)
    print(f"{time.monotonic():.6f}", flush=True)
    for c in clients:
        c.disconnect()
        c.loop_stop()
