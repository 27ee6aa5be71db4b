"""A small typed layer over two HPKE libraries (RFC 9180), base mode only.

* DHKEM(X25519, HKDF-SHA256) ``0x0020``: pyhpke (unchanged since the start).
* MLKEM768-X25519 ``0x647A``, i.e. X-Wing (draft-connolly-cfrg-xwing-kem, used as an
  HPKE KEM by draft-ietf-hpke-pq): pycryptodome's ``Crypto.Protocol.HPKE`` with
  ``Crypto.PublicKey.Hybrid`` keys, imported on first use only (it adds ~0.1 s of
  import time that X25519-only processes do not pay).

Why a wrapper at all: the libraries raise their own (and ``ValueError``) exceptions,
take key objects rather than bytes, and pyhpke does not guard its sequence number.
Everything above this module (OHTTP, chunked OHTTP, sealed requests) speaks
raw key bytes, suite ids and :mod:`openpcc.errors` only; this is the one module
that names an HPKE library.

The crypto itself is the libraries'; nothing here re-implements a KEM or HPKE.

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

pycryptodome (4.4+) gaps for X-Wing, and the workaround used for each:

* Hybrid keys "cannot be exported or imported" (its changelog and docs say so).
  An X-Wing private key *is* its 32-byte seed (the draft's ``sk``), and the documented
  ``Hybrid.generate(param_set=..., randfunc=...)`` reads exactly that seed from
  ``randfunc``: we keep the seed and load it that way. A public key is built with the
  ``HybridKey(param_set=..., pk=...)`` constructor, whose keywords its docstring
  documents, and read back from the state that the library pickles a public key to
  (``__getstate__()["pk"]``, the ML-KEM-768 key followed by the X25519 key). Both are
  checked against the official X-Wing vectors (tests/test_hpke_xwing.py).
  Parsing costs: a private key ~0.5 ms (ML-KEM key expansion), a public key ~0.07 ms;
  the key objects of :func:`load_private_key` / :func:`load_public_key` can be reused.
* No deterministic encapsulation through ``HPKE.new`` and no HPKE ``DeriveKeyPair``
  (draft-ietf-hpke-pq's SHAKE256 ``LabeledDerive``): ``setup_sender(ephemeral=...)``
  and :func:`derive_key_pair` raise UnsupportedError for X-Wing. The vector tests
  reproduce the sender side by feeding the vector's randomness to the library's RNG.
* pycryptodome's ``unseal`` does not advance the sequence on failure (4.4+), but we
  poison the context after a failed open for both libraries alike.
* The KDF is implied by the key (HKDF-SHA256 for X-Wing): :class:`Suite` refuses any
  other KDF with X-Wing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache, lru_cache
from types import ModuleType
from typing import Any, Final

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
    "KEM_MLKEM768_X25519",
    "KEM_XWING",
    "SUPPORTED_AEADS",
    "SUPPORTED_KDFS",
    "SUPPORTED_KEMS",
    "KeyPair",
    "PrivateKey",
    "PrivateKeyLike",
    "PublicKey",
    "PublicKeyLike",
    "RecipientContext",
    "SenderContext",
    "Suite",
    "XWingPrivateKey",
    "XWingPublicKey",
    "aead_nk",
    "aead_nn",
    "aead_nt",
    "derive_key_pair",
    "generate_key_pair",
    "kdf_nh",
    "kem_name",
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
# MLKEM768-X25519 (draft-ietf-hpke-pq), the X-Wing KEM (draft-connolly-cfrg-xwing-kem).
KEM_MLKEM768_X25519: Final = 0x647A
KEM_XWING: Final = KEM_MLKEM768_X25519
KDF_HKDF_SHA256: Final = 0x0001
AEAD_AES_128_GCM: Final = 0x0001
AEAD_CHACHA20_POLY1305: Final = 0x0003

# id -> (Nsecret, Nenc, Npk, Nsk)  (RFC 9180 §7.1)
_KEMS: Final[dict[int, tuple[int, int, int, int]]] = {
    KEM_DHKEM_X25519_HKDF_SHA256: (32, 32, 32, 32),
    # Nsk: the 32-byte seed; Npk: ML-KEM-768 key (1184) + X25519 key (32);
    # Nenc: ML-KEM-768 ciphertext (1088) + X25519 ephemeral key (32).
    KEM_XWING: (32, 1120, 1216, 32),
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


_KEM_NAMES: Final = {KEM_DHKEM_X25519_HKDF_SHA256: "X25519", KEM_XWING: "X-Wing"}


def kem_name(kem_id: int) -> str:
    """A short name for logs and status lines: "X25519", "X-Wing", or the hex id."""
    return _KEM_NAMES.get(kem_id, f"KEM 0x{kem_id:04x}")


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
        if self.kem_id == KEM_XWING and self.kdf_id != KDF_HKDF_SHA256:
            # pycryptodome derives the KDF from the key: HKDF-SHA256 for X-Wing.
            raise UnsupportedError(f"unsupported HPKE KDF 0x{self.kdf_id:04x} with X-Wing")

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
    """Raw key pair: X25519 (32-byte scalar, 32-byte public key) or X-Wing (32-byte
    seed, 1216-byte public key)."""

    private_key: bytes = field(repr=False)
    public_key: bytes


# --- X-Wing keys (pycryptodome, imported on first use) ---------------------------------

_XWING_SEED_LEN: Final = 32


@cache
def _pq() -> tuple[ModuleType, ModuleType]:
    """pycryptodome's HPKE and Hybrid modules; UnsupportedError if it is missing."""
    try:
        # Imported here, not at the top: ~0.1 s that X25519-only processes skip.
        from Crypto.Protocol import HPKE
        from Crypto.PublicKey import Hybrid
    except ImportError as exc:  # pragma: no cover - pycryptodome is in the core extra
        raise UnsupportedError("X-Wing needs pycryptodome>=4.4 (pip install pycryptodome)") from exc
    if not hasattr(Hybrid, "MLKEM768_X25519"):  # pragma: no cover - pycryptodome < 4.2
        raise UnsupportedError("X-Wing needs pycryptodome>=4.4 (Crypto.PublicKey.Hybrid)")
    return HPKE, Hybrid


def _xwing_public_bytes(key: Any) -> bytes:
    """The encoded public key of a pycryptodome hybrid key (see the module docstring)."""
    raw = bytes(key.public_key().__getstate__()["pk"])
    if len(raw) != kem_npk(KEM_XWING):  # pragma: no cover - a library change
        raise UnsupportedError("pycryptodome's hybrid key state changed; update the wrapper")
    return raw


@dataclass(frozen=True, eq=False)
class XWingPrivateKey:
    """A parsed X-Wing private key: its 32-byte seed, public key and library object."""

    seed: bytes = field(repr=False)
    public_key: bytes = field(repr=False)
    _key: Any = field(repr=False)  # Crypto.PublicKey.Hybrid.HybridKey, private


@dataclass(frozen=True, eq=False)
class XWingPublicKey:
    """A parsed X-Wing public key (1216 bytes) and its library object."""

    raw: bytes = field(repr=False)
    _key: Any = field(repr=False)  # Crypto.PublicKey.Hybrid.HybridKey, public


def _xwing_private(seed: bytes) -> XWingPrivateKey:
    _, hybrid = _pq()

    def randfunc(n: int) -> bytes:
        # The documented way to give Hybrid.generate its seed (it reads 32 bytes once).
        if n != len(seed):  # pragma: no cover - a library change
            raise UnsupportedError(f"pycryptodome asked for a {n}-byte X-Wing seed")
        return seed

    key = hybrid.generate(param_set=hybrid.MLKEM768_X25519, randfunc=randfunc)
    return XWingPrivateKey(seed, _xwing_public_bytes(key), key)


@lru_cache(maxsize=64)
def _xwing_public(raw: bytes) -> XWingPublicKey:
    # Public data only: a client reuses one gateway key, a sender the same node keys.
    _, hybrid = _pq()
    try:
        key = hybrid.HybridKey(param_set=hybrid.MLKEM768_X25519, pk=raw)
    except ValueError as exc:  # an ML-KEM key not reduced mod q, or a bad X25519 point
        raise DecodeError(f"invalid X-Wing public key: {exc}") from None
    return XWingPublicKey(raw, key)


PrivateKey = X25519PrivateKey | XWingPrivateKey
PublicKey = X25519PublicKey | XWingPublicKey
PrivateKeyLike = bytes | bytearray | memoryview | X25519PrivateKey | XWingPrivateKey
PublicKeyLike = bytes | bytearray | memoryview | X25519PublicKey | XWingPublicKey


def _wrong_kem(got: int, kem_id: int) -> DecodeError:
    _kem(kem_id)  # UnsupportedError for a KEM we do not know at all
    return DecodeError(f"key is for HPKE KEM 0x{got:04x}, not 0x{kem_id:04x}")


_PARSED_KEM: Final = (
    (X25519PrivateKey, KEM_DHKEM_X25519_HKDF_SHA256),
    (X25519PublicKey, KEM_DHKEM_X25519_HKDF_SHA256),
    (XWingPrivateKey, KEM_XWING),
    (XWingPublicKey, KEM_XWING),
)


def _parsed(key: object, kem_id: int | None) -> bool:
    """True if ``key`` is already a parsed key object (of ``kem_id``, when given; else
    DecodeError); False for raw bytes, which the caller parses."""
    for cls, kem in _PARSED_KEM:
        if isinstance(key, cls):
            if kem_id is not None and kem_id != kem:
                raise _wrong_kem(kem, kem_id)
            return True
    return False


def load_private_key(sk: PrivateKeyLike, *, kem_id: int | None = None) -> PrivateKey:
    """Parse a raw private key; DecodeError if it is not one.

    Raw bytes are X25519 unless ``kem_id`` says otherwise (both are 32 bytes); a parsed
    key object is returned as is, after checking it against ``kem_id``.
    """
    if _parsed(sk, kem_id):
        return sk  # type: ignore[return-value]
    raw = bytes(sk)  # type: ignore[arg-type]
    if kem_id is None or kem_id == KEM_DHKEM_X25519_HKDF_SHA256:
        if len(raw) != kem_nsk(KEM_DHKEM_X25519_HKDF_SHA256):
            raise DecodeError(f"X25519 private key must be 32 bytes, got {len(raw)}")
        return X25519PrivateKey.from_private_bytes(raw)
    nsk = kem_nsk(kem_id)  # UnsupportedError for an unknown KEM
    if len(raw) != nsk:
        raise DecodeError(f"X-Wing private key (seed) must be {nsk} bytes, got {len(raw)}")
    return _xwing_private(raw)


def load_public_key(pk: PublicKeyLike, *, kem_id: int | None = None) -> PublicKey:
    """Parse a raw public key; DecodeError if it is not one.

    Raw bytes are X25519 unless ``kem_id`` says otherwise; a parsed key object is
    returned as is, after checking it against ``kem_id``.
    """
    if _parsed(pk, kem_id):
        return pk  # type: ignore[return-value]
    raw = bytes(pk)  # type: ignore[arg-type]
    if kem_id is None or kem_id == KEM_DHKEM_X25519_HKDF_SHA256:
        if len(raw) != kem_npk(KEM_DHKEM_X25519_HKDF_SHA256):
            raise DecodeError(f"X25519 public key must be 32 bytes, got {len(raw)}")
        return X25519PublicKey.from_public_bytes(raw)
    npk = kem_npk(kem_id)  # UnsupportedError for an unknown KEM
    if len(raw) != npk:
        raise DecodeError(f"X-Wing public key must be {npk} bytes, got {len(raw)}")
    return _xwing_public(raw)


def _public_bytes(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes_raw()


def public_key_from_private(sk: PrivateKeyLike, *, kem_id: int | None = None) -> bytes:
    """The serialised public key belonging to ``sk``."""
    key = load_private_key(sk, kem_id=kem_id)
    if isinstance(key, XWingPrivateKey):
        return key.public_key
    return _public_bytes(key.public_key())


def generate_key_pair(*, kem_id: int = KEM_DHKEM_X25519_HKDF_SHA256) -> KeyPair:
    """A fresh random key pair (X25519 unless ``kem_id`` says otherwise)."""
    if kem_id == KEM_XWING:
        key = _xwing_private(os.urandom(_XWING_SEED_LEN))
        return KeyPair(key.seed, key.public_key)
    _kem(kem_id)
    sk = X25519PrivateKey.generate()
    return KeyPair(sk.private_bytes_raw(), _public_bytes(sk.public_key()))


def derive_key_pair(ikm: bytes, *, suite: Suite = DEFAULT_SUITE) -> KeyPair:
    """RFC 9180 DeriveKeyPair(ikm) (deterministic; used for vectors and seeded keys).

    X25519 only: pycryptodome has no HPKE DeriveKeyPair for X-Wing (UnsupportedError).
    A deterministic X-Wing key is its 32-byte seed: ``load_private_key(seed,
    kem_id=KEM_XWING)`` (the KEM's own key generation from a seed).
    """
    if suite.kem_id == KEM_XWING:
        raise UnsupportedError("HPKE DeriveKeyPair is not available for X-Wing (pycryptodome)")
    if len(ikm) < kem_nsk(suite.kem_id):
        # RFC 9180 §7.1.3: ikm SHOULD have at least Nsk bytes of entropy.
        raise EncodeError("ikm shorter than the private key")
    kp = _cipher_suite(suite).kem.derive_key_pair(bytes(ikm))
    sk = X25519PrivateKey.from_private_bytes(kp.private_key.raw.private_bytes_raw())
    return KeyPair(sk.private_bytes_raw(), _public_bytes(sk.public_key()))


class _BackendError(Exception):
    """A pycryptodome context refused (ValueError), before our typed error is raised."""


class _PycryptodomeContext:
    """pycryptodome's HPKE_Cipher with pyhpke's context method names (seal/open/export)."""

    __slots__ = ("_cipher",)

    def __init__(self, cipher: Any) -> None:
        self._cipher = cipher

    def seal(self, pt: bytes, aad: bytes) -> bytes:
        try:
            return bytes(self._cipher.seal(pt, aad))
        except ValueError as exc:  # pragma: no cover - guarded by _Context
            raise _BackendError(str(exc)) from exc

    def open(self, ct: bytes, aad: bytes) -> bytes:
        try:
            return bytes(self._cipher.unseal(ct, aad))
        except ValueError as exc:
            raise _BackendError(str(exc)) from exc

    def export(self, exporter_context: bytes, length: int) -> bytes:
        try:
            return bytes(self._cipher.export(exporter_context, length))
        except ValueError as exc:  # pragma: no cover - guarded by _Context
            raise _BackendError(str(exc)) from exc


class _Context:
    """Shared part of sender and recipient contexts: sequence guard and Export."""

    def __init__(
        self, inner: ContextInterface | _PycryptodomeContext, suite: Suite, enc: bytes
    ) -> None:
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
        """The encapsulated key (the sender's ephemeral public key for DHKEM; the ML-KEM
        ciphertext followed by the ephemeral X25519 key for X-Wing)."""
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
        except (PyHPKEError, ValueError, _BackendError) as exc:  # pragma: no cover - guarded
            raise EncodeError(f"HPKE export failed: {exc}") from exc


class SenderContext(_Context):
    """Result of SetupBaseS: seals messages in order and exports secrets."""

    def seal(self, pt: bytes, aad: bytes = b"") -> bytes:
        self._check_usable()
        try:
            ct = self._inner.seal(bytes(pt), bytes(aad))
        except (PyHPKEError, _BackendError) as exc:  # pragma: no cover - AEAD encrypt on bytes
            raise EncodeError(f"HPKE seal failed: {exc}") from exc
        self._seq += 1
        return bytes(ct)


class RecipientContext(_Context):
    """Result of SetupBaseR: opens messages in order and exports secrets."""

    def open(self, ct: bytes, aad: bytes = b"") -> bytes:
        self._check_usable()
        try:
            pt = self._inner.open(bytes(ct), bytes(aad))
        except (PyHPKEError, _BackendError) as exc:
            # pyhpke has already advanced its nonce: this context is now unusable
            # (pycryptodome has not, but both libraries get the same rule).
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
    """SetupBaseS(pkR, info). ``ephemeral`` injects skE, for test vectors only (X25519)."""
    if suite.kem_id == KEM_XWING:
        return _setup_sender_xwing(pk, info, suite, ephemeral)
    pkr = load_public_key(pk, kem_id=suite.kem_id)
    assert isinstance(pkr, X25519PublicKey)
    eks: KEMKeyPair | None = None
    if ephemeral is not None:
        ske = load_private_key(ephemeral, kem_id=suite.kem_id)
        assert isinstance(ske, X25519PrivateKey)
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
    For X-Wing, an ``enc`` whose X25519 part is refused is DecryptError too; a wrong
    ML-KEM part decapsulates to another secret (implicit rejection), so the first open
    fails (DecryptError).
    """
    enc = bytes(enc)
    if suite.kem_id == KEM_XWING:
        return _setup_receiver_xwing(sk, enc, info, suite)
    skr = load_private_key(sk, kem_id=suite.kem_id)
    assert isinstance(skr, X25519PrivateKey)
    if len(enc) != suite.nenc:
        raise DecodeError(f"enc must be {suite.nenc} bytes, got {len(enc)}")
    try:
        ctx = _cipher_suite(suite).create_recipient_context(
            enc, KEMKey.from_pyca_cryptography_key(skr), bytes(info)
        )
    except (PyHPKEError, ValueError) as exc:
        raise DecryptError("HPKE decap failed") from exc
    return RecipientContext(ctx, suite, enc)


def _setup_sender_xwing(
    pk: PublicKeyLike, info: bytes, suite: Suite, ephemeral: PrivateKeyLike | None
) -> SenderContext:
    if ephemeral is not None:
        raise UnsupportedError("pycryptodome has no deterministic X-Wing encapsulation")
    pkr = load_public_key(pk, kem_id=KEM_XWING)
    assert isinstance(pkr, XWingPublicKey)
    hpke_mod, _ = _pq()
    try:
        cipher = hpke_mod.new(receiver_key=pkr._key, aead_id=suite.aead_id, info=bytes(info))
    except ValueError as exc:  # pragma: no cover - the key was checked when parsed
        raise DecodeError(f"HPKE encap failed: {exc}") from exc
    return SenderContext(_PycryptodomeContext(cipher), suite, bytes(cipher.enc))


def _setup_receiver_xwing(
    sk: PrivateKeyLike, enc: bytes, info: bytes, suite: Suite
) -> RecipientContext:
    skr = load_private_key(sk, kem_id=KEM_XWING)
    assert isinstance(skr, XWingPrivateKey)
    if len(enc) != suite.nenc:
        raise DecodeError(f"enc must be {suite.nenc} bytes, got {len(enc)}")
    hpke_mod, _ = _pq()
    try:
        cipher = hpke_mod.new(
            receiver_key=skr._key, aead_id=suite.aead_id, enc=enc, info=bytes(info)
        )
    except ValueError as exc:  # DeserializeError: the X25519 point of enc was refused
        raise DecryptError("HPKE decap failed") from exc
    return RecipientContext(_PycryptodomeContext(cipher), suite, enc)
