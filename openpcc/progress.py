"""One rhythm for "still waiting, because ..." lines: the node waiting for its engine,
`openpcc up` for the node, the client commands for their profile."""

from __future__ import annotations

import time
from collections.abc import Callable

REPORT_EVERY = 10.0


class Every:
    """``due()`` is true at most once per ``period`` seconds; the first time at once, or
    one period from now with ``now=False``."""

    def __init__(
        self,
        period: float = REPORT_EVERY,
        *,
        now: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._period = period
        self._clock = clock
        self._next = clock() if now else clock() + period

    def due(self) -> bool:
        t = self._clock()
        if t < self._next:
            return False
        self._next = t + self._period
        return True
