"""Reading a bounded HTTP body whole.

Why this exists: aiohttp's ``StreamReader.read(n)`` returns whatever has arrived, up to
``n`` bytes, not ``n`` bytes or the end. A body that arrives in several TCP segments
(a 100-token batch response, a node bundle with its certificate chain) was cut short
and then failed to parse, intermittently and only off loopback.
"""

from __future__ import annotations

import aiohttp


async def read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body if it is at most ``limit`` bytes; otherwise ``limit + 1`` bytes,
    which the caller treats as "too large" (nothing beyond that is read)."""
    buf = bytearray()
    while len(buf) <= limit:
        piece = await stream.read(limit + 1 - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)
