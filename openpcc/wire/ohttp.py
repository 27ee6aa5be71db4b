"""Oblivious HTTP (RFC 9458) message encapsulation and key configs (RFC 9540), sans-IO.

Only byte transformations live here; the relay/gateway/client do the HTTP.
HPKE goes through :mod:`openpcc.wire.hpke`; the response AEAD and HKDF use
``cryptography`` directly, exactly as RFC 9458 §4.4 spells them out.

Suites: DHKEM(X25519, HKDF-SHA256) (KEM ``0x0020``) or X-Wing (MLKEM768-X25519, KEM
``0x647A``), each with HKDF-SHA256 and AES-128-GCM or ChaCha20-Poly1305. Anything else in a
message is :class:`UnsupportedError`. Nothing here depends on the KEM beyond its sizes
(``Npk``, ``Nenc``, from :mod:`openpcc.wire.hpke`): an X-Wing request is ``hdr(7) ‖
enc(1120) ‖ ct`` where an X25519 one is ``hdr(7) ‖ enc(32) ‖ ct``, and the response key
schedule salts with the whole ``enc`` (RFC 9458 §4.4) either way.

Receivers map key ids to private keys. A raw 32-byte value there is an X25519 key (as it
always was); an X-Wing key goes in parsed (``hpke.load_private_key(seed,
kem_id=hpke.KEM_XWING)``, ~0.5 ms, done once). A request whose header names another KEM
than its key id's key is refused (UnsupportedError) before any KEM work.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from openpcc.errors import (
    DecodeError,
    DecryptError,
    EncodeError,
    StateError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire import hpke
from openpcc.wire.hpke import PrivateKeyLike, RecipientContext, SenderContext, Suite

__all__ = [
    "MAX_REQUEST_PREFIX_LEN",
    "MEDIA_TYPE_KEYS",
    "MEDIA_TYPE_REQUEST",
    "MEDIA_TYPE_RESPONSE",
    "REQUEST_HEADER_LEN",
    "REQUEST_INFO_LABEL",
    "RESPONSE_EXPORT_LABEL",
    "ClientContext",
    "KeyConfig",
    "RequestHeader",
    "ServerContext",
    "SymmetricSuite",
    "decapsulate_request",
    "encapsulate_request",
    "encode_key_configs",
    "key_kem_id",
    "parse_key_configs",
    "parse_request_header",
    "request_info",
    "response_aead",
    "response_nonce_len",
    "setup_request_receiver",
    "setup_request_sender",
]

MEDIA_TYPE_REQUEST: Final = "message/ohttp-req"
MEDIA_TYPE_RESPONSE: Final = "message/ohttp-res"
MEDIA_TYPE_KEYS: Final = "application/ohttp-keys"

REQUEST_INFO_LABEL: Final = b"message/bhttp request"
RESPONSE_EXPORT_LABEL: Final = b"message/bhttp response"

REQUEST_HEADER_LEN: Final = 7  # key_id(1) kem_id(2) kdf_id(2) aead_id(2)
# hdr ‖ enc of the largest KEM we implement (X-Wing: 7 + 1120): what precedes the
# ciphertext of a plain or chunked request, for size limits.
MAX_REQUEST_PREFIX_LEN: Final = REQUEST_HEADER_LEN + max(map(hpke.kem_nenc, hpke.SUPPORTED_KEMS))
_KEY_CONFIG_FIXED: Final = 3  # key_id(1) kem_id(2), then Npk, then algorithms


# --------------------------------------------------------------------------- key configs


@dataclass(frozen=True)
class SymmetricSuite:
    """One (KDF, AEAD) pair a key config offers."""

    kdf_id: int
    aead_id: int

    @property
    def supported(self) -> bool:
        return self.kdf_id in hpke.SUPPORTED_KDFS and self.aead_id in hpke.SUPPORTED_AEADS


@dataclass(frozen=True)
class KeyConfig:
    """RFC 9458 §3.1 key configuration (one gateway public key and its suites)."""

    key_id: int
    kem_id: int
    public_key: bytes
    symmetric_suites: tuple[SymmetricSuite, ...]

    def encode(self) -> bytes:
        """The bare config (no length prefix; see :func:`encode_key_configs`)."""
        if not 0 <= self.key_id <= 0xFF:
            raise EncodeError(f"key_id {self.key_id} out of range")
        if not 0 <= self.kem_id <= 0xFFFF:
            raise EncodeError(f"kem_id {self.kem_id} out of range")
        if not 1 <= len(self.symmetric_suites) <= 0xFFFF // 4:
            raise EncodeError("a key config needs 1..16383 symmetric suites")
        if self.kem_id in hpke.SUPPORTED_KEMS and len(self.public_key) != hpke.kem_npk(self.kem_id):
            raise EncodeError("public key length does not match the KEM")
        out = bytearray(struct.pack(">BH", self.key_id, self.kem_id))
        out += self.public_key
        out += struct.pack(">H", 4 * len(self.symmetric_suites))
        for s in self.symmetric_suites:
            if not (0 <= s.kdf_id <= 0xFFFF and 0 <= s.aead_id <= 0xFFFF):
                raise EncodeError("symmetric suite id out of range")
            out += struct.pack(">HH", s.kdf_id, s.aead_id)
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> KeyConfig:
        """Parse exactly one config filling ``data``.

        UnsupportedError for an unknown KEM (its public key length is unknown,
        so the rest cannot be framed); TruncatedError if ``data`` is short.
        """
        data = bytes(data)
        config, end = cls._parse_at(data, 0)
        if end != len(data):
            raise DecodeError(f"{len(data) - end} trailing bytes after key config")
        return config

    @classmethod
    def _parse_at(cls, data: bytes, offset: int) -> tuple[KeyConfig, int]:
        if len(data) - offset < _KEY_CONFIG_FIXED:
            raise TruncatedError("key config: header cut short")
        key_id, kem_id = struct.unpack_from(">BH", data, offset)
        npk = hpke.kem_npk(kem_id)  # UnsupportedError for an unknown KEM
        pos = offset + _KEY_CONFIG_FIXED
        if len(data) - pos < npk + 2:
            raise TruncatedError("key config: public key cut short")
        public_key = data[pos : pos + npk]
        pos += npk
        (alg_len,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if alg_len < 4 or alg_len % 4:
            raise DecodeError(f"key config: bad symmetric algorithms length {alg_len}")
        if len(data) - pos < alg_len:
            raise TruncatedError("key config: symmetric algorithms cut short")
        suites = tuple(
            SymmetricSuite(*struct.unpack_from(">HH", data, pos + i)) for i in range(0, alg_len, 4)
        )
        return cls(key_id, kem_id, public_key, suites), pos + alg_len

    def supports(self, kdf_id: int, aead_id: int) -> bool:
        """Whether this config offers (kdf, aead) *and* we implement it."""
        s = SymmetricSuite(kdf_id, aead_id)
        return s.supported and s in self.symmetric_suites


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """``application/ohttp-keys`` body: each config behind a 2-byte length (RFC 9458 §3.2)."""
    out = bytearray()
    for config in configs:
        raw = config.encode()
        if len(raw) > 0xFFFF:
            raise EncodeError("key config longer than 65535 bytes")
        out += struct.pack(">H", len(raw)) + raw
    if not out:
        raise EncodeError("application/ohttp-keys needs at least one key config")
    return bytes(out)


def parse_key_configs(data: bytes) -> list[KeyConfig]:
    """Parse an ``application/ohttp-keys`` body.

    Configs with a KEM we do not implement are skipped (the length prefix lets
    us step over them). UnsupportedError if none is left, so a client never
    silently ends up with no usable key.
    """
    data = bytes(data)
    if not data:
        raise TruncatedError("application/ohttp-keys: empty body")
    configs: list[KeyConfig] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise TruncatedError("application/ohttp-keys: length prefix cut short")
        (length,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if len(data) - pos < length:
            raise TruncatedError("application/ohttp-keys: key config cut short")
        chunk = data[pos : pos + length]
        pos += length
        if len(chunk) >= _KEY_CONFIG_FIXED:
            (kem_id,) = struct.unpack_from(">H", chunk, 1)
            if kem_id not in hpke.SUPPORTED_KEMS:
                continue
        try:
            configs.append(KeyConfig.parse(chunk))
        except TruncatedError as exc:
            # Within a complete length-prefixed body, a short config is malformed.
            raise DecodeError(f"application/ohttp-keys: {exc}") from exc
    if not configs:
        raise UnsupportedError("application/ohttp-keys: no key config with a supported KEM")
    return configs


# --------------------------------------------------------------------------- request header


@dataclass(frozen=True)
class RequestHeader:
    """The 7-byte ``hdr`` that starts an encapsulated request (plain or chunked)."""

    key_id: int
    kem_id: int
    kdf_id: int
    aead_id: int

    def encode(self) -> bytes:
        return struct.pack(">BHHH", self.key_id, self.kem_id, self.kdf_id, self.aead_id)

    @property
    def suite(self) -> Suite:
        """The HPKE suite this header names (UnsupportedError if we lack it)."""
        return Suite(self.kem_id, self.kdf_id, self.aead_id)


def parse_request_header(data: bytes) -> RequestHeader:
    """Parse ``hdr`` from the start of ``data`` (TruncatedError if under 7 bytes)."""
    if len(data) < REQUEST_HEADER_LEN:
        raise TruncatedError("encapsulated request: header cut short")
    return RequestHeader(*struct.unpack_from(">BHHH", bytes(data[:REQUEST_HEADER_LEN])))


def request_info(label: bytes, header: RequestHeader) -> bytes:
    """HPKE info: ``label ‖ 0x00 ‖ hdr`` (RFC 9458 §4.3)."""
    return label + b"\x00" + header.encode()


def key_kem_id(sk: PrivateKeyLike) -> int:
    """The KEM of a receiver's private key: X-Wing for a parsed X-Wing key, X25519 for
    anything else (a parsed X25519 key or raw bytes, as key maps always held)."""
    if isinstance(sk, hpke.XWingPrivateKey):
        return hpke.KEM_XWING
    return hpke.KEM_DHKEM_X25519_HKDF_SHA256


def _select_key(
    private_keys: Mapping[int, PrivateKeyLike], header: RequestHeader
) -> tuple[PrivateKeyLike, Suite]:
    """Key and suite for an incoming header; UnsupportedError for what we cannot serve.

    The header's KEM must be its key's: a key id is one key config, so a request naming
    X-Wing for an X25519 key (or the reverse) is refused like an unknown key id, before
    any KEM work (a raw X25519 key is never read as an X-Wing seed).
    """
    try:
        sk = private_keys[header.key_id]
    except KeyError:
        raise UnsupportedError(f"unknown key id {header.key_id}") from None
    if header.kem_id != key_kem_id(sk):
        raise UnsupportedError(f"key id {header.key_id} is not a KEM 0x{header.kem_id:04x} key")
    return sk, header.suite


def setup_request_sender(
    key_config: KeyConfig,
    kdf_id: int,
    aead_id: int,
    label: bytes,
    ephemeral: PrivateKeyLike | None,
) -> tuple[bytes, SenderContext]:
    """Shared client setup for plain and chunked requests: returns (hdr‖enc, context)."""
    if not key_config.supports(kdf_id, aead_id):
        raise UnsupportedError(
            f"key config {key_config.key_id} does not offer kdf {kdf_id} / aead {aead_id}"
        )
    header = RequestHeader(key_config.key_id, key_config.kem_id, kdf_id, aead_id)
    ctx = hpke.setup_sender(
        key_config.public_key,
        request_info(label, header),
        suite=header.suite,
        ephemeral=ephemeral,
    )
    return header.encode() + ctx.enc, ctx


def setup_request_receiver(
    private_keys: Mapping[int, PrivateKeyLike], data: bytes, label: bytes
) -> tuple[RequestHeader, RecipientContext, int]:
    """Shared gateway setup: parse hdr‖enc; returns (header, context, bytes consumed)."""
    header = parse_request_header(data)
    sk, suite = _select_key(private_keys, header)
    end = REQUEST_HEADER_LEN + suite.nenc
    if len(data) < end:
        raise TruncatedError("encapsulated request: enc cut short")
    ctx = hpke.setup_receiver(
        sk, bytes(data[REQUEST_HEADER_LEN:end]), request_info(label, header), suite=suite
    )
    return header, ctx, end


# --------------------------------------------------------------------------- response keys


def response_nonce_len(aead_id: int) -> int:
    """max(Nn, Nk): length of the response nonce (RFC 9458 §4.4)."""
    return max(hpke.aead_nn(aead_id), hpke.aead_nk(aead_id))


def response_aead(
    ctx: SenderContext | RecipientContext, label: bytes, response_nonce: bytes
) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
    """RFC 9458 §4.4 key schedule: returns (AEAD keyed with aead_key, aead_nonce).

    secret = Export(label, max(Nn,Nk)); salt = enc ‖ response_nonce;
    prk = Extract(salt, secret); key = Expand(prk, "key", Nk);
    nonce = Expand(prk, "nonce", Nn).
    """
    suite = ctx.suite
    if suite.kdf_id != hpke.KDF_HKDF_SHA256:  # pragma: no cover - Suite() already refuses
        raise UnsupportedError("only HKDF-SHA256 is implemented")
    secret = ctx.export(label, response_nonce_len(suite.aead_id))
    extract = hmac.HMAC(ctx.enc + response_nonce, hashes.SHA256())
    extract.update(secret)
    prk = extract.finalize()
    key = HKDFExpand(hashes.SHA256(), suite.nk, b"key").derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), suite.nn, b"nonce").derive(prk)
    aead: AESGCM | ChaCha20Poly1305 = (
        AESGCM(key) if suite.aead_id == hpke.AEAD_AES_128_GCM else ChaCha20Poly1305(key)
    )
    return aead, nonce


# --------------------------------------------------------------------------- plain OHTTP


class ClientContext:
    """What the client keeps after encapsulating a request, to open the response."""

    def __init__(self, ctx: SenderContext) -> None:
        self._ctx = ctx

    @property
    def hpke_context(self) -> SenderContext:
        return self._ctx

    def decapsulate_response(self, data: bytes) -> bytes:
        """Open a ``message/ohttp-res`` body and return the BHTTP response."""
        data = bytes(data)
        nlen = response_nonce_len(self._ctx.suite.aead_id)
        if len(data) < nlen + self._ctx.suite.nt:
            raise TruncatedError("encapsulated response shorter than nonce + tag")
        aead, nonce = response_aead(self._ctx, RESPONSE_EXPORT_LABEL, data[:nlen])
        try:
            return aead.decrypt(nonce, data[nlen:], b"")
        except InvalidTag as exc:
            raise DecryptError("OHTTP response failed to authenticate") from exc


class ServerContext:
    """What the gateway keeps after decapsulating a request, to seal its one response."""

    def __init__(self, ctx: RecipientContext, header: RequestHeader) -> None:
        self._ctx = ctx
        self._header = header
        self._responded = False

    @property
    def header(self) -> RequestHeader:
        return self._header

    @property
    def hpke_context(self) -> RecipientContext:
        return self._ctx

    def encapsulate_response(self, bhttp: bytes, *, nonce: bytes | None = None) -> bytes:
        """Seal a ``message/ohttp-res`` body. ``nonce`` injects the random value (vectors)."""
        if self._responded:
            raise StateError("this request already has a response")
        nlen = response_nonce_len(self._ctx.suite.aead_id)
        if nonce is None:
            nonce = os.urandom(nlen)
        elif len(nonce) != nlen:
            raise EncodeError(f"response nonce must be {nlen} bytes")
        aead, aead_nonce = response_aead(self._ctx, RESPONSE_EXPORT_LABEL, bytes(nonce))
        self._responded = True
        return bytes(nonce) + aead.encrypt(aead_nonce, bytes(bhttp), b"")


def encapsulate_request(
    key_config: KeyConfig,
    bhttp: bytes,
    *,
    kdf_id: int = hpke.KDF_HKDF_SHA256,
    aead_id: int = hpke.AEAD_AES_128_GCM,
    ephemeral: PrivateKeyLike | None = None,
) -> tuple[bytes, ClientContext]:
    """Client: seal ``bhttp`` into a ``message/ohttp-req`` body (hdr ‖ enc ‖ ct).

    ``ephemeral`` injects the HPKE ephemeral private key, for test vectors only.
    """
    head, ctx = setup_request_sender(key_config, kdf_id, aead_id, REQUEST_INFO_LABEL, ephemeral)
    return head + ctx.seal(bytes(bhttp)), ClientContext(ctx)


def decapsulate_request(
    private_keys: Mapping[int, PrivateKeyLike], data: bytes
) -> tuple[bytes, ServerContext]:
    """Gateway: open a ``message/ohttp-req`` body; returns (bhttp, context for the response).

    ``private_keys`` maps key_id to the private key of that config: X25519 (raw or parsed)
    or X-Wing (parsed; see the module docstring).
    """
    data = bytes(data)
    header, ctx, pos = setup_request_receiver(private_keys, data, REQUEST_INFO_LABEL)
    if len(data) - pos < ctx.suite.nt:
        raise TruncatedError("encapsulated request: ciphertext shorter than the tag")
    return ctx.open(data[pos:]), ServerContext(ctx, header)
