"""Binary HTTP messages (RFC 9292), sans-IO.

Both the outer layer (client -> gateway) and the sealed inner layer (client ->
node) carry an HTTP request or response as ``message/bhttp``. This module is the
one place that turns those bytes into typed messages and back.

Design points:

* Exact to the RFC: known-length (framing 0/1) and indeterminate-length (2/3)
  forms, informational (1xx) responses, trailers, truncation of empty trailing
  sections, zero padding. The encoder reproduces the RFC 9292 examples byte for
  byte.
* Hostile input is cheap to reject: every declared length is checked against
  the bytes actually present and against :class:`Limits` *before* anything is
  sliced or accumulated, and the parser raises only :mod:`openpcc.errors`
  exceptions (DecodeError and its subclasses).
* Field names and values are ``bytes``: HTTP fields are octets, not text, and
  keeping them as bytes means decoding never fails on a charset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from openpcc.errors import (
    DecodeError,
    EncodeError,
    LimitExceededError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire.varint import decode_varint, encode_varint

__all__ = [
    "DEFAULT_LIMITS",
    "FRAMING_INDETERMINATE_REQUEST",
    "FRAMING_INDETERMINATE_RESPONSE",
    "FRAMING_KNOWN_REQUEST",
    "FRAMING_KNOWN_RESPONSE",
    "MEDIA_TYPE",
    "Field",
    "InformationalResponse",
    "Limits",
    "ParsedMessage",
    "Request",
    "Response",
    "decode_message",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "parse_message",
]

MEDIA_TYPE = "message/bhttp"

FRAMING_KNOWN_REQUEST = 0
FRAMING_KNOWN_RESPONSE = 1
FRAMING_INDETERMINATE_REQUEST = 2
FRAMING_INDETERMINATE_RESPONSE = 3

Field = tuple[bytes, bytes]
"""One field line: ``(name, value)``; names are lowercase on the wire."""


# --------------------------------------------------------------------------- messages


class InformationalResponse(NamedTuple):
    """An interim (1xx) response that precedes the final one: ``(status, headers)``."""

    status: int
    headers: list[Field]


@dataclass(slots=True)
class Request:
    """An HTTP request as BHTTP carries it: control data, fields, content.

    ``authority`` may be empty (the RFC's example carries ``Host`` as a header
    field instead); that is kept as is, never filled in from ``host``.
    """

    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    headers: list[Field] = field(default_factory=list)
    content: bytes = b""
    trailers: list[Field] = field(default_factory=list)


@dataclass(slots=True)
class Response:
    """An HTTP response: optional interim responses, a final status (200..599), fields, content.

    Reason phrases do not exist in BHTTP.
    """

    status: int
    headers: list[Field] = field(default_factory=list)
    content: bytes = b""
    trailers: list[Field] = field(default_factory=list)
    informational: list[InformationalResponse] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """A decoded message plus how it was framed, for callers that care (tests, padding audits)."""

    message: Request | Response
    framing_indicator: int
    padding_length: int
    truncated: bool
    """True if the input ended before the trailer section (empty sections omitted)."""

    @property
    def indeterminate(self) -> bool:
        return self.framing_indicator >= FRAMING_INDETERMINATE_REQUEST


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what a decoder accepts, so a hostile peer's cost to us stays small.

    RFC 9292 allows up to 2^62-1 bytes per section; nothing we carry (chat
    requests, sealed envelopes) comes near these defaults.
    """

    max_field_lines: int = 256
    """Field lines per section (each header, trailer and informational section)."""
    max_field_section_size: int = 64 * 1024
    """Encoded bytes per field section (names, values and their length prefixes)."""
    max_control_field_size: int = 8 * 1024
    """Bytes of each of method, scheme, authority, path."""
    max_content_size: int = 16 * 1024 * 1024
    """Content bytes (after joining chunks)."""
    max_content_chunks: int = 65536
    """Chunks in indeterminate-length content (1-byte chunks are the cheap DoS)."""
    max_informational: int = 8
    """Interim (1xx) responses before the final one."""


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- validation

# RFC 9110 §5.6.2 tchar, minus uppercase (RFC 9292 §3.6 -> RFC 9113 §8.2.1: names are
# lowercase on the wire).
_TCHAR_LOWER = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_TCHAR = _TCHAR_LOWER + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# RFC 9110 §5.5 field-value: VCHAR / obs-text, SP and HTAB inside; no other CTLs.
_VALUE_OK = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# RFC 3986 §3.1 scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME_RE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*\Z")
# :authority and :path: visible ASCII only (RFC 9113 §8.3.1 -> RFC 3986 characters).
_VISIBLE = bytes(range(0x21, 0x7F))
_WS = (b" ", b"\t")


def _field_name_error(name: bytes) -> str | None:
    if not name:
        return "empty field name"
    if name.translate(None, _TCHAR_LOWER):
        if not name.translate(None, _TCHAR):
            return f"uppercase field name {name[:64]!r}"
        return f"invalid field name {name[:64]!r}"
    return None


def _field_value_error(value: bytes) -> str | None:
    if value.translate(None, _VALUE_OK):
        return "control character in field value"
    if value[:1] in _WS or value[-1:] in _WS:
        return "leading or trailing whitespace in field value"
    return None


def _control_error(method: bytes, scheme: bytes, authority: bytes, path: bytes) -> str | None:
    if not method or method.translate(None, _TCHAR):
        return f"invalid method {method[:64]!r}"
    if scheme and _SCHEME_RE.match(scheme) is None:
        return f"invalid scheme {scheme[:64]!r}"
    if authority.translate(None, _VISIBLE):
        return "invalid byte in authority"
    if path.translate(None, _VISIBLE):
        return "invalid byte in path"
    return None


# --------------------------------------------------------------------------- encoding


def _as_bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise EncodeError(f"{what} must be bytes, not {type(value).__name__}")


def _encode_fields(fields: Iterable[Field], indeterminate: bool, out: list[bytes]) -> None:
    """Append one field section (known-length prefix or indeterminate terminator) to ``out``."""
    parts: list[bytes] = []
    if isinstance(fields, str | bytes) or not isinstance(fields, Iterable):
        raise EncodeError(f"a field section must be a list of (name, value), not {fields!r:.40}")
    for item in fields:
        try:
            raw_name, raw_value = item
        except (TypeError, ValueError):
            raise EncodeError(f"field must be a (name, value) pair, not {item!r}") from None
        name = _as_bytes(raw_name, "field name").lower()
        value = _as_bytes(raw_value, "field value")
        err = _field_name_error(name) or _field_value_error(value)
        if err:
            raise EncodeError(err)
        parts += (encode_varint(len(name)), name, encode_varint(len(value)), value)
    body = b"".join(parts)
    if indeterminate:
        out += (body, b"\x00")
    else:
        out += (encode_varint(len(body)), body)


def _encode_tail(
    headers: list[Field],
    content: bytes,
    trailers: list[Field],
    *,
    indeterminate: bool,
    padding: int,
    truncate: bool,
    chunk_size: int | None,
    out: list[bytes],
) -> bytes:
    """Header section, content, trailer section, padding (common to requests and responses)."""
    content = _as_bytes(content, "content")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise EncodeError(f"padding must be a non-negative int, not {padding!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise EncodeError(f"chunk_size must be a positive int, not {chunk_size!r}")
    try:
        headers = list(headers)
        trailers = list(trailers)
    except TypeError:
        raise EncodeError("headers and trailers must be lists of (name, value) pairs") from None
    # RFC 9292 §3.8: empty trailing sections may be omitted, innermost first.
    keep = 3
    if truncate and not trailers:
        keep = 2
        if not content:
            keep = 1
            if not headers:
                keep = 0
    if keep >= 1:
        _encode_fields(headers, indeterminate, out)
    if keep >= 2:
        if indeterminate:
            if content:
                step = chunk_size or len(content)
                for i in range(0, len(content), step):
                    chunk = content[i : i + step]
                    out += (encode_varint(len(chunk)), chunk)
            out.append(b"\x00")
        else:
            out += (encode_varint(len(content)), content)
    if keep >= 3:
        _encode_fields(trailers, indeterminate, out)
    if padding:
        out.append(bytes(padding))
    return b"".join(out)


def encode_request(
    req: Request,
    *,
    indeterminate: bool = False,
    padding: int = 0,
    truncate: bool = False,
    chunk_size: int | None = None,
) -> bytes:
    """Encode ``req`` as ``message/bhttp``.

    ``indeterminate`` selects framing 2 (chunked content, 0-terminated sections)
    instead of 0; ``padding`` appends that many zero bytes; ``truncate`` omits
    empty trailing sections; ``chunk_size`` splits indeterminate content
    (default: one chunk). Field names are lowercased; invalid names, values or
    control data raise EncodeError.
    """
    method = _as_bytes(req.method, "method")
    scheme = _as_bytes(req.scheme, "scheme")
    authority = _as_bytes(req.authority, "authority")
    path = _as_bytes(req.path, "path")
    err = _control_error(method, scheme, authority, path)
    if err:
        raise EncodeError(err)
    out = [
        b"\x02" if indeterminate else b"\x00",
        encode_varint(len(method)),
        method,
        encode_varint(len(scheme)),
        scheme,
        encode_varint(len(authority)),
        authority,
        encode_varint(len(path)),
        path,
    ]
    return _encode_tail(
        req.headers,
        req.content,
        req.trailers,
        indeterminate=indeterminate,
        padding=padding,
        truncate=truncate,
        chunk_size=chunk_size,
        out=out,
    )


def _check_status(status: object, lo: int, hi: int) -> int:
    if isinstance(status, bool) or not isinstance(status, int) or not lo <= status <= hi:
        raise EncodeError(f"status must be an int in {lo}..{hi}, not {status!r}")
    return status


def encode_response(
    resp: Response,
    *,
    indeterminate: bool = False,
    padding: int = 0,
    truncate: bool = False,
    chunk_size: int | None = None,
) -> bytes:
    """Encode ``resp`` as ``message/bhttp`` (framing 1, or 3 if ``indeterminate``).

    Options as for :func:`encode_request`. Informational responses are emitted
    first, each with its own header section (never truncated).
    """
    out = [b"\x03" if indeterminate else b"\x01"]
    for info in resp.informational:
        try:
            status, headers = info
        except (TypeError, ValueError):
            raise EncodeError(f"informational must be (status, headers), not {info!r}") from None
        out.append(encode_varint(_check_status(status, 100, 199)))
        _encode_fields(headers, indeterminate, out)
    out.append(encode_varint(_check_status(resp.status, 200, 599)))
    return _encode_tail(
        resp.headers,
        resp.content,
        resp.trailers,
        indeterminate=indeterminate,
        padding=padding,
        truncate=truncate,
        chunk_size=chunk_size,
        out=out,
    )


# --------------------------------------------------------------------------- decoding


class _Reader:
    """Cursor over the input; every read checks the bytes that are really there."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def varint(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise TruncatedError("bhttp: message ends where a length or value was expected")
        first = self.data[pos]
        if first < 0x40:
            self.pos = pos + 1
            return first
        if pos + (1 << (first >> 6)) > self.end:
            raise TruncatedError("bhttp: message ends inside a varint")
        value, self.pos = decode_varint(self.data, pos)
        return value

    def take(self, n: int) -> bytes:
        """Return the next ``n`` bytes; callers check ``n`` against a limit first."""
        pos = self.pos
        if n > self.end - pos:
            raise TruncatedError(f"bhttp: need {n} bytes, have {self.end - pos}")
        self.pos = pos + n
        return self.data[pos : pos + n]


def _read_field_line(r: _Reader, name_len: int, section_limit: int) -> Field:
    if name_len == 0:
        raise DecodeError("bhttp: empty field name")
    if name_len > section_limit:
        raise LimitExceededError("bhttp: field name exceeds the field section limit")
    name = r.take(name_len)
    value_len = r.varint()
    if value_len > section_limit:
        raise LimitExceededError("bhttp: field value exceeds the field section limit")
    value = r.take(value_len)
    err = _field_name_error(name) or _field_value_error(value)
    if err:
        raise DecodeError(f"bhttp: {err}")
    return name, value


def _read_known_fields(r: _Reader, limits: Limits) -> list[Field]:
    length = r.varint()
    if length > limits.max_field_section_size:
        raise LimitExceededError(
            f"bhttp: field section of {length} bytes exceeds {limits.max_field_section_size}"
        )
    if length > r.end - r.pos:
        raise TruncatedError(f"bhttp: field section of {length} bytes runs past the message")
    section = _Reader(r.data, r.pos, r.pos + length)
    r.pos += length
    fields: list[Field] = []
    try:
        while not section.at_end():
            if len(fields) >= limits.max_field_lines:
                raise LimitExceededError(
                    f"bhttp: more than {limits.max_field_lines} field lines in a section"
                )
            fields.append(
                _read_field_line(section, section.varint(), limits.max_field_section_size)
            )
    except TruncatedError as exc:
        # The section's own length said where it ends: overrunning it is malformed, not cut.
        raise DecodeError("bhttp: field line overruns its known-length section") from exc
    return fields


def _read_indeterminate_fields(r: _Reader, limits: Limits) -> list[Field]:
    start = r.pos
    cap = limits.max_field_section_size
    fields: list[Field] = []
    while True:
        name_len = r.varint()
        if name_len == 0:
            return fields
        if len(fields) >= limits.max_field_lines:
            raise LimitExceededError(
                f"bhttp: more than {limits.max_field_lines} field lines in a section"
            )
        fields.append(_read_field_line(r, name_len, cap))
        if r.pos - start > cap:
            raise LimitExceededError(f"bhttp: field section exceeds {cap} bytes")


def _read_fields(r: _Reader, indeterminate: bool, limits: Limits) -> list[Field]:
    if indeterminate:
        return _read_indeterminate_fields(r, limits)
    return _read_known_fields(r, limits)


def _read_content(r: _Reader, indeterminate: bool, limits: Limits) -> bytes:
    cap = limits.max_content_size
    if not indeterminate:
        length = r.varint()
        if length > cap:
            raise LimitExceededError(f"bhttp: content of {length} bytes exceeds {cap}")
        return r.take(length)
    chunks: list[bytes] = []
    total = 0
    while True:
        length = r.varint()
        if length == 0:
            return b"".join(chunks)
        total += length
        if total > cap:
            raise LimitExceededError(f"bhttp: content exceeds {cap} bytes")
        if len(chunks) >= limits.max_content_chunks:
            raise LimitExceededError(f"bhttp: more than {limits.max_content_chunks} chunks")
        chunks.append(r.take(length))


def _read_control_field(r: _Reader, limits: Limits) -> bytes:
    length = r.varint()
    if length > limits.max_control_field_size:
        raise LimitExceededError(
            f"bhttp: control data field of {length} bytes exceeds {limits.max_control_field_size}"
        )
    return r.take(length)


def parse_message(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> ParsedMessage:
    """Decode one complete ``message/bhttp`` and report its framing, padding and truncation.

    Accepts truncation right after the control data or after any complete
    section (RFC 9292 §3.8); anything else cut short raises TruncatedError.
    Bytes after the trailer section must be zero (padding), else DecodeError.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"bhttp: expected bytes, not {type(data).__name__}")
        data = bytes(data)
    r = _Reader(data, 0, len(data))
    framing = r.varint()
    if framing > FRAMING_INDETERMINATE_RESPONSE:
        raise UnsupportedError(f"bhttp: unknown framing indicator {framing}")
    indeterminate = framing >= FRAMING_INDETERMINATE_REQUEST
    message: Request | Response
    if framing % 2 == 0:
        method = _read_control_field(r, limits)
        scheme = _read_control_field(r, limits)
        authority = _read_control_field(r, limits)
        path = _read_control_field(r, limits)
        err = _control_error(method, scheme, authority, path)
        if err:
            raise DecodeError(f"bhttp: {err}")
        message = Request(method, scheme, authority, path)
    else:
        informational: list[InformationalResponse] = []
        status = r.varint()
        while 100 <= status <= 199:
            if len(informational) >= limits.max_informational:
                raise LimitExceededError(
                    f"bhttp: more than {limits.max_informational} informational responses"
                )
            informational.append(
                InformationalResponse(status, _read_fields(r, indeterminate, limits))
            )
            status = r.varint()
        if not 200 <= status <= 599:
            raise DecodeError(f"bhttp: invalid status code {status}")
        message = Response(status, informational=informational)

    truncated = True
    if not r.at_end():
        message.headers = _read_fields(r, indeterminate, limits)
        if not r.at_end():
            message.content = _read_content(r, indeterminate, limits)
            if not r.at_end():
                message.trailers = _read_fields(r, indeterminate, limits)
                truncated = False

    padding = r.end - r.pos
    if padding and data.count(b"\x00", r.pos) != padding:
        raise DecodeError("bhttp: non-zero padding")
    return ParsedMessage(message, framing, padding, truncated)


def decode_message(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Request | Response:
    """Decode a request or a response, whichever the framing indicator says."""
    return parse_message(data, limits=limits).message


def decode_request(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Request:
    """Decode a request; a response (framing 1/3) raises DecodeError."""
    message = parse_message(data, limits=limits).message
    if not isinstance(message, Request):
        raise DecodeError("bhttp: expected a request, got a response")
    return message


def decode_response(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Response:
    """Decode a response; a request (framing 0/2) raises DecodeError."""
    message = parse_message(data, limits=limits).message
    if not isinstance(message, Response):
        raise DecodeError("bhttp: expected a response, got a request")
    return message
