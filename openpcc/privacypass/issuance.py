"""Privacy Pass issuance, RFC 9578 §6: token type 0x0002 (Blind RSA, 2048-bit), sans-IO.

Wire formats::

    TokenRequest  = token_type(2) = 0x0002 ‖ truncated_token_key_id(1) ‖ blinded_msg(256)  = 259 B
    TokenResponse = blind_sig(256)                                                        = 256 B
    Token         = token_input(98) ‖ authenticator(256)                                  = 354 B
    token_input   = 0x0002 ‖ nonce(32) ‖ SHA-256(TokenChallenge)(32) ‖ token_key_id(32)

The issuer key is RSABSSA-SHA384-PSS-Deterministic over 2048-bit RSA, published
as a DER SubjectPublicKeyInfo with the id-RSASSA-PSS OID and explicit PSS
parameters (RFC 9578 §6.5, RFC 4055): 342 bytes. ``token_key_id`` is SHA-256 of
exactly those bytes, and the request carries its last byte.

Type 0x0001 (VOPRF) is not implemented: its requests and tokens decode to
UnsupportedError, never a crash.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import rsa

from openpcc.errors import (
    DecodeError,
    EncodeError,
    TruncatedError,
    UnsupportedError,
    VerificationError,
)
from openpcc.privacypass import blindrsa
from openpcc.privacypass.auth import (
    NONCE_LEN,
    TOKEN_TYPE_BLIND_RSA,
    TOKEN_TYPE_VOPRF,
    Token,
    TokenChallenge,
    authenticator_input,
    challenge_digest,
)

__all__ = [
    "NK",
    "TOKEN_REQUEST_LEN",
    "TOKEN_TYPE_BLIND_RSA",
    "VARIANT",
    "ClientState",
    "IssuerKey",
    "TokenRequest",
    "TokenResponse",
    "begin_token_request",
    "decode_token_key",
    "encode_token_key",
    "finalize_token",
    "issue",
    "token_key_id",
    "verify_token",
]

NK: Final = 256  # RSA-2048 modulus bytes
MODULUS_BITS: Final = 2048
TOKEN_REQUEST_LEN: Final = 2 + 1 + NK
VARIANT: Final = blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC

# AlgorithmIdentifier { id-RSASSA-PSS, RSASSA-PSS-params { hashAlgorithm [0] sha384,
#   maskGenAlgorithm [1] mgf1(sha384), saltLength [2] 48 } } in DER (RFC 4055 §3.1).
# Fixed bytes: RFC 9578 §6.5 pins every parameter, and this is how the RFC test
# key and privacypass-ts encode it (hash AlgorithmIdentifiers without NULL).
_SHA384_ALG: Final = bytes.fromhex("300b0609608648016503040202")
_PSS_ALG_ID: Final = (
    bytes.fromhex("303d06092a864886f70d01010a3030")  # SEQ, OID 1.2.840.113549.1.1.10, SEQ
    + bytes.fromhex("a00d")
    + _SHA384_ALG
    + bytes.fromhex("a11a301806092a864886f70d010108")  # [1] SEQ OID mgf1
    + _SHA384_ALG
    + bytes.fromhex("a203020130")  # [2] INTEGER 48
)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _read_tlv(buf: bytes, pos: int, tag: int, what: str) -> tuple[bytes, int]:
    """Read one DER TLV with minimal length encoding; return ``(body, next_pos)``."""
    if pos + 2 > len(buf):
        raise TruncatedError(f"{what}: truncated")
    if buf[pos] != tag:
        raise DecodeError(f"{what}: expected tag 0x{tag:02x}, got 0x{buf[pos]:02x}")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        nbytes = first & 0x7F
        if nbytes == 0 or nbytes > 4 or pos + nbytes > len(buf):
            raise DecodeError(f"{what}: bad length")
        length = int.from_bytes(buf[pos : pos + nbytes], "big")
        if buf[pos] == 0 or length < 0x80:
            raise DecodeError(f"{what}: non-minimal length")
        pos += nbytes
    end = pos + length
    if end > len(buf):
        raise TruncatedError(f"{what}: truncated")
    return buf[pos:end], end


PublicKeyInput = blindrsa.PublicKey | rsa.RSAPublicKey | bytes


def encode_token_key(pk: blindrsa.PublicKey | rsa.RSAPublicKey) -> bytes:
    """DER SPKI with id-RSASSA-PSS (SHA-384, MGF1-SHA-384, salt 48) around PKCS#1 from OpenSSL."""
    pub = pk if isinstance(pk, blindrsa.PublicKey) else blindrsa.PublicKey(pk)
    bit_string = _der_tlv(0x03, b"\x00" + pub.to_pkcs1_der())
    return _der_tlv(0x30, _PSS_ALG_ID + bit_string)


def decode_token_key(der: bytes) -> blindrsa.PublicKey:
    """Parse a type-2 token key strictly: exact PSS parameters, RSA-2048, canonical DER."""
    der = bytes(der)
    body, end = _read_tlv(der, 0, 0x30, "SubjectPublicKeyInfo")
    if end != len(der):
        raise DecodeError("token key: trailing bytes")
    if not body.startswith(_PSS_ALG_ID):
        raise UnsupportedError("token key is not id-RSASSA-PSS with SHA-384/MGF1-SHA-384/48")
    bits, end = _read_tlv(body, len(_PSS_ALG_ID), 0x03, "subjectPublicKey")
    if end != len(body):
        raise DecodeError("token key: trailing bytes in SPKI")
    if not bits or bits[0] != 0:
        raise DecodeError("token key: BIT STRING with unused bits")
    pkcs1 = bits[1:]
    # PKCS#1 RSAPublicKey is a SEQUENCE; check the tag so cryptography never
    # sees (and maybe accepts) an SPKI nested inside the BIT STRING.
    if not pkcs1 or pkcs1[0] != 0x30:
        raise DecodeError("token key: BIT STRING does not hold an RSAPublicKey")
    pub = blindrsa.PublicKey.from_der(pkcs1)
    if pub.modulus_bits != MODULUS_BITS:
        raise UnsupportedError(f"token key is {pub.modulus_bits}-bit RSA, type 2 needs 2048")
    if encode_token_key(pub) != der:  # rejects any non-canonical DER of the integers
        raise DecodeError("token key: non-canonical DER")
    return pub


@functools.lru_cache(maxsize=64)
def _decode_cached(der: bytes) -> blindrsa.PublicKey:
    # A gateway verifies many tokens under the same few keys: parse each once.
    return decode_token_key(der)


def _token_key_bytes(pk: PublicKeyInput) -> tuple[blindrsa.PublicKey, bytes]:
    if isinstance(pk, bytes | bytearray):
        return _decode_cached(bytes(pk)), bytes(pk)
    pub = pk if isinstance(pk, blindrsa.PublicKey) else blindrsa.PublicKey(pk)
    if pub.modulus_bits != MODULUS_BITS:
        raise UnsupportedError("token type 2 needs a 2048-bit RSA key")
    return pub, encode_token_key(pub)


def token_key_id(pk: PublicKeyInput) -> bytes:
    """SHA-256 over the encoded token key (RFC 9578 §6.5); bytes input is the encoding."""
    _, der = _token_key_bytes(pk)
    return hashlib.sha256(der).digest()


class IssuerKey:
    """An issuer's private key with its encoded token key and key ids precomputed."""

    __slots__ = ("private_key", "public_key", "token_key", "token_key_id", "truncated_key_id")

    def __init__(self, sk: blindrsa.PrivateKey | rsa.RSAPrivateKey) -> None:
        self.private_key = sk if isinstance(sk, blindrsa.PrivateKey) else blindrsa.PrivateKey(sk)
        self.public_key, self.token_key = _token_key_bytes(self.private_key.public_key)
        self.token_key_id = hashlib.sha256(self.token_key).digest()
        self.truncated_key_id = self.token_key_id[-1]

    @classmethod
    def generate(cls) -> IssuerKey:
        return cls(blindrsa.PrivateKey.generate(MODULUS_BITS))

    def __repr__(self) -> str:
        return f"IssuerKey(token_key_id={self.token_key_id.hex()})"


def _check_type(token_type: int, what: str) -> None:
    if token_type == TOKEN_TYPE_BLIND_RSA:
        return
    if token_type == TOKEN_TYPE_VOPRF:
        raise UnsupportedError(f"{what}: token type 0x0001 (VOPRF) is not implemented")
    raise UnsupportedError(f"{what}: unknown token type 0x{token_type:04x}")


@dataclass(frozen=True)
class TokenRequest:
    """RFC 9578 §6.1 TokenRequest for type 0x0002."""

    truncated_token_key_id: int
    blinded_msg: bytes
    token_type: int = TOKEN_TYPE_BLIND_RSA

    def __post_init__(self) -> None:
        if self.token_type != TOKEN_TYPE_BLIND_RSA:
            raise EncodeError("only token type 0x0002 requests can be built")
        if not 0 <= self.truncated_token_key_id <= 0xFF:
            raise EncodeError("truncated_token_key_id must fit one byte")
        if len(self.blinded_msg) != NK:
            raise EncodeError(f"blinded_msg must be {NK} bytes")

    def encode(self) -> bytes:
        return (
            self.token_type.to_bytes(2, "big")
            + bytes([self.truncated_token_key_id])
            + bytes(self.blinded_msg)
        )

    @classmethod
    def decode(cls, data: bytes) -> TokenRequest:
        data = bytes(data)
        if len(data) < 2:
            raise TruncatedError("TokenRequest: no token type")
        _check_type(int.from_bytes(data[:2], "big"), "TokenRequest")
        if len(data) < TOKEN_REQUEST_LEN:
            raise TruncatedError(f"TokenRequest: {len(data)} of {TOKEN_REQUEST_LEN} bytes")
        if len(data) > TOKEN_REQUEST_LEN:
            raise DecodeError(f"TokenRequest: {len(data) - TOKEN_REQUEST_LEN} trailing bytes")
        return cls(data[2], data[3:])


@dataclass(frozen=True)
class TokenResponse:
    """RFC 9578 §6.2 TokenResponse for type 0x0002: just the blind signature."""

    blind_sig: bytes

    def __post_init__(self) -> None:
        if len(self.blind_sig) != NK:
            raise EncodeError(f"blind_sig must be {NK} bytes")

    def encode(self) -> bytes:
        return bytes(self.blind_sig)

    @classmethod
    def decode(cls, data: bytes) -> TokenResponse:
        data = bytes(data)
        if len(data) < NK:
            raise TruncatedError(f"TokenResponse: {len(data)} of {NK} bytes")
        if len(data) > NK:
            raise DecodeError(f"TokenResponse: {len(data) - NK} trailing bytes")
        return cls(data)


@dataclass(frozen=True)
class ClientState:
    """What the client keeps between request and response. ``inv`` is secret."""

    public_key: blindrsa.PublicKey
    token_input: bytes
    inv: bytes

    def __repr__(self) -> str:  # keep the blind out of logs
        return f"ClientState(token_input={self.token_input.hex()[:16]}…)"


def begin_token_request(
    pk: PublicKeyInput,
    challenge: TokenChallenge | bytes,
    *,
    nonce: bytes | None = None,
    r: int | bytes | None = None,
    salt: bytes | None = None,
) -> tuple[TokenRequest, ClientState]:
    """Client side of RFC 9578 §6.1: blind token_input for the issuer key ``pk``.

    ``pk`` is the encoded token key (as in the challenge/directory) or a key
    object. ``challenge`` is the TokenChallenge or its exact bytes (preferred:
    the digest is over the bytes as received). ``nonce``, ``r``, ``salt`` are
    injectable for test vectors; by default they come from ``secrets``.
    """
    pub, der = _token_key_bytes(pk)
    if isinstance(challenge, TokenChallenge):
        chal_type = challenge.token_type
    else:
        challenge = bytes(challenge)
        if len(challenge) < 2:
            raise DecodeError("TokenChallenge too short")
        chal_type = int.from_bytes(challenge[:2], "big")
    _check_type(chal_type, "TokenChallenge")
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LEN)
    elif len(nonce) != NONCE_LEN:
        raise EncodeError(f"nonce must be {NONCE_LEN} bytes")
    key_id = hashlib.sha256(der).digest()
    token_input = authenticator_input(
        TOKEN_TYPE_BLIND_RSA, bytes(nonce), challenge_digest(challenge), key_id
    )
    blinded, inv = blindrsa.blind(pub, token_input, VARIANT, r=r, salt=salt)
    return TokenRequest(key_id[-1], blinded), ClientState(pub, token_input, inv)


def finalize_token(state: ClientState, response: TokenResponse | bytes) -> Token:
    """Client side of RFC 9578 §6.3: unblind; raises VerificationError on a bad signature."""
    resp = response if isinstance(response, TokenResponse) else TokenResponse.decode(response)
    sig = blindrsa.finalize(state.public_key, state.token_input, resp.blind_sig, state.inv, VARIANT)
    ti = state.token_input
    return Token(TOKEN_TYPE_BLIND_RSA, ti[2:34], ti[34:66], ti[66:98], sig)


def check_request(key: IssuerKey, request: TokenRequest) -> None:
    """Reject a request this key cannot sign, cheaply and before any quota is taken.

    A blinded message at or above the modulus is malformed input (RFC 9474 §4.3),
    not a signing fault; catching it here keeps it a 400 instead of a 500.
    """
    _check_type(request.token_type, "TokenRequest")
    if request.truncated_token_key_id != key.truncated_key_id:
        raise UnsupportedError("TokenRequest names another issuer key")
    if int.from_bytes(request.blinded_msg, "big") >= key.private_key.public_key.n:
        raise DecodeError("TokenRequest blinded_msg is not below the key's modulus")


def issue(key: IssuerKey | blindrsa.PrivateKey, request: TokenRequest | bytes) -> TokenResponse:
    """Issuer side of RFC 9578 §6.2: BlindSign after checking type and truncated key id.

    A request for another key raises UnsupportedError (the issuer should answer
    400 and the client refetch the directory).
    """
    ik = key if isinstance(key, IssuerKey) else IssuerKey(key)
    req = request if isinstance(request, TokenRequest) else TokenRequest.decode(request)
    _check_type(req.token_type, "TokenRequest")
    if req.truncated_token_key_id != ik.truncated_key_id:
        raise UnsupportedError(
            f"TokenRequest for key id ..{req.truncated_token_key_id:02x}, "
            f"issuer key is ..{ik.truncated_key_id:02x}"
        )
    return TokenResponse(blindrsa.blind_sign(ik.private_key, req.blinded_msg))


def verify_token(
    pk: PublicKeyInput | IssuerKey,
    token: Token | bytes,
    *,
    expected_challenge: TokenChallenge | bytes | None = None,
) -> Token:
    """Redemption check (RFC 9578 §6.4): type, key id, optional challenge, PSS signature.

    Returns the decoded token on success (the caller then does its double-spend
    check on ``token.nonce``). Raises UnsupportedError for other token types and
    VerificationError for a wrong key id, challenge or signature.
    """
    if isinstance(pk, IssuerKey):
        pub, key_id = pk.public_key, pk.token_key_id
    else:
        pub, der = _token_key_bytes(pk)
        key_id = hashlib.sha256(der).digest()
    tok = token if isinstance(token, Token) else Token.decode(token)
    _check_type(tok.token_type, "Token")
    if not hmac.compare_digest(tok.token_key_id, key_id):
        raise VerificationError("token was issued under another key")
    if expected_challenge is not None and not hmac.compare_digest(
        tok.challenge_digest, challenge_digest(expected_challenge)
    ):
        raise VerificationError("token is for another challenge")
    blindrsa.verify(pub, tok.token_input, tok.authenticator, VARIANT)
    return tok
