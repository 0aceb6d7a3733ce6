"""Retry-After for a 429 (queue full): how long the waiting requests take to get through at the rate
requests have recently been finishing.

    seconds = ceil(waiting / (finished in the last WINDOW_S seconds / seconds observed of that window))

clamped to [floor_s, ceiling_s] (--retry-after-s, --retry-after-max-s). With nothing finished in the
window the rate is unknown and the answer is the ceiling: requests are running slower than the
window is long, or nothing has run yet.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0


class RetryAfterEstimator:
    def __init__(self, floor_s: int, ceiling_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.floor_s, self.ceiling_s = floor_s, max(floor_s, ceiling_s)
        self._clock = clock
        self._started = clock()
        self._finished: deque[float] = deque()  # when requests finished, oldest first

    def finished(self) -> None:
        """One engine request (one choice) finished, however it ended: its slot is free."""
        now = self._clock()
        self._finished.append(now)
        self._forget(now)

    def seconds(self, waiting: int) -> int:
        now = self._clock()
        self._forget(now)
        if not self._finished:
            return self.ceiling_s
        observed = min(WINDOW_S, now - self._started)
        rate = len(self._finished) / max(observed, 1.0)  # per second; a moment after start counts as a second
        return min(self.ceiling_s, max(self.floor_s, math.ceil(waiting / rate)))

    def _forget(self, now: float) -> None:
        while self._finished and self._finished[0] < now - WINDOW_S:
            self._finished.popleft()
