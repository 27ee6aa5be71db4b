"""Hot-path counters: one dict addition per event, folded into ``Metrics`` when scraped.

``Metrics.inc`` sorts its labels and takes a lock on every call; the gateway made five
such calls per request (a few µs each). The counters every answered request touches go
through a ``Tally`` instead, under keys built once at import; ``flush`` hands the sums to
``Metrics`` right before ``/metrics`` renders, so a scrape sees the same numbers as before.
Rare outcomes keep calling ``Metrics.inc`` directly.
"""

from __future__ import annotations

from openpcc.service.http import Metrics

Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    """A counter and its labels, as ``Tally.add`` takes them (build it once, not per call)."""
    return name, tuple(sorted(labels.items()))


class Tally:
    """Counts for ``metrics`` not yet handed over; one event loop adds, so no lock."""

    __slots__ = ("counts", "metrics")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.counts: dict[Key, float] = {}

    def add(self, what: Key, value: float = 1) -> None:
        counts = self.counts
        counts[what] = counts.get(what, 0) + value

    def flush(self) -> None:
        counts, self.counts = self.counts, {}
        for (name, labels), value in counts.items():
            self.metrics.inc(name, value, **dict(labels))
