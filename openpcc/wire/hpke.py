"""A small typed layer over pyhpke (RFC 9180), base mode only.

Why a wrapper at all: pyhpke raises its own (and ``ValueError``) exceptions,
takes key objects rather than bytes, and does not guard its sequence number.
Everything above this module (OHTTP, chunked OHTTP, sealed requests) speaks
raw key bytes, suite ids and :mod:`openpcc.errors` only.

The crypto itself is pyhpke's; nothing here re-implements HPKE.

pyhpke quirks handled here:

* ``RecipientContext.open`` advances the sequence number *before* trying to
  decrypt, so after one failed open the context is out of step with the
  sender (RFC 9180 says a failed Open must not advance it). We poison the
  context instead: any later use raises :class:`StateError`.
* pyhpke does not enforce the RFC 9180 message limit; we do (``StateError``).
* pyhpke's Decap re-derives pkR from skR on every call and takes no pkR. With a
  parsed key object that is a cheap copy (``cryptography`` keeps the public half);
  what costs a second X25519 scalar multiplication is parsing raw key bytes
  (``from_private_bytes`` derives the public key). So a receiver that decapsulates
  often (the gateway) passes a key object from :func:`load_private_key`, once parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pyhpke import (
    AEADId,
    CipherSuite,
    ContextInterface,
    KDFId,
    KEMId,
    KEMKey,
    KEMKeyPair,
    PyHPKEError,
)

from openpcc.errors import DecodeError, DecryptError, EncodeError, StateError, UnsupportedError

__all__ = [
    "AEAD_AES_128_GCM",
    "AEAD_CHACHA20_POLY1305",
    "DEFAULT_SUITE",
    "KDF_HKDF_SHA256",
    "KEM_DHKEM_X25519_HKDF_SHA256",
    "SUPPORTED_AEADS",
    "SUPPORTED_KDFS",
    "SUPPORTED_KEMS",
    "KeyPair",
    "PrivateKeyLike",
    "PublicKeyLike",
    "RecipientContext",
    "SenderContext",
    "Suite",
    "aead_nk",
    "aead_nn",
    "aead_nt",
    "derive_key_pair",
    "generate_key_pair",
    "kdf_nh",
    "kem_nenc",
    "kem_npk",
    "kem_nsk",
    "load_private_key",
    "load_public_key",
    "public_key_from_private",
    "setup_receiver",
    "setup_sender",
]

KEM_DHKEM_X25519_HKDF_SHA256: Final = 0x0020
KDF_HKDF_SHA256: Final = 0x0001
AEAD_AES_128_GCM: Final = 0x0001
AEAD_CHACHA20_POLY1305: Final = 0x0003

# id -> (Nsecret, Nenc, Npk, Nsk)  (RFC 9180 §7.1)
_KEMS: Final[dict[int, tuple[int, int, int, int]]] = {
    KEM_DHKEM_X25519_HKDF_SHA256: (32, 32, 32, 32),
}
# id -> Nh  (RFC 9180 §7.2)
_KDFS: Final[dict[int, int]] = {KDF_HKDF_SHA256: 32}
# id -> (Nk, Nn, Nt)  (RFC 9180 §7.3)
_AEADS: Final[dict[int, tuple[int, int, int]]] = {
    AEAD_AES_128_GCM: (16, 12, 16),
    AEAD_CHACHA20_POLY1305: (32, 12, 16),
}

SUPPORTED_KEMS: Final = frozenset(_KEMS)
SUPPORTED_KDFS: Final = frozenset(_KDFS)
SUPPORTED_AEADS: Final = frozenset(_AEADS)


def _kem(kem_id: int) -> tuple[int, int, int, int]:
    try:
        return _KEMS[kem_id]
    except KeyError:
        raise UnsupportedError(f"unsupported HPKE KEM 0x{kem_id:04x}") from None


def _aead(aead_id: int) -> tuple[int, int, int]:
    try:
        return _AEADS[aead_id]
    except KeyError:
        raise UnsupportedError(f"unsupported HPKE AEAD 0x{aead_id:04x}") from None


def kem_nenc(kem_id: int) -> int:
    """Length of the encapsulated key ``enc``."""
    return _kem(kem_id)[1]


def kem_npk(kem_id: int) -> int:
    """Length of a serialised public key."""
    return _kem(kem_id)[2]


def kem_nsk(kem_id: int) -> int:
    """Length of a serialised private key."""
    return _kem(kem_id)[3]


def kdf_nh(kdf_id: int) -> int:
    """Output length of the KDF's Extract."""
    try:
        return _KDFS[kdf_id]
    except KeyError:
        raise UnsupportedError(f"unsupported HPKE KDF 0x{kdf_id:04x}") from None


def aead_nk(aead_id: int) -> int:
    """AEAD key length."""
    return _aead(aead_id)[0]


def aead_nn(aead_id: int) -> int:
    """AEAD nonce length."""
    return _aead(aead_id)[1]


def aead_nt(aead_id: int) -> int:
    """AEAD tag length."""
    return _aead(aead_id)[2]


@dataclass(frozen=True)
class Suite:
    """An HPKE ciphersuite; constructing one we do not support raises UnsupportedError."""

    kem_id: int = KEM_DHKEM_X25519_HKDF_SHA256
    kdf_id: int = KDF_HKDF_SHA256
    aead_id: int = AEAD_AES_128_GCM

    def __post_init__(self) -> None:
        _kem(self.kem_id)
        kdf_nh(self.kdf_id)
        _aead(self.aead_id)

    @property
    def nenc(self) -> int:
        return kem_nenc(self.kem_id)

    @property
    def npk(self) -> int:
        return kem_npk(self.kem_id)

    @property
    def nh(self) -> int:
        return kdf_nh(self.kdf_id)

    @property
    def nk(self) -> int:
        return aead_nk(self.aead_id)

    @property
    def nn(self) -> int:
        return aead_nn(self.aead_id)

    @property
    def nt(self) -> int:
        return aead_nt(self.aead_id)


DEFAULT_SUITE: Final = Suite()


@cache
def _cipher_suite(suite: Suite) -> CipherSuite:
    return CipherSuite.new(KEMId(suite.kem_id), KDFId(suite.kdf_id), AEADId(suite.aead_id))


@dataclass(frozen=True)
class KeyPair:
    """Raw X25519 key pair (32-byte private scalar, 32-byte public key)."""

    private_key: bytes = field(repr=False)
    public_key: bytes


PrivateKeyLike = bytes | bytearray | memoryview | X25519PrivateKey
PublicKeyLike = bytes | bytearray | memoryview | X25519PublicKey


def load_private_key(sk: PrivateKeyLike) -> X25519PrivateKey:
    """Parse a raw private key; DecodeError if it is not one."""
    if isinstance(sk, X25519PrivateKey):
        return sk
    raw = bytes(sk)
    if len(raw) != kem_nsk(KEM_DHKEM_X25519_HKDF_SHA256):
        raise DecodeError(f"X25519 private key must be 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public_key(pk: PublicKeyLike) -> X25519PublicKey:
    """Parse a raw public key; DecodeError if it is not one."""
    if isinstance(pk, X25519PublicKey):
        return pk
    raw = bytes(pk)
    if len(raw) != kem_npk(KEM_DHKEM_X25519_HKDF_SHA256):
        raise DecodeError(f"X25519 public key must be 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def _public_bytes(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes_raw()


def public_key_from_private(sk: PrivateKeyLike) -> bytes:
    """The serialised public key belonging to ``sk``."""
    return _public_bytes(load_private_key(sk).public_key())


def generate_key_pair() -> KeyPair:
    """A fresh random X25519 key pair."""
    sk = X25519PrivateKey.generate()
    return KeyPair(sk.private_bytes_raw(), _public_bytes(sk.public_key()))


def derive_key_pair(ikm: bytes, *, suite: Suite = DEFAULT_SUITE) -> KeyPair:
    """RFC 9180 DeriveKeyPair(ikm) (deterministic; used for vectors and seeded keys)."""
    if len(ikm) < kem_nsk(suite.kem_id):
        # RFC 9180 §7.1.3: ikm SHOULD have at least Nsk bytes of entropy.
        raise EncodeError("ikm shorter than the private key")
    kp = _cipher_suite(suite).kem.derive_key_pair(bytes(ikm))
    sk = load_private_key(kp.private_key.raw.private_bytes_raw())
    return KeyPair(sk.private_bytes_raw(), _public_bytes(sk.public_key()))


class _Context:
    """Shared part of sender and recipient contexts: sequence guard and Export."""

    def __init__(self, inner: ContextInterface, suite: Suite, enc: bytes) -> None:
        self._inner = inner
        self._suite = suite
        self._enc = enc
        self._seq = 0
        # RFC 9180 §5.2: refuse once seq would reach 2^(8*Nn) - 1.
        self._max_seq = (1 << (8 * suite.nn)) - 1
        self._broken = False

    @property
    def suite(self) -> Suite:
        return self._suite

    @property
    def enc(self) -> bytes:
        """The encapsulated key (the sender's ephemeral public key for DHKEM)."""
        return self._enc

    @property
    def seq(self) -> int:
        """Number of messages sealed/opened so far."""
        return self._seq

    def _check_usable(self) -> None:
        if self._broken:
            raise StateError("HPKE context unusable after a failed open")
        if self._seq >= self._max_seq:
            raise StateError("HPKE message limit reached")

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """RFC 9180 Export: a secret bound to this context, for derived keys."""
        if not 0 <= length <= 255 * self._suite.nh:
            raise EncodeError(f"export length {length} out of range")
        try:
            return bytes(self._inner.export(bytes(exporter_context), length))
        except (PyHPKEError, ValueError) as exc:  # pragma: no cover - guarded above
            raise EncodeError(f"HPKE export failed: {exc}") from exc


class SenderContext(_Context):
    """Result of SetupBaseS: seals messages in order and exports secrets."""

    def seal(self, pt: bytes, aad: bytes = b"") -> bytes:
        self._check_usable()
        try:
            ct = self._inner.seal(bytes(pt), bytes(aad))
        except PyHPKEError as exc:  # pragma: no cover - AEAD encrypt does not fail on bytes
            raise EncodeError(f"HPKE seal failed: {exc}") from exc
        self._seq += 1
        return bytes(ct)


class RecipientContext(_Context):
    """Result of SetupBaseR: opens messages in order and exports secrets."""

    def open(self, ct: bytes, aad: bytes = b"") -> bytes:
        self._check_usable()
        try:
            pt = self._inner.open(bytes(ct), bytes(aad))
        except PyHPKEError as exc:
            # pyhpke has already advanced its nonce: this context is now unusable.
            self._broken = True
            raise DecryptError("HPKE open failed") from exc
        self._seq += 1
        return bytes(pt)


def setup_sender(
    pk: PublicKeyLike,
    info: bytes,
    *,
    suite: Suite = DEFAULT_SUITE,
    ephemeral: PrivateKeyLike | None = None,
) -> SenderContext:
    """SetupBaseS(pkR, info). ``ephemeral`` injects skE, for test vectors only."""
    pkr = load_public_key(pk)
    eks: KEMKeyPair | None = None
    if ephemeral is not None:
        ske = load_private_key(ephemeral)
        eks = KEMKeyPair(
            KEMKey.from_pyca_cryptography_key(ske),
            KEMKey.from_pyca_cryptography_key(ske.public_key()),
        )
    try:
        enc, ctx = _cipher_suite(suite).create_sender_context(
            KEMKey.from_pyca_cryptography_key(pkr), bytes(info), eks=eks
        )
    except (PyHPKEError, ValueError) as exc:
        # cryptography raises ValueError for a low-order (all-zero DH) public key.
        raise DecodeError(f"HPKE encap failed: {exc}") from exc
    return SenderContext(ctx, suite, bytes(enc))


def setup_receiver(
    sk: PrivateKeyLike,
    enc: bytes,
    info: bytes,
    *,
    suite: Suite = DEFAULT_SUITE,
) -> RecipientContext:
    """SetupBaseR(enc, skR, info).

    A malformed ``enc`` is DecodeError; a low-order one (all-zero DH) is DecryptError.
    """
    skr = load_private_key(sk)
    enc = bytes(enc)
    if len(enc) != suite.nenc:
        raise DecodeError(f"enc must be {suite.nenc} bytes, got {len(enc)}")
    try:
        ctx = _cipher_suite(suite).create_recipient_context(
            enc, KEMKey.from_pyca_cryptography_key(skr), bytes(info)
        )
    except (PyHPKEError, ValueError) as exc:
        raise DecryptError("HPKE decap failed") from exc
    return RecipientContext(ctx, suite, enc)
