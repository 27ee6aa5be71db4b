"""Per-client token buckets, in memory only, bounded, and keyed without clear addresses.

The relay is the one party that sees client IPs, so the limiter is built not to
keep them: a bucket is keyed by a keyed hash (secret drawn at start, never
stored) of the address, IPv6 clients are grouped by /64 (one subscriber), and
the table is an LRU of at most ``max_clients`` entries. Nothing here is logged
or exported; only the aggregate number of rejections is counted elsewhere.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d


class RateLimiter:
    """Token bucket per client: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._secret = os.urandom(16)
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _key(self, address: str | None) -> bytes:
        text = address or ""
        if ":" in text:  # IPv6 (IPv4, or anything else, is hashed as written)
            try:
                packed = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
            except OSError:
                packed = b""
            if packed[:12] == _V4_MAPPED:
                text = socket.inet_ntop(socket.AF_INET, packed[12:])  # the IPv4 client's bucket
            elif packed:
                text = packed[:8].hex() + "::/64"  # one subscriber: the /64
        return hashlib.blake2b(text.encode(), key=self._secret, digest_size=16).digest()

    def check(self, address: str | None) -> float:
        """Take a token; return 0.0 if allowed, else seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        key = self._key(address)
        now = self._clock()
        entry = self._buckets.pop(key, None)
        tokens = float(self.burst)
        if entry is not None:
            tokens = min(tokens, entry[0] + (now - entry[1]) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # least recently seen: likely refilled anyway
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
