"""HTTP/1.1 response framing for the lean clients (relay -> gateway, gateway -> node).

Both hops read an upstream's answer with the same strict rules (RFC 9112): a head of
at most ``MAX_HEAD`` bytes whose lines match ``RESPONSE_HEAD``, then a body framed by
``Content-Length``, ``chunked`` (chunk lines of at most ``MAX_LINE``, trailers dropped)
or the end of the connection. ``ResponseFraming`` is that state machine, sans-IO: a
connection feeds it bytes (``_parse``) and supplies what to do with a head, a body piece
and the end; parties share it here because no party may import another.
"""

from __future__ import annotations

import re
from typing import Final

MAX_HEAD: Final = 16 * 1024  # largest response head, status line and headers
MAX_LINE: Final = 4096  # largest chunk-size or trailer line
HIGH_WATER: Final = 256 * 1024  # answer bytes buffered before the upstream is not read
IDLE_TIMEOUT: Final = 15.0  # a pooled connection idle this long is closed (aiohttp's)
HEX: Final = b"0123456789abcdefABCDEF"
TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
RESPONSE_HEAD: Final = re.compile(
    rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [^\r\n\0]*)?(?:\r\n" + TOKEN + rb":[^\r\n\0]*)*"
)

# Framing states: before a request, the head, a Content-Length body, chunked (size line,
# data, the CRLF after it, trailers), until the connection closes, done.
IDLE, HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA = 0, 1, 2, 3, 4
CHUNK_END, TRAILERS, UNTIL_CLOSE, DONE = 5, 6, 7, 8


def field_values(head: bytes, low: bytes, key: bytes) -> list[bytes]:
    """Values of every field ``key`` (b"\\r\\nname:") finds in ``low`` (``head`` lowered)."""
    found = []
    at = low.find(key)
    while at >= 0:
        start = at + len(key)
        end = low.find(b"\r\n", start)
        if end < 0:
            end = len(low)
        found.append(head[start:end].strip(b" \t"))
        at = low.find(key, end)
    return found


def chunk_size(line: bytes) -> int | None:
    """The size a chunk-size line (extensions ignored) announces; None if malformed.
    Shared with the relay's request-body parser (relay/server.py)."""
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 15 or size.strip(HEX):
        return None
    return int(size, 16)


class ResponseFraming:
    """The body-framing state machine. Subclasses set ``framing_error`` (raised for
    anything malformed) and implement ``_parse_head`` (which sets ``_state`` and
    ``_remaining``), ``_push`` (a body piece) and ``_finish`` (the answer is complete)."""

    framing_error: type[Exception] = ValueError
    _state: int = IDLE
    _remaining: int = 0

    def _parse_head(self, head: bytes) -> None:
        raise NotImplementedError

    def _push(self, data: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _parse(self, buf: bytes) -> bytes:
        """Consume what ``buf`` frames; return the bytes not yet usable (or beyond DONE)."""
        error = self.framing_error
        while buf:
            state = self._state
            if state == HEAD:
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if len(buf) >= MAX_HEAD + 4:
                        raise error("head too large")
                    return buf
                self._parse_head(buf[:end])
                buf = buf[end + 4 :]
            elif state in (LENGTH, CHUNK_DATA):
                take = buf[: self._remaining]
                buf = buf[len(take) :]
                self._remaining -= len(take)
                self._push(take)
                if self._remaining == 0:
                    if state == LENGTH:
                        self._finish()
                    else:
                        self._state = CHUNK_END
            elif state in (CHUNK_SIZE, TRAILERS):
                end = buf.find(b"\r\n", 0, MAX_LINE + 2)
                if end < 0:
                    if len(buf) >= MAX_LINE + 2:
                        raise error("chunk line too long")
                    return buf
                line, buf = buf[:end], buf[end + 2 :]
                if b"\n" in line or b"\r" in line or b"\0" in line:  # as in the head
                    raise error("stray CR, LF or NUL in a chunk or trailer line")
                if state == TRAILERS:
                    if not line:
                        self._finish()
                    continue  # trailer fields are dropped, like every other header
                size = chunk_size(line)
                if size is None:
                    raise error("bad chunk size")
                self._remaining = size
                self._state = CHUNK_DATA if size else TRAILERS
            elif state == CHUNK_END:
                if len(buf) < 2:
                    return buf
                if buf[:2] != b"\r\n":
                    raise error("chunk not followed by CRLF")
                buf = buf[2:]
                self._state = CHUNK_SIZE
            elif state == UNTIL_CLOSE:
                self._push(buf)
                return b""
            else:  # DONE: whatever follows is not ours
                return buf
        return buf
