"""The fleet as the planner sees it, read from the retained births and deaths on the broker.

``collect(bus)`` subscribes to ``dev/+/birth`` and ``dev/+/death`` (both retained), waits a moment
for the broker to replay them, and folds them: the latest birth of each device, and whether a death
of that session followed (Sparkplug's bdseq rule, as in ``publisher/fleet.py``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from publisher.bus import Bus
from publisher.waves import DeviceInfo, device_info_from_birth
from schemas import topics
from schemas.codec import decode
from schemas.errors import DecodeError
from schemas.messages import Birth, Death

DEFAULT_SETTLE_S = 0.5


@dataclass
class BirthFold:
    """Latest birth and death bdseq per device (pure)."""

    births: dict[str, Birth] = field(default_factory=dict)
    deaths: dict[str, int] = field(default_factory=dict)
    undecodable: int = 0

    def apply(self, message: Birth | Death) -> None:
        if isinstance(message, Birth):
            known = self.births.get(message.device_id)
            if known is None or message.bdseq >= known.bdseq:
                self.births[message.device_id] = message
        else:
            self.deaths[message.device_id] = max(self.deaths.get(message.device_id, -1), message.bdseq)

    def online(self, device_id: str) -> bool:
        birth = self.births.get(device_id)
        return birth is not None and birth.bdseq > self.deaths.get(device_id, -1)

    def fleet(self) -> dict[str, DeviceInfo]:
        """Every device that has a birth, as the planner's ``DeviceInfo``."""
        return {d: device_info_from_birth(b, online=self.online(d)) for d, b in sorted(self.births.items())}


def collect(bus: Bus, settle_s: float = DEFAULT_SETTLE_S) -> BirthFold:
    """Read the retained births and deaths the broker holds; ``bus`` must be connected."""
    fold = BirthFold()
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        try:
            message = decode(payload)
        except DecodeError:
            with lock:
                fold.undecodable += 1
            return
        if isinstance(message, Birth | Death) and topics.parse(topic).device == message.device_id:
            with lock:
                fold.apply(message)

    filters = [
        topics.device_stream_filter(topics.DeviceStream.BIRTH),
        topics.device_stream_filter(topics.DeviceStream.DEATH),
    ]
    for f in filters:
        bus.on(f, on_message)
    bus.subscribe(filters)
    # Retained messages follow the SUBACK at once; there is no end marker, so wait a moment.
    time.sleep(settle_s)
    with lock:
        return BirthFold(dict(fold.births), dict(fold.deaths), fold.undecodable)
