"""The raw baseline both delivery benches measure against: bare paho subscribers in one process.

Run by the benches as a worker process (``python bench/device.py _raw-worker ...``): it connects
``count`` paho clients, subscribes each to ``topic`` at QoS 1, prints ``ready`` once every SUBACK
is in, then prints the monotonic time at which every client had received ``want`` messages.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def raw_subscribers(port: int, count: int, topic: str, want: int, *, stagger_s: float = 0.0) -> None:
    """``count`` subscribers that only count; prints 'ready', then when the last one had ``want``."""
    done = threading.Event()
    lock = threading.Lock()
    complete = [0]
    subacks = threading.Semaphore(0)
    clients = []
    for k in range(count):
        got = [0]

        def on_message(c: Any, u: Any, msg: Any, got: list[int] = got) -> None:
            got[0] += 1
            if got[0] == want:
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
