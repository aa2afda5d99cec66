"""
The one source of time for tickets and timeouts.

Everything that ages (ticket expiry, idle time) asks a clock for monotonic
seconds, so tests inject a FakeClock and move time instead of sleeping.
Dates that come from elsewhere (a signed ticket's life) are wall time,
from `wall`; a FakeClock started at time.time() stands in for it.
"""

import threading
import time


class Clock:
    """Monotonic seconds, as time.monotonic()."""

    def now(self):
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to. Thread safe."""

    def __init__(self, start=1000.0):
        self._now = start
        self._lock = threading.Lock()

    def now(self):
        with self._lock:
            return self._now

    def advance(self, seconds):
        with self._lock:
            self._now += seconds


class WallClock:
    """
    Epoch seconds, as time.time(): for times that other hosts set, such
    as the start and end of a ticket signed by the engine (signed.py).
    """

    def now(self):
        return time.time()


system = Clock()
wall = WallClock()
