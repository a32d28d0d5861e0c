"""When a downloading device asks for chunks: windows, pipelining, backpressure and retries.

Pure: the caller passes the clock and its backlog (messages received but not yet handled), and
the pacer answers "send a fetch now" or not.

- A fetch asks for ``window`` chunks.  When half of them have been stored the next fetch goes out,
  so the round trip hides behind the second half (pipelining).
- The next fetch is held while the device's inbox has more than half a window unread: a device
  that asks while it is behind is sent chunks it has not yet seen, and in a fleet every duplicate
  broadcast reaches every device (flow control).
- Silence for ``timeout_s`` after a fetch sends it again, then after 2x, 4x ... up to
  ``backoff_max_s``, each with up to 25 % jitter so a fleet does not retry in step.  A busy inbox
  is not silence.
- Once chunks are flowing, a pause of ``settle_s`` (shorter than ``timeout_s``) means the stream
  has ended short of half a window: a device that joined a broadcast mid-way, or lost a chunk, asks
  for the rest then instead of waiting out the full timeout.  An early ask costs one small fetch:
  the server skips chunks still on their way.
- Chunks pushed with a live deploy (docs/protocol.md) are the answer to a fetch the device never
  sent: ``expect`` waits for them exactly as ``sent`` waits for a fetch's answer, with half of the
  pushed chunks, not half a window, as the point to ask for more.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class FetchPacer:
    def __init__(
        self,
        window: int,
        timeout_s: float,
        backoff_max_s: float,
        jitter: Callable[[], float] = random.random,
        settle_s: float | None = None,
    ) -> None:
        self.window = window
        self.timeout_s = timeout_s
        self.settle_s = timeout_s if settle_s is None else min(settle_s, timeout_s)
        self.backoff_max_s = backoff_max_s
        self._jitter = jitter
        self.attempt = 0  # fetches sent since the last chunk arrived
        self.since_fetch = 0  # chunks stored since the last fetch
        self.asked = window  # chunks the last fetch (or push) brings
        self.due = 0.0  # when silence becomes a retry; 0 when idle

    def delay(self) -> float:
        """How long to wait for the answer to the fetch just sent."""
        # Not settle_s: before the first chunk lands, silence is normal in a big fleet (the broker
        # is still fanning the first window out), and an early fetch with nothing held looks like
        # a device that missed the whole broadcast, so it would be repaired everything.
        base = min(self.timeout_s * 2.0**self.attempt, self.backoff_max_s)
        return base * (1.0 + 0.25 * self._jitter())

    def start(self) -> None:
        """A new download (or a reconnect): the next fetch is a first attempt."""
        self.attempt = 0

    def sent(self, now: float) -> None:
        """A fetch went out."""
        self.since_fetch = 0
        self.asked = self.window
        self.due = now + self.delay()

    def expect(self, now: float, count: int) -> None:
        """``count`` chunks are on their way unasked (a push): wait for them as for a fetch's answer."""
        self.sent(now)
        self.asked = max(1, min(count, self.window))

    def stored(self, now: float, backlog: int) -> bool:
        """A new chunk was stored; True when the next fetch should go out now."""
        self.attempt = 0
        self.since_fetch += 1
        if self.since_fetch * 2 >= self.asked and backlog <= self.window // 2:
            return True
        self.due = now + self.settle_s * (1.0 + 0.25 * self._jitter())
        return False

    def tick(self, now: float, backlog: int) -> bool:
        """Called on the timer; True when silence has lasted long enough to ask again."""
        if not self.due or now < self.due:
            return False
        if backlog:
            self.due = now + self.timeout_s
            return False
        self.attempt += 1
        return True

    def stop(self) -> None:
        self.due = 0.0
