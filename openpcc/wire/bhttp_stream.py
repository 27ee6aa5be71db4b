"""Incremental indeterminate-length Binary HTTP responses (RFC 9292 §3.2, framing 3).

Chunked OHTTP carries a response as one indeterminate-length BHTTP message whose
content arrives over time; the gateway writes it piece by piece and the client must
surface each content chunk as soon as it is complete, so streaming stays incremental.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openpcc.errors import DecodeError, LimitExceededError, StateError, TruncatedError
from openpcc.wire.bhttp import (
    DEFAULT_LIMITS,
    FRAMING_INDETERMINATE_RESPONSE,
    Field,
    InformationalResponse,
    Limits,
    _check_status,
    _encode_fields,
    _read_indeterminate_fields,
    _Reader,
)
from openpcc.wire.varint import encode_varint


@dataclass(frozen=True)
class StreamHead:
    status: int
    headers: list[Field]


@dataclass(frozen=True)
class StreamEnd:
    trailers: list[Field]


StreamEvent = InformationalResponse | StreamHead | bytes | StreamEnd


class ResponseStreamEncoder:
    """Writer side: ``head`` once, ``data`` any number of times, ``end`` once."""

    def __init__(self) -> None:
        self._state = 0  # 0: head pending, 1: content, 2: done

    def head(
        self,
        status: int,
        headers: Sequence[Field],
        informational: Sequence[InformationalResponse] = (),
    ) -> bytes:
        if self._state != 0:
            raise StateError("response head already written")
        out: list[bytes] = [encode_varint(FRAMING_INDETERMINATE_RESPONSE)]
        for info in informational:
            out.append(encode_varint(_check_status(info.status, 100, 199)))
            _encode_fields(info.headers, True, out)
        out.append(encode_varint(_check_status(status, 200, 599)))
        _encode_fields(list(headers), True, out)
        self._state = 1
        return b"".join(out)

    def data(self, data: bytes) -> bytes:
        if self._state != 1:
            raise StateError("content must come after the head and before the end")
        if not data:
            return b""  # an empty chunk would end the content
        return encode_varint(len(data)) + bytes(data)

    def end(self, trailers: Sequence[Field] = ()) -> bytes:
        if self._state != 1:
            raise StateError("response already ended or head missing")
        out: list[bytes] = [b"\x00"]
        _encode_fields(list(trailers), True, out)
        self._state = 2
        return b"".join(out)


class ResponseStreamDecoder:
    """Reader side, sans-IO: ``receive_data`` returns the events completed so far."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._stage = "framing"  # framing, status, content, trailers, done
        self._content = 0
        self._informational = 0
        self._failed = False

    @property
    def complete(self) -> bool:
        return self._stage == "done"

    def receive_data(self, data: bytes) -> list[StreamEvent]:
        if self._failed:
            raise StateError("stream already failed")
        self._buf += data
        try:
            return self._parse()
        except Exception:
            self._failed = True
            raise

    def _parse(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            buf = bytes(self._buf)
            r = _Reader(buf, 0, len(buf))
            try:
                event = self._step(r)
            except TruncatedError:
                return events
            del self._buf[: r.pos]
            if event is not None:
                events.append(event)
            if self._stage == "done":
                if any(self._buf):
                    raise DecodeError("bhttp: non-zero bytes after the message (padding)")
                self._buf.clear()
                return events

    def _step(self, r: _Reader) -> StreamEvent | None:
        if self._stage == "framing":
            if r.varint() != FRAMING_INDETERMINATE_RESPONSE:
                raise DecodeError("bhttp stream: expected an indeterminate-length response")
            self._stage = "status"
            return None
        if self._stage == "status":
            status = r.varint()
            fields = _read_indeterminate_fields(r, self._limits)
            if 100 <= status <= 199:
                self._informational += 1
                if self._informational > self._limits.max_informational:
                    raise LimitExceededError("bhttp stream: too many informational responses")
                return InformationalResponse(status, fields)
            if not 200 <= status <= 599:
                raise DecodeError(f"bhttp stream: invalid status {status}")
            self._stage = "content"
            return StreamHead(status, fields)
        if self._stage == "content":
            length = r.varint()
            if length == 0:
                self._stage = "trailers"
                return None
            self._content += length
            if self._content > self._limits.max_content_size:
                raise LimitExceededError("bhttp stream: content exceeds the limit")
            return r.take(length)
        if self._stage == "trailers":
            trailers = _read_indeterminate_fields(r, self._limits)
            self._stage = "done"
            return StreamEnd(trailers)
        raise DecodeError("bhttp stream: data after the end of the message")

    def end_of_input(self) -> list[StreamEvent]:
        """The transport ended: only trailers may be missing (RFC 9292 §3.8 truncation)."""
        if self._stage == "trailers" and not self._buf:
            self._stage = "done"
            return [StreamEnd([])]
        if self._stage != "done":
            raise TruncatedError("bhttp stream: message ended before its content was complete")
        return []
