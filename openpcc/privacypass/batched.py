"""Generic batched token issuance, as ``@cloudflare/privacypass-ts`` 0.8.1 implements it.

Based on draft-ietf-privacypass-batched-tokens ("generic batching"); the byte
layout here is the one privacypass-ts 0.8.1 puts on the wire (media types
``application/private-token-generic-batch-request`` / ``-response``)::

    GenericBatchTokenRequest  = varint(len) ‖ TokenRequest*            (len = total bytes)
    TokenRequest              = token_type(2) ‖ truncated_key_id(1) ‖ blinded_msg
                                (type 2: 256 B, type 1: 49 B)
    GenericBatchTokenResponse = varint(len) ‖ OptionalTokenResponse*
    OptionalTokenResponse     = 0x00                                  (absent)
                              | 0x01 ‖ token_type(2) ‖ TokenResponse  (type 2: 256 B, type 1: 145 B)

``varint`` is the QUIC variable-length integer. Type-1 requests/responses are
carried as opaque bytes (we cannot process VOPRF, but we can still split a mixed
batch and answer "absent" for them). Other token types cannot be delimited and
raise UnsupportedError, as in privacypass-ts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from openpcc.errors import (
    DecodeError,
    EncodeError,
    LimitExceededError,
    OpenPCCError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, TOKEN_TYPE_VOPRF
from openpcc.privacypass.issuance import TokenRequest, TokenResponse
from openpcc.wire.varint import decode_varint, encode_varint

__all__ = [
    "MAX_BATCH",
    "REQUEST_MEDIA_TYPE",
    "RESPONSE_MEDIA_TYPE",
    "BatchItemResult",
    "OpaqueTokenRequest",
    "OpaqueTokenResponse",
    "decode_batch_request",
    "decode_batch_response",
    "encode_batch_request",
    "encode_batch_response",
    "issue_batch",
]

REQUEST_MEDIA_TYPE: Final = "application/private-token-generic-batch-request"
RESPONSE_MEDIA_TYPE: Final = "application/private-token-generic-batch-response"
MAX_BATCH: Final = 1000  # requests per batch we are willing to parse

_REQ_LEN: Final = {TOKEN_TYPE_BLIND_RSA: 3 + 256, TOKEN_TYPE_VOPRF: 3 + 49}
_RESP_LEN: Final = {TOKEN_TYPE_BLIND_RSA: 256, TOKEN_TYPE_VOPRF: 49 + 48 + 48}


@dataclass(frozen=True)
class OpaqueTokenRequest:
    """A well-delimited request of a type we do not implement (type 1)."""

    token_type: int
    raw: bytes

    def encode(self) -> bytes:
        return self.raw


@dataclass(frozen=True)
class OpaqueTokenResponse:
    token_type: int
    raw: bytes

    def encode(self) -> bytes:
        return self.raw


AnyRequest = TokenRequest | OpaqueTokenRequest
AnyResponse = TokenResponse | OpaqueTokenResponse
BatchItemResult = AnyResponse | None


def _read_prefixed(data: bytes, what: str) -> bytes:
    data = bytes(data)
    length, off = decode_varint(data, 0)
    if off + length > len(data):
        raise TruncatedError(f"{what}: {len(data) - off} of {length} bytes")
    if off + length < len(data):
        raise DecodeError(f"{what}: {len(data) - off - length} trailing bytes")
    return data[off:]


def encode_batch_request(requests: Sequence[AnyRequest]) -> bytes:
    body = b"".join(r.encode() for r in requests)
    return encode_varint(len(body)) + body


def decode_batch_request(data: bytes, *, max_items: int = MAX_BATCH) -> list[AnyRequest]:
    body = _read_prefixed(data, "GenericBatchTokenRequest")
    out: list[AnyRequest] = []
    pos = 0
    while pos < len(body):
        if len(out) >= max_items:
            raise LimitExceededError(f"more than {max_items} token requests in batch")
        if pos + 2 > len(body):
            raise DecodeError("batched TokenRequest: dangling byte")
        token_type = int.from_bytes(body[pos : pos + 2], "big")
        n = _REQ_LEN.get(token_type)
        if n is None:
            raise UnsupportedError(f"batched TokenRequest of unknown type 0x{token_type:04x}")
        chunk = body[pos : pos + n]
        if len(chunk) < n:
            raise DecodeError("batched TokenRequest runs past the batch length")
        pos += n
        if token_type == TOKEN_TYPE_BLIND_RSA:
            out.append(TokenRequest.decode(chunk))
        else:
            out.append(OpaqueTokenRequest(token_type, chunk))
    return out


def encode_batch_response(responses: Sequence[tuple[int, AnyResponse] | None]) -> bytes:
    """Each item is ``None`` (absent) or ``(token_type, response)``."""
    parts = []
    for item in responses:
        if item is None:
            parts.append(b"\x00")
            continue
        token_type, resp = item
        raw = resp.encode()
        if _RESP_LEN.get(token_type) != len(raw):
            raise EncodeError(f"response of {len(raw)} bytes for token type 0x{token_type:04x}")
        parts.append(b"\x01" + token_type.to_bytes(2, "big") + raw)
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def decode_batch_response(data: bytes, *, max_items: int = MAX_BATCH) -> list[BatchItemResult]:
    body = _read_prefixed(data, "GenericBatchTokenResponse")
    out: list[BatchItemResult] = []
    pos = 0
    while pos < len(body):
        if len(out) >= max_items:
            raise LimitExceededError(f"more than {max_items} token responses in batch")
        present = body[pos]
        if present == 0:
            out.append(None)
            pos += 1
            continue
        if present != 1:
            raise DecodeError("OptionalTokenResponse must start with 0x00 or 0x01")
        if pos + 3 > len(body):
            raise DecodeError("OptionalTokenResponse: truncated token type")
        token_type = int.from_bytes(body[pos + 1 : pos + 3], "big")
        n = _RESP_LEN.get(token_type)
        if n is None:
            raise UnsupportedError(f"batched TokenResponse of unknown type 0x{token_type:04x}")
        chunk = body[pos + 3 : pos + 3 + n]
        if len(chunk) < n:
            raise DecodeError("OptionalTokenResponse runs past the batch length")
        pos += 3 + n
        if token_type == TOKEN_TYPE_BLIND_RSA:
            out.append(TokenResponse(chunk))
        else:
            out.append(OpaqueTokenResponse(token_type, chunk))
    return out


def issue_batch(
    requests: Sequence[AnyRequest], issue_one: Callable[[TokenRequest], TokenResponse]
) -> bytes:
    """Answer a batch: ``issue_one`` per type-2 request; absent for failures and type 1.

    ``issue_one`` is typically ``functools.partial(issuance.issue, key)`` after the
    caller's quota check; an OpenPCCError from it (wrong key id, bad input)
    makes that item absent instead of failing the whole batch.
    """
    items: list[tuple[int, AnyResponse] | None] = []
    for req in requests:
        if not isinstance(req, TokenRequest):
            items.append(None)
            continue
        try:
            items.append((TOKEN_TYPE_BLIND_RSA, issue_one(req)))
        except OpenPCCError:
            items.append(None)
    return encode_batch_response(items)
