"""Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp-08), as sans-IO state machines.

Senders turn plaintext chunks into framed wire bytes; receivers are fed wire
bytes in arbitrary pieces (``receive_data``) and hand back plaintext chunks as
soon as each one is complete and authenticated. Nothing here does I/O.

Framing (both directions): a non-final chunk is ``varint(len(sealed)) ‖
sealed``; the final chunk is ``varint(0) ‖ sealed`` and runs to the end of
the message. So the final chunk can only be opened at end of input
(``end_of_input()``), and a message is complete only once a chunk sealed with
AAD ``"final"`` has been opened. A stream cut anywhere raises
TruncatedError or DecryptError; it is never reported as complete.

Request chunks are sealed on one HPKE context (its sequence number protects
order); the context's KEM (X25519 or X-Wing) changes only the size of ``enc`` in the
request prefix, never the chunk framing. Response chunks use the RFC 9458 response key
with nonce ``aead_nonce XOR counter``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from openpcc.errors import (
    DecodeError,
    DecryptError,
    EncodeError,
    LimitExceededError,
    OpenPCCError,
    StateError,
    TruncatedError,
)
from openpcc.wire import hpke
from openpcc.wire.hpke import PrivateKeyLike, RecipientContext, SenderContext
from openpcc.wire.ohttp import (
    KeyConfig,
    RequestHeader,
    response_aead,
    response_nonce_len,
    setup_request_receiver,
    setup_request_sender,
)
from openpcc.wire.varint import decode_varint, encode_varint

__all__ = [
    "DEFAULT_MAX_CHUNK_SIZE",
    "DRAFT_VERSION",
    "FINAL_CHUNK_AAD",
    "MEDIA_TYPE_CHUNKED_REQUEST",
    "MEDIA_TYPE_CHUNKED_RESPONSE",
    "REQUEST_INFO_LABEL",
    "RESPONSE_EXPORT_LABEL",
    "ChunkedRequestReceiver",
    "ChunkedRequestSender",
    "ChunkedResponseReceiver",
    "ChunkedResponseSender",
]

DRAFT_VERSION: Final = "draft-ietf-ohai-chunked-ohttp-08"
MEDIA_TYPE_CHUNKED_REQUEST: Final = "message/ohttp-chunked-req"
MEDIA_TYPE_CHUNKED_RESPONSE: Final = "message/ohttp-chunked-res"
REQUEST_INFO_LABEL: Final = b"message/bhttp chunked request"
RESPONSE_EXPORT_LABEL: Final = b"message/bhttp chunked response"
FINAL_CHUNK_AAD: Final = b"final"
NON_FINAL_CHUNK_AAD: Final = b""

# Largest plaintext chunk accepted or produced unless configured otherwise. Bounds
# the buffering a peer can force on us (the final chunk is buffered until EOF).
DEFAULT_MAX_CHUNK_SIZE: Final = 1 << 20


def _frame(sealed: bytes, final: bool) -> bytes:
    return (b"\x00" if final else encode_varint(len(sealed))) + sealed


# --------------------------------------------------------------------------- senders


class _ChunkSender:
    """Shared sender logic: prefix once, non-empty non-final chunks, nothing after final."""

    def __init__(self, prefix: bytes, max_chunk_size: int) -> None:
        if max_chunk_size < 1:
            raise EncodeError("max_chunk_size must be positive")
        self._prefix: bytes | None = prefix
        self._max = max_chunk_size
        self._finished = False

    @property
    def finished(self) -> bool:
        """True once the final chunk has been sealed."""
        return self._finished

    def header(self) -> bytes:
        """The bytes that precede the first chunk. Optional: ``seal_chunk`` prepends them
        itself if this was never called."""
        if self._prefix is None:
            raise StateError("header already emitted")
        prefix, self._prefix = self._prefix, None
        return prefix

    def seal_chunk(self, data: bytes, *, final: bool = False) -> bytes:
        """Seal and frame one chunk. A non-final chunk must not be empty."""
        if self._finished:
            raise StateError("the final chunk was already sealed")
        data = bytes(data)
        if not final and not data:
            raise EncodeError("a non-final chunk must not be empty")
        if len(data) > self._max:
            raise EncodeError(f"chunk of {len(data)} bytes exceeds limit {self._max}")
        sealed = self._seal(data, FINAL_CHUNK_AAD if final else NON_FINAL_CHUNK_AAD)
        if final:
            self._finished = True
        out = _frame(sealed, final)
        if self._prefix is not None:
            out = self.header() + out
        return out

    def _seal(self, data: bytes, aad: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError


class ChunkedRequestSender(_ChunkSender):
    """Client: ``message/ohttp-chunked-req`` = hdr(7) ‖ enc ‖ chunks."""

    def __init__(
        self,
        key_config: KeyConfig,
        *,
        kdf_id: int = hpke.KDF_HKDF_SHA256,
        aead_id: int = hpke.AEAD_AES_128_GCM,
        ephemeral: PrivateKeyLike | None = None,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        prefix, self._ctx = setup_request_sender(
            key_config, kdf_id, aead_id, REQUEST_INFO_LABEL, ephemeral
        )
        super().__init__(prefix, max_chunk_size)

    @property
    def hpke_context(self) -> SenderContext:
        return self._ctx

    def _seal(self, data: bytes, aad: bytes) -> bytes:
        return self._ctx.seal(data, aad)

    def response_receiver(
        self, *, max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    ) -> ChunkedResponseReceiver:
        """A receiver for the gateway's chunked response to this request."""
        return ChunkedResponseReceiver(self._ctx, max_chunk_size=max_chunk_size)


def _response_aead_for(
    ctx: SenderContext | RecipientContext, response_nonce: bytes
) -> tuple[AESGCM | ChaCha20Poly1305, int]:
    aead, nonce = response_aead(ctx, RESPONSE_EXPORT_LABEL, response_nonce)
    return aead, int.from_bytes(nonce, "big")


class ChunkedResponseSender(_ChunkSender):
    """Gateway: ``message/ohttp-chunked-res`` = response_nonce ‖ chunks.

    Chunk i is sealed with nonce ``aead_nonce XOR i``; the counter is refused
    (StateError) rather than allowed to wrap.
    """

    def __init__(
        self,
        ctx: RecipientContext,
        *,
        nonce: bytes | None = None,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        nlen = response_nonce_len(ctx.suite.aead_id)
        if nonce is None:
            nonce = os.urandom(nlen)
        elif len(nonce) != nlen:
            raise EncodeError(f"response nonce must be {nlen} bytes")
        nonce = bytes(nonce)
        self._aead, self._base = _response_aead_for(ctx, nonce)
        self._nn = ctx.suite.nn
        self._counter = 0
        super().__init__(nonce, max_chunk_size)

    def _seal(self, data: bytes, aad: bytes) -> bytes:
        if self._counter >= 1 << (8 * self._nn):
            raise StateError("response chunk counter exhausted")
        nonce = (self._base ^ self._counter).to_bytes(self._nn, "big")
        self._counter += 1
        return self._aead.encrypt(nonce, data, aad)


# --------------------------------------------------------------------------- receivers

_PREFIX, _CHUNKS, _FINAL, _DONE, _ERROR = range(5)


class _ChunkReceiver:
    """Shared streaming parser: prefix, then framed chunks, final chunk to EOF.

    Any error is sticky: the receiver refuses further input (StateError), since
    a partly-consumed stream cannot be resynchronised.
    """

    def __init__(self, max_chunk_size: int) -> None:
        if max_chunk_size < 1:
            raise EncodeError("max_chunk_size must be positive")
        self._max = max_chunk_size
        self._buf = bytearray()
        self._state = _PREFIX
        self._nt = 16  # replaced once the suite is known

    @property
    def final_started(self) -> bool:
        """The final-chunk indicator has arrived (its content is opened at end of input)."""
        return self._state in (_FINAL, _DONE)

    @property
    def complete(self) -> bool:
        """The final chunk was opened with AAD "final": the message is whole."""
        return self._state == _DONE

    def receive_data(self, data: bytes) -> list[bytes]:
        """Feed wire bytes; return the plaintext of every chunk that completed."""
        if self._state == _ERROR:
            raise StateError("receiver already failed")
        if self._state == _DONE:
            raise StateError("message already ended")
        self._buf += data
        try:
            return self._process()
        except OpenPCCError:
            self._fail()
            raise

    def end_of_input(self) -> list[bytes]:
        """The transport ended: open the final chunk; its plaintext, if any, as a list.

        Same contract as ``receive_data`` (and every sans-IO decoder here): a list of what
        completed, so a caller handles the final chunk's content like any other chunk's.

        TruncatedError if the stream stopped anywhere before a final chunk,
        DecryptError if the final chunk does not authenticate (e.g. cut short).
        """
        if self._state == _ERROR:
            raise StateError("receiver already failed")
        if self._state == _DONE:
            raise StateError("message already ended")
        if self._state != _FINAL:
            self._fail()
            raise TruncatedError("stream ended before the final chunk")
        sealed = bytes(self._buf)
        self._buf.clear()
        if len(sealed) < self._nt:
            self._fail()
            raise TruncatedError("final chunk shorter than the AEAD tag")
        try:
            pt = self._open(sealed, final=True)
        except OpenPCCError:
            self._fail()
            raise
        self._state = _DONE
        return [pt] if pt else []

    close = end_of_input

    def _fail(self) -> None:
        self._state = _ERROR
        self._buf.clear()

    def _process(self) -> list[bytes]:
        out: list[bytes] = []
        if self._state == _PREFIX:
            used = self._parse_prefix(bytes(self._buf))
            if used is None:
                return out
            del self._buf[:used]
            self._state = _CHUNKS
        max_sealed = self._max + self._nt
        while self._state == _CHUNKS:
            try:
                length, pos = decode_varint(self._buf)
            except TruncatedError:
                return out
            if length == 0:
                del self._buf[:pos]
                self._state = _FINAL
                break
            if length > max_sealed:
                raise LimitExceededError(f"chunk of {length} bytes exceeds limit {max_sealed}")
            if length <= self._nt:
                raise DecodeError("non-final chunk is empty or shorter than the AEAD tag")
            if len(self._buf) - pos < length:
                return out
            sealed = bytes(self._buf[pos : pos + length])
            del self._buf[: pos + length]
            out.append(self._open(sealed, final=False))
        if self._state == _FINAL and len(self._buf) > max_sealed:
            raise LimitExceededError(f"final chunk exceeds limit {max_sealed}")
        return out

    def _parse_prefix(self, buf: bytes) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _open(self, sealed: bytes, *, final: bool) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError


class ChunkedRequestReceiver(_ChunkReceiver):
    """Gateway: parse and open a ``message/ohttp-chunked-req`` stream.

    ``private_keys`` maps key_id to the private key (X25519 raw or parsed, X-Wing
    parsed: :mod:`openpcc.wire.ohttp`); an unknown key id or suite, or a KEM that is not
    the key's, raises UnsupportedError as soon as the 7-byte header is in. The prefix is
    ``hdr(7) ‖ enc`` (enc: 32 bytes for X25519, 1120 for X-Wing); nothing is opened
    before all of it has arrived.
    """

    def __init__(
        self,
        private_keys: Mapping[int, PrivateKeyLike],
        *,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        super().__init__(max_chunk_size)
        self._keys = private_keys
        self._ctx: RecipientContext | None = None
        self._header: RequestHeader | None = None

    @property
    def header(self) -> RequestHeader | None:
        """The request header, once received."""
        return self._header

    @property
    def hpke_context(self) -> RecipientContext | None:
        return self._ctx

    def _parse_prefix(self, buf: bytes) -> int | None:
        try:
            header, ctx, used = setup_request_receiver(self._keys, buf, REQUEST_INFO_LABEL)
        except TruncatedError:
            return None
        self._header, self._ctx, self._nt = header, ctx, ctx.suite.nt
        return used

    def _open(self, sealed: bytes, *, final: bool) -> bytes:
        assert self._ctx is not None
        return self._ctx.open(sealed, FINAL_CHUNK_AAD if final else NON_FINAL_CHUNK_AAD)

    def response_sender(
        self, *, nonce: bytes | None = None, max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    ) -> ChunkedResponseSender:
        """A sender for the chunked response (available once the header is in)."""
        if self._ctx is None:
            raise StateError("request header not received yet")
        return ChunkedResponseSender(self._ctx, nonce=nonce, max_chunk_size=max_chunk_size)


class ChunkedResponseReceiver(_ChunkReceiver):
    """Client: parse and open a ``message/ohttp-chunked-res`` stream."""

    def __init__(self, ctx: SenderContext, *, max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE) -> None:
        super().__init__(max_chunk_size)
        self._ctx = ctx
        self._nt = ctx.suite.nt
        self._nn = ctx.suite.nn
        self._nlen = response_nonce_len(ctx.suite.aead_id)
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._base = 0
        self._counter = 0

    def _parse_prefix(self, buf: bytes) -> int | None:
        if len(buf) < self._nlen:
            return None
        self._aead, self._base = _response_aead_for(self._ctx, buf[: self._nlen])
        return self._nlen

    def _open(self, sealed: bytes, *, final: bool) -> bytes:
        assert self._aead is not None
        if self._counter >= 1 << (8 * self._nn):
            raise LimitExceededError("response chunk counter exhausted")
        nonce = (self._base ^ self._counter).to_bytes(self._nn, "big")
        self._counter += 1
        try:
            return self._aead.decrypt(
                nonce, sealed, FINAL_CHUNK_AAD if final else NON_FINAL_CHUNK_AAD
            )
        except InvalidTag as exc:
            raise DecryptError("chunked OHTTP response chunk failed to authenticate") from exc
