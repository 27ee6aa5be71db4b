"""The node-sealed inner layer (client -> node), sans-IO. Spec: docs/PROTOCOL.md §Sealed.

The client encrypts its Binary HTTP request once under a fresh data key and wraps
that key with HPKE to each of k candidate nodes, so the gateway can route to any
candidate but read none. Version 2 wraps with X-Wing (post-quantum hybrid), version 1
with X25519; the version fixes the KEM, so an envelope never mixes the two (one
X25519 wrap would undo the others' protection against a recorded-now, broken-later
attack). The node answers in padded chunks sealed under keys derived
from the same data key and a fresh response nonce; the last chunk is flagged final
inside the AEAD, so a cut stream is detected, never mistaken for a short answer.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from openpcc.errors import (
    DecodeError,
    DecryptError,
    EncodeError,
    LimitExceededError,
    StateError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire import bhttp, hpke
from openpcc.wire.varint import decode_varint, encode_varint

VERSION_1: Final = 0x01  # X25519; nodes still open it (deprecation: docs/PROTOCOL.md)
VERSION_2: Final = 0x02  # X-Wing
REQUEST_MEDIA_TYPE: Final = "application/openpcc-sealed-request"
RESPONSE_MEDIA_TYPE: Final = "application/openpcc-sealed-response"
SUITE_V1: Final = hpke.DEFAULT_SUITE  # X25519 / HKDF-SHA256 / AES-128-GCM
SUITE_V2: Final = hpke.Suite(kem_id=hpke.KEM_XWING)  # X-Wing / HKDF-SHA256 / AES-128-GCM
NODE_ID_LEN: Final = 16
KEY_ID_LEN: Final = 8
DATA_KEY_LEN: Final = 16
NONCE_LEN: Final = 16  # request and response nonces
WRAPPED_LEN: Final = DATA_KEY_LEN + 16  # AES-128-GCM tag
MAX_CANDIDATES: Final = 8
MAX_MODEL_LEN: Final = 255
CHUNK_SIZE: Final = 16 * 1024  # request plaintext per chunk
MAX_REQUEST_BYTES: Final = 8 * 1024 * 1024
# Padded sizes: the gateway and relay learn only the bucket, not the exact length.
REQUEST_BUCKETS: Final = (1024, 4096, 16384, 65536, 262144, 1048576)
RESPONSE_BUCKETS: Final = (64, 256, 1024, 4096, 16384)
MAX_CHUNK_SEALED: Final = max(CHUNK_SIZE, RESPONSE_BUCKETS[-1]) + 16

REQ_KEY_LABEL: Final = b"openpcc request key"
REQ_NONCE_LABEL: Final = b"openpcc request nonce"
RESP_KEY_LABEL: Final = b"openpcc response key"
RESP_NONCE_LABEL: Final = b"openpcc response nonce"
FLAG_MORE: Final = 0x00
FLAG_FINAL: Final = 0x01


@dataclass(frozen=True)
class Version:
    """What one envelope version fixes: its HPKE suite and its domain-separation labels."""

    number: int
    suite: hpke.Suite
    wrap_info_label: bytes
    context_label: bytes

    @functools.cached_property
    def suite_bytes(self) -> bytes:
        s = self.suite
        return (
            s.kem_id.to_bytes(2, "big") + s.kdf_id.to_bytes(2, "big") + s.aead_id.to_bytes(2, "big")
        )

    @property
    def entry_len(self) -> int:
        """Bytes per candidate: node_id ‖ key_id ‖ enc ‖ wrapped_key."""
        return NODE_ID_LEN + KEY_ID_LEN + self.suite.nenc + WRAPPED_LEN


V1: Final = Version(
    VERSION_1, SUITE_V1, b"openpcc sealed request v1", b"openpcc sealed request v1 context"
)
V2: Final = Version(
    VERSION_2, SUITE_V2, b"openpcc sealed request v2", b"openpcc sealed request v2 context"
)
VERSIONS: Final = {VERSION_1: V1, VERSION_2: V2}
_BY_KEM: Final = {v.suite.kem_id: v for v in VERSIONS.values()}
_KEM_BY_PK_LEN: Final = {v.suite.npk: v.suite.kem_id for v in VERSIONS.values()}
# Largest header of any version: what a gateway or node must accept before the chunks.
MAX_HEADER_LEN: Final = (
    7
    + NONCE_LEN
    + 1
    + MAX_MODEL_LEN
    + 1
    + MAX_CANDIDATES * max(v.entry_len for v in VERSIONS.values())
)
# Largest envelope a client can build: 8 MiB padded request, per-16-KiB framing, header.
MAX_ENVELOPE_LEN: Final = (
    MAX_REQUEST_BYTES + (MAX_REQUEST_BYTES // CHUNK_SIZE + 1) * (1 + 4 + 16) + MAX_HEADER_LEN
)


def version_for_kem(kem_id: int) -> Version:
    try:
        return _BY_KEM[kem_id]
    except KeyError:
        raise UnsupportedError(f"no sealed-request version for KEM 0x{kem_id:04x}") from None


def key_id_for(public_key: bytes) -> bytes:
    """A node key's 8-byte id: the first bytes of SHA-256 over the raw public key
    (X25519: 32 bytes; X-Wing: 1216 bytes)."""
    return hashlib.sha256(bytes(public_key)).digest()[:KEY_ID_LEN]


@dataclass(frozen=True)
class NodeKey:
    """A candidate as the client knows it, from a verified attestation bundle.

    The KEM follows from the key's length (32 bytes X25519, 1216 bytes X-Wing).
    """

    node_id: bytes
    public_key: bytes

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_LEN:
            raise EncodeError(f"node id must be {NODE_ID_LEN} bytes")
        if len(self.public_key) not in _KEM_BY_PK_LEN:
            raise EncodeError(
                f"node public key must be {' or '.join(map(str, _KEM_BY_PK_LEN))} bytes"
            )

    @property
    def kem_id(self) -> int:
        return _KEM_BY_PK_LEN[len(self.public_key)]

    @functools.cached_property
    def key_id(self) -> bytes:
        return key_id_for(self.public_key)


@dataclass(frozen=True)
class Candidate:
    node_id: bytes
    key_id: bytes
    enc: bytes = field(repr=False)
    wrapped_key: bytes = field(repr=False)


@dataclass(frozen=True)
class EnvelopeHeader:
    """The cleartext part of a sealed request: all the gateway needs to route it."""

    request_nonce: bytes
    model: str
    candidates: tuple[Candidate, ...]
    length: int  # bytes of the header; sealed chunks follow
    version: Version = V1

    @property
    def kem_id(self) -> int:
        return self.version.suite.kem_id

    @property
    def context(self) -> bytes:
        return _context(self.version, self.request_nonce, self.model, self.candidates)


def _context(
    v: Version, nonce: bytes, model: str, candidates: Sequence[Candidate | NodeKey]
) -> bytes:
    """SHA-256 over everything the gateway could swap: nonce, model, candidate set."""
    h = hashlib.sha256(v.context_label + b"\x00")
    h.update(v.suite_bytes + bytes([v.number]) + nonce)
    m = model.encode()
    h.update(bytes([len(m)]) + m + bytes([len(candidates)]))
    for c in candidates:
        h.update(c.node_id + c.key_id)
    return h.digest()


def _wrap_info(v: Version, node_id: bytes, key_id: bytes) -> bytes:
    return v.wrap_info_label + b"\x00" + node_id + key_id


def _derive(dk: bytes, salt: bytes, key_label: bytes, nonce_label: bytes) -> tuple[AESGCM, int]:
    key = HKDF(hashes.SHA256(), 16, salt, key_label).derive(dk)
    iv = HKDF(hashes.SHA256(), 12, salt, nonce_label).derive(dk)
    return AESGCM(key), int.from_bytes(iv, "big")


def pad_bucket(size: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= size; beyond the largest, the next multiple of it."""
    for b in buckets:
        if size <= b:
            return b
    top = buckets[-1]
    return -(-size // top) * top


class _ChunkCipher:
    """Sequenced AES-GCM over framed chunks: flag(1) ‖ varint(len) ‖ sealed."""

    def __init__(self, aead: AESGCM, iv: int, context: bytes) -> None:
        self._aead = aead
        self._iv = iv
        self._context = context
        self._seq = 0

    def _nonce(self) -> bytes:
        if self._seq >= 1 << 32:
            raise StateError("chunk counter exhausted")
        n = (self._iv ^ self._seq).to_bytes(12, "big")
        self._seq += 1
        return n

    def seal(self, data: bytes, final: bool) -> bytes:
        flag = FLAG_FINAL if final else FLAG_MORE
        sealed = self._aead.encrypt(self._nonce(), data, self._context + bytes([flag]))
        return bytes([flag]) + encode_varint(len(sealed)) + sealed

    def open(self, flag: int, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), sealed, self._context + bytes([flag]))
        except InvalidTag as exc:
            raise DecryptError("sealed chunk failed authentication") from exc


class _FrameReader:
    """Incremental parser of flag ‖ varint(len) ‖ sealed frames."""

    def __init__(self, max_sealed: int = MAX_CHUNK_SEALED) -> None:
        self._buf = bytearray()
        self._max = max_sealed
        self.final_seen = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self.final_seen and data:
            raise DecodeError("data after the final chunk")
        self._buf += data
        frames = []
        while self._buf and not self.final_seen:
            flag = self._buf[0]
            if flag not in (FLAG_MORE, FLAG_FINAL):
                raise DecodeError(f"unknown chunk flag 0x{flag:02x}")
            try:
                length, off = decode_varint(self._buf, 1)
            except TruncatedError:
                break
            if length > self._max:
                raise LimitExceededError(f"sealed chunk of {length} bytes over {self._max}")
            if length < 16:
                raise DecodeError("sealed chunk shorter than its tag")
            if len(self._buf) < off + length:
                break
            frames.append((flag, bytes(self._buf[off : off + length])))
            del self._buf[: off + length]
            if flag == FLAG_FINAL:
                self.final_seen = True
                if self._buf:
                    raise DecodeError("data after the final chunk")
        return frames

    def check_complete(self) -> None:
        if not self.final_seen:
            raise TruncatedError("sealed stream ended before its final chunk")


# ----------------------------------------------------------------------------- client


@dataclass
class SealedRequest:
    """Client-side result of sealing: the envelope bytes and what opens the answer."""

    envelope: bytes
    context: bytes = field(repr=False)
    _dk: bytes = field(repr=False)
    _nonce: bytes = field(repr=False)

    def response_opener(self) -> ResponseOpener:
        return ResponseOpener(self._dk, self._nonce, self.context)


def wrap_sender(node: NodeKey) -> hpke.SenderContext:
    """The HPKE sender setup that wraps a data key to ``node`` (its version's suite and
    info): independent of the request, so a client may make it ahead of time
    (``seal_request(senders=...)``), each for one request only."""
    v = version_for_kem(node.kem_id)
    return hpke.setup_sender(
        node.public_key, _wrap_info(v, node.node_id, node.key_id), suite=v.suite
    )


def seal_request(
    candidates: Sequence[NodeKey],
    model: str,
    bhttp_request: bytes,
    *,
    data_key: bytes | None = None,
    request_nonce: bytes | None = None,
    ephemerals: Sequence[bytes] | None = None,
    wraps: Sequence[bytes] | None = None,
    senders: Sequence[hpke.SenderContext] | None = None,
) -> SealedRequest:
    """Seal one padded Binary HTTP request to every candidate (k = len(candidates)).

    All candidates' keys must be of one KEM: X-Wing gives version 2, X25519 version 1.
    ``senders``: one unused ``wrap_sender(candidate)`` per candidate, made ahead of time
    (each is sealed to once, here). ``data_key``, ``request_nonce``, ``ephemerals``
    (X25519) and ``wraps`` (stored enc ‖ wrapped_key per candidate, for X-Wing's
    non-deterministic encapsulation) are injectable for vectors only.
    """
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise EncodeError(f"1 to {MAX_CANDIDATES} candidates, got {len(candidates)}")
    if len({c.node_id for c in candidates}) != len(candidates):
        raise EncodeError("candidate node ids must be distinct")
    kems = {c.kem_id for c in candidates}
    if len(kems) != 1:
        raise EncodeError("candidates mix X25519 and X-Wing keys: one KEM per envelope")
    v = version_for_kem(kems.pop())
    m = model.encode()
    if not 1 <= len(m) <= MAX_MODEL_LEN:
        raise EncodeError(f"model name must be 1 to {MAX_MODEL_LEN} bytes")
    if len(bhttp_request) > MAX_REQUEST_BYTES:
        raise EncodeError(f"request over {MAX_REQUEST_BYTES} bytes")
    dk = os.urandom(DATA_KEY_LEN) if data_key is None else bytes(data_key)
    nonce = os.urandom(NONCE_LEN) if request_nonce is None else bytes(request_nonce)
    if len(dk) != DATA_KEY_LEN or len(nonce) != NONCE_LEN:
        raise EncodeError("data key and request nonce must be 16 bytes")
    ctx = _context(v, nonce, model, candidates)
    header = bytearray([v.number]) + v.suite_bytes + nonce + bytes([len(m)]) + m
    header.append(len(candidates))
    for i, c in enumerate(candidates):
        header += c.node_id + c.key_id
        if wraps is not None:
            header += wraps[i]
            continue
        if senders is not None:
            sender = senders[i]
            if sender.suite != v.suite or sender.seq != 0:
                raise EncodeError(
                    "a prepared wrap sender must be unused and of the version's suite"
                )
        else:
            eph = None if ephemerals is None else ephemerals[i]
            sender = hpke.setup_sender(
                c.public_key, _wrap_info(v, c.node_id, c.key_id), suite=v.suite, ephemeral=eph
            )
        header += sender.enc + sender.seal(dk, ctx)
    padded = bytes(bhttp_request) + bytes(
        pad_bucket(len(bhttp_request), REQUEST_BUCKETS) - len(bhttp_request)
    )
    aead, iv = _derive(dk, nonce, REQ_KEY_LABEL, REQ_NONCE_LABEL)
    cipher = _ChunkCipher(aead, iv, ctx)
    parts = [bytes(header)]
    for off in range(0, len(padded), CHUNK_SIZE):
        piece = padded[off : off + CHUNK_SIZE]
        parts.append(cipher.seal(piece, final=off + CHUNK_SIZE >= len(padded)))
    return SealedRequest(b"".join(parts), ctx, dk, nonce)


# ---------------------------------------------------------------------------- gateway


def parse_envelope_header(data: bytes) -> EnvelopeHeader:
    """Read the routing header (version, model, candidates) without any key."""
    buf = bytes(data)
    if len(buf) < 7 + NONCE_LEN + 2:
        raise TruncatedError("sealed request header truncated")
    v = VERSIONS.get(buf[0])
    if v is None:
        raise UnsupportedError(f"sealed request version {buf[0]} is not 1 or 2")
    if buf[1:7] != v.suite_bytes:
        raise UnsupportedError(f"sealed request v{v.number} uses an unsupported HPKE suite")
    nonce = buf[7 : 7 + NONCE_LEN]
    pos = 7 + NONCE_LEN
    mlen = buf[pos]
    pos += 1
    if mlen == 0:
        raise DecodeError("empty model name")
    if len(buf) < pos + mlen + 1:
        raise TruncatedError("sealed request header truncated in the model name")
    try:
        model = buf[pos : pos + mlen].decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("model name is not UTF-8") from exc
    pos += mlen
    count = buf[pos]
    pos += 1
    if not 1 <= count <= MAX_CANDIDATES:
        raise DecodeError(f"candidate count {count} not in 1..{MAX_CANDIDATES}")
    entry, nenc = v.entry_len, v.suite.nenc
    if len(buf) < pos + count * entry:
        raise TruncatedError("sealed request header truncated in the candidates")
    cands = []
    for _ in range(count):
        nid = buf[pos : pos + NODE_ID_LEN]
        kid = buf[pos + NODE_ID_LEN : pos + NODE_ID_LEN + KEY_ID_LEN]
        e0 = pos + NODE_ID_LEN + KEY_ID_LEN
        cands.append(Candidate(nid, kid, buf[e0 : e0 + nenc], buf[e0 + nenc : pos + entry]))
        pos += entry
    if len({c.node_id for c in cands}) != count:
        raise DecodeError("duplicate candidate node id")
    return EnvelopeHeader(nonce, model, tuple(cands), pos, v)


# ------------------------------------------------------------------------------- node


@dataclass
class OpenedRequest:
    """What the node learns: the request, the model it was sealed for, and how to answer."""

    bhttp_request: bytes
    model: str
    sealer: ResponseSealer


def open_request(
    envelope: bytes,
    node_id: bytes,
    private_key: hpke.PrivateKeyLike,
    public_key: bytes,
) -> OpenedRequest:
    """Unwrap this node's copy of the data key, then decrypt and unpad the request.

    The key must be of the envelope's KEM (a node holding both passes the matching one).
    """
    header = parse_envelope_header(envelope)
    v = header.version
    if len(public_key) != v.suite.npk:
        raise UnsupportedError(
            f"a v{v.number} request needs this node's {hpke.kem_name(v.suite.kem_id)} key"
        )
    kid = key_id_for(public_key)
    mine = [c for c in header.candidates if c.node_id == node_id]
    if not mine:
        raise UnsupportedError("this node is not a candidate for the request")
    cand = mine[0]
    if cand.key_id != kid:
        raise UnsupportedError("request was sealed to another key of this node")
    ctx = header.context
    receiver = hpke.setup_receiver(
        private_key, cand.enc, _wrap_info(v, node_id, kid), suite=v.suite
    )
    dk = receiver.open(cand.wrapped_key, ctx)
    aead, iv = _derive(dk, header.request_nonce, REQ_KEY_LABEL, REQ_NONCE_LABEL)
    cipher = _ChunkCipher(aead, iv, ctx)
    reader = _FrameReader(CHUNK_SIZE + 16)
    plain = bytearray()
    for flag, sealed in reader.feed(envelope[header.length :]):
        plain += cipher.open(flag, sealed)
    reader.check_complete()
    return OpenedRequest(bytes(plain), header.model, ResponseSealer(dk, header.request_nonce, ctx))


class ResponseSealer:
    """Node side of the response: nonce, then padded chunks, then a final chunk."""

    def __init__(
        self, dk: bytes, request_nonce: bytes, context: bytes, *, nonce: bytes | None = None
    ) -> None:
        self._dk = dk
        self._request_nonce = request_nonce
        self._context = context
        self._response_nonce = nonce
        self._cipher: _ChunkCipher | None = None
        self._finished = False

    def _start(self) -> bytes:
        if self._cipher is not None:
            return b""
        if self._response_nonce is None:
            self._response_nonce = os.urandom(NONCE_LEN)
        aead, iv = _derive(
            self._dk, self._request_nonce + self._response_nonce, RESP_KEY_LABEL, RESP_NONCE_LABEL
        )
        self._cipher = _ChunkCipher(aead, iv, self._context)
        return self._response_nonce

    def _chunks(self, data: bytes, final: bool) -> bytes:
        if self._finished:
            raise StateError("the response was already finished")
        out = bytearray(self._start())
        assert self._cipher is not None
        room = RESPONSE_BUCKETS[-1] - 8  # leave space for the length varint
        pieces = [data[i : i + room] for i in range(0, len(data), room)] or [b""]
        for i, piece in enumerate(pieces):
            last = final and i == len(pieces) - 1
            body = encode_varint(len(piece)) + piece
            body += bytes(pad_bucket(len(body), RESPONSE_BUCKETS) - len(body))
            out += self._cipher.seal(body, final=last)
        self._finished = final
        return bytes(out)

    def head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """First chunk: the response's status and headers as known-length Binary HTTP."""
        head = bhttp.encode_response(bhttp.Response(status, list(headers)), truncate=True)
        return self._chunks(head, final=False)

    def data(self, data: bytes) -> bytes:
        if not data:
            return b""
        return self._chunks(bytes(data), final=False)

    def end(self, data: bytes = b"") -> bytes:
        """The authenticated end of stream (optionally with the last bytes)."""
        return self._chunks(bytes(data), final=True)


# ----------------------------------------------------------------------- client again


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]


class ResponseOpener:
    """Client side: feed sealed response bytes, get the head then body pieces.

    ``receive_data`` returns a list whose first item (once) is a ResponseHead and
    whose other items are body bytes; ``end_of_input`` returns the same (always empty:
    a sealed chunk is opened as soon as it is whole) or raises TruncatedError unless the
    final chunk arrived.
    """

    def __init__(self, dk: bytes, request_nonce: bytes, context: bytes) -> None:
        self._dk = dk
        self._request_nonce = request_nonce
        self._context = context
        self._nonce_buf = bytearray()
        self._cipher: _ChunkCipher | None = None
        self._reader = _FrameReader()
        self._head_seen = False
        self._failed = False

    @property
    def complete(self) -> bool:
        return self._reader.final_seen

    def receive_data(self, data: bytes) -> list[ResponseHead | bytes]:
        if self._failed:
            raise StateError("response stream already failed")
        try:
            return self._receive(bytes(data))
        except Exception:
            self._failed = True
            raise

    def _receive(self, data: bytes) -> list[ResponseHead | bytes]:
        if self._cipher is None:
            self._nonce_buf += data
            if len(self._nonce_buf) < NONCE_LEN:
                return []
            nonce = bytes(self._nonce_buf[:NONCE_LEN])
            data = bytes(self._nonce_buf[NONCE_LEN:])
            aead, iv = _derive(
                self._dk, self._request_nonce + nonce, RESP_KEY_LABEL, RESP_NONCE_LABEL
            )
            self._cipher = _ChunkCipher(aead, iv, self._context)
        events: list[ResponseHead | bytes] = []
        for flag, sealed in self._reader.feed(data):
            body = self._cipher.open(flag, sealed)
            length, off = decode_varint(body, 0)
            if off + length > len(body):
                raise DecodeError("response chunk length exceeds its padding bucket")
            if any(body[off + length :]):
                raise DecodeError("non-zero response padding")
            piece = body[off : off + length]
            if not self._head_seen:
                resp = bhttp.decode_response(piece)
                events.append(ResponseHead(resp.status, resp.headers))
                self._head_seen = True
            elif piece:
                events.append(piece)
        if self._reader.final_seen and not self._head_seen:
            raise DecodeError("response ended without a head")
        return events

    def end_of_input(self) -> list[ResponseHead | bytes]:
        if self._cipher is None:
            raise TruncatedError("sealed response ended before its nonce")
        self._reader.check_complete()
        return []
