"""QUIC variable-length integers (RFC 9000 §16), used by BHTTP and chunked OHTTP."""

from __future__ import annotations

from openpcc.errors import DecodeError, EncodeError, TruncatedError

MAX_VARINT = (1 << 62) - 1


def encode_varint(value: int) -> bytes:
    """Encode ``value`` in the shortest QUIC form."""
    if value < 0 or value > MAX_VARINT:
        raise EncodeError(f"varint out of range: {value}")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode one varint at ``offset``; return ``(value, next_offset)``.

    Raises TruncatedError if the buffer ends inside the integer, so streaming
    callers can tell "need more bytes" from "malformed".
    """
    n = len(buf)
    if offset >= n:
        raise TruncatedError("varint: no bytes left")
    first = buf[offset]
    if first < 0x40:  # the common case on every chunk: lengths under 64
        return first, offset + 1
    length = 1 << (first >> 6)
    end = offset + length
    if end > n:
        raise TruncatedError(f"varint: need {length} bytes, have {n - offset}")
    if length == 2:
        return ((first & 0x3F) << 8) | buf[offset + 1], end
    return int.from_bytes(buf[offset:end], "big") & ((1 << (8 * length - 2)) - 1), end


def varint_size(first_byte: int) -> int:
    """Length in bytes of a varint whose first byte is ``first_byte``."""
    if not 0 <= first_byte <= 0xFF:
        raise DecodeError("varint: first byte out of range")
    return 1 << (first_byte >> 6)
