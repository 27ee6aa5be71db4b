"""RSA blind signatures, RFC 9474 (RSABSSA), all four named variants.

No maintained PyPI package implements RFC 9474, so the protocol steps are ours;
everything a well-kept library already does is delegated to ``cryptography``:
key generation, key (de)serialisation, and the final RSASSA-PSS verification
inside ``finalize``/``verify`` (a blind signature *is* a standard PSS signature
once unblinded, so verifying it with OpenSSL is both simpler and a cross-check).

Steps (RFC 9474 §4): ``prepare`` → ``blind`` (client) → ``blind_sign`` (server)
→ ``finalize`` (client) → ``verify`` (anyone). ``prepare`` is separate, as in
the RFC, because ``finalize`` and ``verify`` both need the prepared message.

Side channels — what this module can and cannot promise
--------------------------------------------------------
``blind_sign`` applies the private key to a message the *client chose*, so it is
a remote RSA decryption oracle and the classic remote timing attacks apply
(RFC 9474 §7.1 asks for mitigations such as RSA blinding). Two backends do the
private operation (``OPENPCC_RSA_BACKEND`` or ``backend=``: ``openssl``, ``gmpy2``,
default ``auto``: OpenSSL where it loads):

- **openssl** (``rsa_openssl``): the system libcrypto's own RSA private operation,
  which blinds the input, runs a constant-time CRT exponentiation and checks its
  result; faster than gmpy2 (0.3 of OpenSSL's speed here), and it releases the GIL.
- **gmpy2**, the fallback: (1) the two CRT exponentiations use ``gmpy2.powmod_sec``
  (GMP ``mpz_powm_sec``), whose run time and memory access pattern do not depend on
  the secret exponent ``dP``/``dQ`` (plain ``powmod`` uses a sliding window and is
  *not* constant time); (2) we blind the input ourselves (``m·u^e mod n`` for a fresh
  random ``u``, unblinded by ``u^-1``), as OpenSSL does, so the variable-time
  reductions and CRT recombination on Python/GMP integers see values independent of
  the client's input, which is what attacks such as Brumley-Boneh need.

Both: the result is checked with ``s^e == m mod n`` before it is returned (RFC 9474
§4.3 steps 3-4), so a faulty CRT half cannot leak a factor of ``n`` (Bellcore attack).

What we cannot promise: CPython integers, ``int.to_bytes``/``from_bytes``,
``pow(x, -1, n)`` and GMP's division are variable time, and the interpreter
itself adds noise but no guarantees; cache-timing resistance of GMP is "best
effort" upstream. Client-side operations (``blind``/``finalize``) handle only
public values plus the blinding factor ``r``; ``r``'s inverse is computed with
variable-time arithmetic, which leaks at most about a random value that never
leaves the client's process. For hard guarantees beyond OpenSSL's, run the issuer's
private operation in an HSM.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import Final

import gmpy2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from openpcc.errors import DecodeError, EncodeError, OpenPCCError, VerificationError
from openpcc.privacypass import rsa_openssl

__all__ = [
    "PREFIX_LEN",
    "RSABSSA_SHA384_PSSZERO_DETERMINISTIC",
    "RSABSSA_SHA384_PSSZERO_RANDOMIZED",
    "RSABSSA_SHA384_PSS_DETERMINISTIC",
    "RSABSSA_SHA384_PSS_RANDOMIZED",
    "RSA_BACKENDS",
    "RSA_BACKEND_ENV",
    "VARIANTS",
    "BlindRSAVariant",
    "PrivateKey",
    "PublicKey",
    "RSABackendError",
    "blind",
    "blind_sign",
    "emsa_pss_encode",
    "finalize",
    "prepare",
    "rsa_backend",
    "verify",
]

HASH_LEN: Final = 48  # SHA-384
PREFIX_LEN: Final = 32  # RFC 9474 §4.1 PrepareRandomize
RSA_BACKEND_ENV: Final = "OPENPCC_RSA_BACKEND"
RSA_BACKENDS: Final = ("openssl", "gmpy2")


class RSABackendError(OpenPCCError, ValueError):
    """An RSA backend name that is not ``auto``, ``openssl`` or ``gmpy2``."""


def rsa_backend(name: str | None = None) -> str:
    """The backend ``blind_sign`` uses: ``name``, else ``OPENPCC_RSA_BACKEND``, else
    ``auto`` (OpenSSL where libcrypto loads, gmpy2 otherwise). Asking for ``openssl``
    where it cannot load raises ``rsa_openssl.OpenSSLUnavailableError``: a service
    told to use it should not start without it."""
    choice = (name or os.environ.get(RSA_BACKEND_ENV) or "auto").strip().lower()
    if choice == "auto":
        return "openssl" if rsa_openssl.available() else "gmpy2"
    if choice == "openssl":
        rsa_openssl.libcrypto()
    elif choice != "gmpy2":
        raise RSABackendError(f"RSA backend {choice!r}: use auto, openssl or gmpy2")
    return choice


@dataclass(frozen=True)
class BlindRSAVariant:
    """One RFC 9474 §5 named variant: SHA-384, MGF1-SHA-384, salt length, prepare."""

    name: str
    salt_len: int
    randomized: bool

    def pss_padding(self) -> padding.PSS:
        """The standard RSASSA-PSS parameters a finalized signature verifies under."""
        return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=self.salt_len)


RSABSSA_SHA384_PSS_RANDOMIZED: Final = BlindRSAVariant("RSABSSA-SHA384-PSS-Randomized", 48, True)
RSABSSA_SHA384_PSSZERO_RANDOMIZED: Final = BlindRSAVariant(
    "RSABSSA-SHA384-PSSZERO-Randomized", 0, True
)
RSABSSA_SHA384_PSS_DETERMINISTIC: Final = BlindRSAVariant(
    "RSABSSA-SHA384-PSS-Deterministic", 48, False
)
RSABSSA_SHA384_PSSZERO_DETERMINISTIC: Final = BlindRSAVariant(
    "RSABSSA-SHA384-PSSZERO-Deterministic", 0, False
)
VARIANTS: Final[dict[str, BlindRSAVariant]] = {
    v.name: v
    for v in (
        RSABSSA_SHA384_PSS_RANDOMIZED,
        RSABSSA_SHA384_PSSZERO_RANDOMIZED,
        RSABSSA_SHA384_PSS_DETERMINISTIC,
        RSABSSA_SHA384_PSSZERO_DETERMINISTIC,
    )
}


class PublicKey:
    """An RSA public key (wraps ``cryptography``'s) with the integers blind RSA needs."""

    __slots__ = ("_key", "e", "modulus_bits", "modulus_len", "n")

    def __init__(self, key: rsa.RSAPublicKey) -> None:
        if not isinstance(key, rsa.RSAPublicKey):
            raise EncodeError("PublicKey needs a cryptography RSAPublicKey")
        nums = key.public_numbers()
        self._key = key
        self.n: int = nums.n
        self.e: int = nums.e
        self.modulus_bits: int = self.n.bit_length()
        self.modulus_len: int = (self.modulus_bits + 7) // 8

    @property
    def key(self) -> rsa.RSAPublicKey:
        return self._key

    @classmethod
    def from_der(cls, der: bytes) -> PublicKey:
        """Load a DER SubjectPublicKeyInfo (rsaEncryption or id-RSASSA-PSS) or PKCS#1 key."""
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"not a DER RSA public key: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise DecodeError("not an RSA public key")
        return cls(key)

    def to_pkcs1_der(self) -> bytes:
        """PKCS#1 RSAPublicKey DER (the BIT STRING payload of an SPKI)."""
        return self._key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and (self.n, self.e) == (other.n, other.e)

    def __hash__(self) -> int:
        return hash((self.n, self.e))

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.modulus_bits}, e={self.e})"


class PrivateKey:
    """An RSA private key with its CRT values as ``gmpy2`` integers for ``blind_sign``,
    and, made on first use, its libcrypto twin for the OpenSSL backend."""

    __slots__ = ("_dp", "_dq", "_key", "_n", "_native", "_p", "_q", "_qinv", "public_key")

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise EncodeError("PrivateKey needs a cryptography RSAPrivateKey")
        nums = key.private_numbers()
        self._key = key
        self.public_key = PublicKey(key.public_key())
        self._n = gmpy2.mpz(nums.public_numbers.n)
        self._p = gmpy2.mpz(nums.p)
        self._q = gmpy2.mpz(nums.q)
        self._dp = gmpy2.mpz(nums.dmp1)
        self._dq = gmpy2.mpz(nums.dmq1)
        self._qinv = gmpy2.mpz(nums.iqmp)  # q^-1 mod p
        self._native: rsa_openssl.NativeRSAKey | None = None

    @property
    def key(self) -> rsa.RSAPrivateKey:
        return self._key

    def native(self) -> rsa_openssl.NativeRSAKey:
        """The key in libcrypto, made once per process (a forked child makes its own)."""
        native = self._native
        if native is None or native.generation != rsa_openssl.generation():
            der = self._key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            native = self._native = rsa_openssl.NativeRSAKey(der, self.public_key.modulus_bits)
        return native

    @classmethod
    def generate(cls, bits: int = 2048) -> PrivateKey:
        """A fresh key from OpenSSL (e = 65537); Privacy Pass type 2 needs 2048 bits."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def from_pem(cls, pem: bytes, password: bytes | None = None) -> PrivateKey:
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"not a PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DecodeError("not an RSA private key")
        return cls(key)

    def to_pkcs8_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, for storage the caller protects (file mode, KMS...)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:  # never print key material
        return f"PrivateKey(bits={self.public_key.modulus_bits})"


PublicKeyLike = PublicKey | rsa.RSAPublicKey
PrivateKeyLike = PrivateKey | rsa.RSAPrivateKey


def _pub(pk: PublicKeyLike) -> PublicKey:
    return pk if isinstance(pk, PublicKey) else PublicKey(pk)


def _priv(sk: PrivateKeyLike) -> PrivateKey:
    return sk if isinstance(sk, PrivateKey) else PrivateKey(sk)


def _mgf1_sha384(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha384(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def emsa_pss_encode(msg: bytes, em_bits: int, salt: bytes) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 §9.1.1) with SHA-384 and MGF1-SHA-384.

    Exposed with an explicit salt so the RFC vectors can be reproduced; callers
    normally let ``blind`` draw the salt.
    """
    em_len = (em_bits + 7) // 8
    if em_len < HASH_LEN + len(salt) + 2:
        raise EncodeError("encoding error: modulus too small for SHA-384 PSS")
    m_hash = hashlib.sha384(msg).digest()
    h = hashlib.sha384(b"\x00" * 8 + m_hash + salt).digest()
    db = b"\x00" * (em_len - len(salt) - HASH_LEN - 2) + b"\x01" + salt
    mask = _mgf1_sha384(h, em_len - HASH_LEN - 1)
    masked = bytearray(a ^ b for a, b in zip(db, mask, strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


def prepare(msg: bytes, variant: BlindRSAVariant, *, prefix: bytes | None = None) -> bytes:
    """RFC 9474 §4.1: identity (Deterministic) or 32 random bytes ‖ msg (Randomized).

    The result is what ``blind``, ``finalize`` and ``verify`` take as ``msg``.
    ``prefix`` injects the random prefix (test vectors only).
    """
    if not variant.randomized:
        if prefix:
            raise EncodeError(f"{variant.name} takes no message prefix")
        return bytes(msg)
    if prefix is None:
        prefix = secrets.token_bytes(PREFIX_LEN)
    elif len(prefix) != PREFIX_LEN:
        raise EncodeError(f"message prefix must be {PREFIX_LEN} bytes")
    return bytes(prefix) + bytes(msg)


def blind(
    pk: PublicKeyLike,
    msg: bytes,
    variant: BlindRSAVariant,
    *,
    r: int | bytes | None = None,
    salt: bytes | None = None,
) -> tuple[bytes, bytes]:
    """RFC 9474 §4.2 Blind over the *prepared* message; returns ``(blinded_msg, inv)``.

    ``r`` (the blind) and ``salt`` are injectable for test vectors only; by
    default both come from ``secrets``. ``inv`` is secret client state.
    """
    pub = _pub(pk)
    n = pub.n
    if salt is None:
        salt = secrets.token_bytes(variant.salt_len)
    elif len(salt) != variant.salt_len:
        raise EncodeError(f"{variant.name} needs a {variant.salt_len}-byte salt")
    encoded = emsa_pss_encode(msg, pub.modulus_bits - 1, salt)
    m = int.from_bytes(encoded, "big")
    if gmpy2.gcd(m, n) != 1:
        raise EncodeError("invalid input: encoded message not coprime to n")
    if r is None:
        r_int = secrets.randbelow(n - 1) + 1
    else:
        r_int = int.from_bytes(r, "big") if isinstance(r, bytes | bytearray) else int(r)
        if not 1 <= r_int < n:
            raise EncodeError("blind r out of range")
    try:
        inv = int(gmpy2.invert(r_int, n))
    except ZeroDivisionError:
        raise EncodeError("blinding error: r not invertible mod n") from None
    z = m * int(gmpy2.powmod(r_int, pub.e, n)) % n
    k = pub.modulus_len
    return z.to_bytes(k, "big"), inv.to_bytes(k, "big")


def _rsasp1_crt(sk: PrivateKey, m: gmpy2.mpz) -> gmpy2.mpz:
    """Private RSA operation by CRT; secret exponents go through ``powmod_sec``."""
    s1 = gmpy2.powmod_sec(m % sk._p, sk._dp, sk._p)
    s2 = gmpy2.powmod_sec(m % sk._q, sk._dq, sk._q)
    h = (sk._qinv * (s1 - s2)) % sk._p
    return s2 + h * sk._q


def blind_sign(sk: PrivateKeyLike, blinded_msg: bytes, *, backend: str | None = None) -> bytes:
    """RFC 9474 §4.3 BlindSign: blinded_msg^d mod n, blinded, with a fault check.

    ``backend``: ``openssl`` or ``gmpy2`` (default: ``rsa_backend()``). Raises
    DecodeError for a wrong-length or out-of-range input and VerificationError if the
    result fails ``s^e == m`` (a computation fault).
    """
    key = _priv(sk)
    pub = key.public_key
    if len(blinded_msg) != pub.modulus_len:
        raise DecodeError(f"blinded message must be {pub.modulus_len} bytes")
    n = key._n
    m = gmpy2.mpz(int.from_bytes(blinded_msg, "big"))
    if m >= n:
        raise DecodeError("message representative out of range")
    out: bytes | None = None
    if (backend or rsa_backend()) == "openssl":
        out = key.native().private_op(bytes(blinded_msg))
        s = gmpy2.mpz(int.from_bytes(out, "big"))
    else:
        s = _gmpy2_private_op(key, m)
    if gmpy2.powmod(s, pub.e, n) != m:
        raise VerificationError("signing failure (fault check s^e != m)")
    return out if out is not None else int(s).to_bytes(pub.modulus_len, "big")


def _gmpy2_private_op(key: PrivateKey, m: gmpy2.mpz) -> gmpy2.mpz:
    """``m^d mod n`` with our own base blinding (see module docstring): sign ``m·u^e``,
    multiply by ``u^-1``."""
    n = key._n
    while True:
        u = gmpy2.mpz(secrets.randbelow(int(n) - 2) + 2)
        try:
            u_inv = gmpy2.invert(u, n)
        except ZeroDivisionError:  # pragma: no cover - u shares a factor with n
            continue
        break
    return (_rsasp1_crt(key, (m * gmpy2.powmod(u, key.public_key.e, n)) % n) * u_inv) % n


def finalize(
    pk: PublicKeyLike, msg: bytes, blind_sig: bytes, inv: bytes, variant: BlindRSAVariant
) -> bytes:
    """RFC 9474 §4.4 Finalize: unblind and verify; returns the PSS signature over ``msg``."""
    pub = _pub(pk)
    k = pub.modulus_len
    if len(blind_sig) != k or len(inv) != k:
        raise DecodeError(f"blind signature and inverse must be {k} bytes")
    z = int.from_bytes(blind_sig, "big")
    s = z * int.from_bytes(inv, "big") % pub.n
    sig = s.to_bytes(k, "big")
    verify(pub, msg, sig, variant)
    return sig


def verify(pk: PublicKeyLike, msg: bytes, sig: bytes, variant: BlindRSAVariant) -> None:
    """RFC 9474 §4.5: standard RSASSA-PSS-VERIFY (by ``cryptography``) over the prepared msg."""
    pub = _pub(pk)
    if len(sig) != pub.modulus_len:
        raise VerificationError(f"signature must be {pub.modulus_len} bytes")
    try:
        pub.key.verify(sig, msg, variant.pss_padding(), hashes.SHA384())
    except InvalidSignature:
        raise VerificationError("invalid signature") from None
