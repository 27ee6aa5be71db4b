"""The PrivateToken HTTP authentication scheme, RFC 9577 (sans-IO).

Wire structures (all integers big-endian)::

    TokenChallenge = token_type(2) ‖ issuer_name<1..2^16-1> ‖ redemption_context<0..32>
                     ‖ origin_info<0..2^16-1>
    Token          = token_type(2) ‖ nonce(32) ‖ challenge_digest(32) ‖ token_key_id(Nid=32)
                     ‖ authenticator(Nk)

Headers: ``WWW-Authenticate: PrivateToken challenge=…, token-key=…[, max-age=…]`` (any
number of challenges, mixed with other schemes) and ``Authorization: PrivateToken
token=…``. Parsing follows the RFC 9110 §11 challenge grammar; values are base64url,
accepted with or without padding, always emitted with padding (RFC 9577 §2.1).

Decoders raise only :mod:`openpcc.errors` types on hostile input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from openpcc.errors import (
    DecodeError,
    EncodeError,
    LimitExceededError,
    TruncatedError,
    UnsupportedError,
)

__all__ = [
    "AUTH_SCHEME",
    "MAX_HEADER_LEN",
    "NONCE_LEN",
    "TOKEN_KEY_ID_LEN",
    "TOKEN_TYPE_BLIND_RSA",
    "TOKEN_TYPE_VOPRF",
    "PrivateTokenChallenge",
    "Token",
    "TokenChallenge",
    "authenticator_input",
    "b64url_decode",
    "b64url_encode",
    "challenge_digest",
    "format_authorization",
    "format_www_authenticate",
    "parse_auth_header",
    "parse_authorization",
    "parse_authorization_token",
    "parse_www_authenticate",
    "select_challenge",
]

AUTH_SCHEME = "PrivateToken"
TOKEN_TYPE_VOPRF = 0x0001  # RFC 9578 §5; not implemented here
TOKEN_TYPE_BLIND_RSA = 0x0002  # RFC 9578 §6
NONCE_LEN = 32
DIGEST_LEN = 32
TOKEN_KEY_ID_LEN = 32  # Nid for both registered types
# Nk (authenticator length) per token type we can decode.
AUTHENTICATOR_LEN: dict[int, int] = {TOKEN_TYPE_BLIND_RSA: 256}
# Longest header we parse: a few challenges with 342-byte keys fit in ~2 KiB.
MAX_HEADER_LEN = 16 * 1024
_TOKEN_FIXED_LEN = 2 + NONCE_LEN + DIGEST_LEN + TOKEN_KEY_ID_LEN  # before the authenticator


# --------------------------------------------------------------------------- helpers


class _Reader:
    """Cursor over bytes that raises TruncatedError when a field runs past the end."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = bytes(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise TruncatedError(f"{what}: need {n} bytes, have {len(self.buf) - self.pos}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def done(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{what}: {len(self.buf) - self.pos} trailing bytes")


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_encode(data: bytes) -> str:
    """base64url WITH padding, as RFC 9577 §2.1 requires for emitted values."""
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64url_decode(text: str) -> bytes:
    """base64url, padding optional but correct if present; no other alphabet accepted."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text):
        raise DecodeError("not base64url")
    body = text.rstrip("=")
    if len(body) % 4 == 1:
        raise DecodeError("base64url: impossible length")
    padded = body + "=" * (-len(body) % 4)
    if len(text) != len(body) and text != padded:
        raise DecodeError("base64url: wrong padding")
    try:
        return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex excludes these
        raise DecodeError(f"base64url: {exc}") from None


# --------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class TokenChallenge:
    """RFC 9577 §2.1.1 TokenChallenge. ``origin_info`` holds the comma-split origins."""

    token_type: int
    issuer_name: str
    redemption_context: bytes = b""
    origin_info: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.token_type <= 0xFFFF:
            raise EncodeError("token_type must fit 16 bits")
        if len(self.redemption_context) not in (0, 32):
            raise EncodeError("redemption_context must be 0 or 32 bytes")
        if not isinstance(self.origin_info, tuple):
            object.__setattr__(self, "origin_info", tuple(self.origin_info))
        for origin in self.origin_info:
            if not origin or "," in origin:
                raise EncodeError(f"bad origin name {origin!r}")
        if not 1 <= len(self.issuer_name.encode()) <= 0xFFFF:
            raise EncodeError("issuer_name must be 1..65535 bytes")
        if len(",".join(self.origin_info).encode()) > 0xFFFF:
            raise EncodeError("origin_info longer than 65535 bytes")

    def encode(self) -> bytes:
        issuer = self.issuer_name.encode()
        origins = ",".join(self.origin_info).encode()
        return b"".join(
            (
                self.token_type.to_bytes(2, "big"),
                len(issuer).to_bytes(2, "big"),
                issuer,
                len(self.redemption_context).to_bytes(1, "big"),
                bytes(self.redemption_context),
                len(origins).to_bytes(2, "big"),
                origins,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> TokenChallenge:
        r = _Reader(data)
        token_type = r.u16("token_type")
        issuer = r.take(r.u16("issuer_name length"), "issuer_name")
        ctx = r.take(r.u8("redemption_context length"), "redemption_context")
        origins = r.take(r.u16("origin_info length"), "origin_info")
        r.done("TokenChallenge")
        if not issuer:
            raise DecodeError("empty issuer_name")
        if len(ctx) not in (0, 32):
            raise DecodeError("redemption_context must be 0 or 32 bytes")
        try:
            issuer_s = issuer.decode()
            origins_s = origins.decode()
        except UnicodeDecodeError:
            raise DecodeError("issuer_name/origin_info are not text") from None
        origin_list = tuple(origins_s.split(",")) if origins_s else ()
        if any(not o for o in origin_list):
            raise DecodeError("empty origin name in origin_info")
        return cls(token_type, issuer_s, ctx, origin_list)

    def digest(self) -> bytes:
        return challenge_digest(self)


def challenge_digest(challenge: TokenChallenge | bytes) -> bytes:
    """SHA-256 over the encoded TokenChallenge (RFC 9577 §2.2)."""
    raw = challenge.encode() if isinstance(challenge, TokenChallenge) else bytes(challenge)
    return hashlib.sha256(raw).digest()


def authenticator_input(
    token_type: int, nonce: bytes, challenge_digest: bytes, token_key_id: bytes
) -> bytes:
    """token_type ‖ nonce ‖ challenge_digest ‖ token_key_id: what the issuer signs."""
    if len(nonce) != NONCE_LEN or len(challenge_digest) != DIGEST_LEN:
        raise EncodeError("nonce and challenge_digest must be 32 bytes")
    if len(token_key_id) != TOKEN_KEY_ID_LEN:
        raise EncodeError("token_key_id must be 32 bytes")
    return token_type.to_bytes(2, "big") + nonce + challenge_digest + token_key_id


@dataclass(frozen=True)
class Token:
    """RFC 9577 §2.2 Token. Decoding knows Nk for type 0x0002 only."""

    token_type: int
    nonce: bytes
    challenge_digest: bytes
    token_key_id: bytes
    authenticator: bytes

    def __post_init__(self) -> None:
        nk = AUTHENTICATOR_LEN.get(self.token_type)
        if nk is None:
            raise EncodeError(f"unsupported token type 0x{self.token_type:04x}")
        if len(self.authenticator) != nk:
            raise EncodeError(f"authenticator must be {nk} bytes")
        # lengths of the other fields are checked by authenticator_input
        authenticator_input(self.token_type, self.nonce, self.challenge_digest, self.token_key_id)

    @property
    def token_input(self) -> bytes:
        """The signed prefix (RFC 9578 calls it token_input)."""
        return authenticator_input(
            self.token_type, self.nonce, self.challenge_digest, self.token_key_id
        )

    def encode(self) -> bytes:
        return self.token_input + self.authenticator

    @classmethod
    def decode(cls, data: bytes) -> Token:
        nk = AUTHENTICATOR_LEN.get(int.from_bytes(data[:2], "big")) if len(data) >= 2 else None
        if nk is not None and len(data) == _TOKEN_FIXED_LEN + nk:
            # Exactly one whole token of a known type (every valid one): slice it at once.
            # Anything else takes the reader below, which says what is missing or extra.
            data, digest_at = bytes(data), 2 + NONCE_LEN
            return cls(
                int.from_bytes(data[:2], "big"),
                data[2:digest_at],
                data[digest_at : digest_at + DIGEST_LEN],
                data[digest_at + DIGEST_LEN : _TOKEN_FIXED_LEN],
                data[_TOKEN_FIXED_LEN:],
            )
        r = _Reader(data)
        token_type = r.u16("token_type")
        nk = AUTHENTICATOR_LEN.get(token_type)
        if nk is None:
            raise UnsupportedError(f"unsupported token type 0x{token_type:04x}")
        nonce = r.take(NONCE_LEN, "nonce")
        digest = r.take(DIGEST_LEN, "challenge_digest")
        key_id = r.take(TOKEN_KEY_ID_LEN, "token_key_id")
        auth = r.take(nk, "authenticator")
        r.done("Token")
        return cls(token_type, nonce, digest, key_id, auth)


# --------------------------------------------------------------------------- headers

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN_RE = re.compile(_TCHAR + "+")
# Unquoted values: RFC 9110 token, plus trailing "=" (base64 padding). Not in the
# grammar, but seen in the wild and accepted by privacypass-ts too.
_VALUE_RE = re.compile(_TCHAR + "+=*")
_QUOTED_RE = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_QPAIR_RE = re.compile(r"\\(.)")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
_OWS = " \t"


@dataclass(frozen=True)
class AuthChallenge:
    """One RFC 9110 challenge/credentials: scheme, lower-cased params, or token68."""

    scheme: str
    params: tuple[tuple[str, str], ...] = ()
    token68: str | None = None


def parse_auth_header(header: str) -> list[AuthChallenge]:
    """Split a WWW-Authenticate/Authorization value into challenges (RFC 9110 §11).

    Commas separate both challenges and auth-params; an element ``name = value``
    is a parameter of the current challenge, anything else starts a new one.
    Empty list elements are skipped, as RFC 9110 §5.6.1 requires of recipients.
    """
    if not isinstance(header, str):
        raise DecodeError("header value must be str")
    if len(header) > MAX_HEADER_LEN:
        raise LimitExceededError(f"header longer than {MAX_HEADER_LEN}")
    s, n, i = header, len(header), 0
    out: list[AuthChallenge] = []
    scheme: str | None = None
    params: list[tuple[str, str]] = []
    token68: str | None = None

    def flush() -> None:
        if scheme is not None:
            out.append(AuthChallenge(scheme, tuple(params), token68))

    def skip_ows(j: int) -> int:
        while j < n and s[j] in _OWS:
            j += 1
        return j

    def end_of_element(j: int) -> int:
        j = skip_ows(j)
        if j < n and s[j] != ",":
            raise DecodeError(f"unexpected {s[j]!r} at {j} in auth header")
        return j

    while True:
        i = skip_ows(i)
        if i >= n:
            break
        if s[i] == ",":
            i += 1
            continue
        m = _TOKEN_RE.match(s, i)
        if m is None:
            raise DecodeError(f"unexpected {s[i]!r} at {i} in auth header")
        name = m.group()
        j = skip_ows(m.end())
        if j < n and s[j] == "=":
            # auth-param of the current challenge
            if scheme is None or token68 is not None:
                raise DecodeError("auth-param without a scheme")
            j = skip_ows(j + 1)
            qm = _QUOTED_RE.match(s, j)
            if qm is not None:
                value = _QPAIR_RE.sub(r"\1", qm.group(1))
                j = qm.end()
            else:
                tm = _VALUE_RE.match(s, j)
                if tm is None:
                    raise DecodeError(f"auth-param {name!r} has no value")
                value = tm.group()
                j = tm.end()
            params.append((name.lower(), value))
            i = end_of_element(j)
            continue
        # a new challenge: auth-scheme [ 1*SP ( token68 / #auth-param ) ]
        flush()
        scheme, params, token68 = name, [], None
        i = m.end()
        if i < n and s[i] in _OWS:
            i = skip_ows(i)
            t68 = _TOKEN68_RE.match(s, i)
            if t68 is not None and not _is_param_start(s, i):
                token68 = t68.group()
                i = end_of_element(t68.end())
            elif i < n and s[i] != "," and not _is_param_start(s, i):
                raise DecodeError(f"unexpected {s[i]!r} at {i} after auth scheme")
        elif i < n and s[i] != ",":
            raise DecodeError(f"unexpected {s[i]!r} after auth scheme")
    flush()
    return out


def _is_param_start(s: str, i: int) -> bool:
    """True if ``s[i:]`` begins ``token BWS "=" BWS (token / quoted-string)``."""
    m = _TOKEN_RE.match(s, i)
    if m is None:
        return False
    j = m.end()
    while j < len(s) and s[j] in _OWS:
        j += 1
    if j >= len(s) or s[j] != "=":
        return False
    j += 1
    while j < len(s) and s[j] in _OWS:
        j += 1
    return j < len(s) and (s[j] == '"' or _TOKEN_RE.match(s, j) is not None)


def _private_token_params(ch: AuthChallenge) -> dict[str, str]:
    if ch.token68 is not None:
        raise DecodeError("PrivateToken takes auth-params, not token68")
    out: dict[str, str] = {}
    for k, v in ch.params:
        if k in out:
            raise DecodeError(f"duplicate PrivateToken parameter {k!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class PrivateTokenChallenge:
    """One ``PrivateToken`` challenge from WWW-Authenticate.

    ``token_challenge`` stays raw bytes: the client hashes exactly these, and a
    grease or unknown type must be skippable without being understood.
    """

    token_challenge: bytes
    token_key: bytes
    max_age: int | None = None

    @property
    def token_type(self) -> int:
        if len(self.token_challenge) < 2:
            raise DecodeError("challenge shorter than a token type")
        return int.from_bytes(self.token_challenge[:2], "big")

    def challenge(self) -> TokenChallenge:
        """Decode the TokenChallenge (raises DecodeError for grease/garbage)."""
        return TokenChallenge.decode(self.token_challenge)


def parse_www_authenticate(header: str) -> list[PrivateTokenChallenge]:
    """All PrivateToken challenges in a WWW-Authenticate value, in order.

    Other schemes and unknown parameters are ignored; scheme and parameter names
    are case-insensitive. A PrivateToken challenge missing ``challenge`` or
    ``token-key``, or with undecodable values, raises DecodeError. Unknown token
    types (e.g. grease 0x0000) are returned; ``select_challenge`` skips them.
    """
    result = []
    for ch in parse_auth_header(header):
        if ch.scheme.lower() != AUTH_SCHEME.lower():
            continue
        p = _private_token_params(ch)
        if "challenge" not in p or "token-key" not in p:
            raise DecodeError("PrivateToken challenge lacks challenge or token-key")
        raw = b64url_decode(p["challenge"])
        if len(raw) < 2:
            raise DecodeError("PrivateToken challenge too short")
        max_age = None
        if "max-age" in p:
            v = p["max-age"]
            if not (v.isascii() and v.isdigit() and len(v) <= 18):
                raise DecodeError("max-age must be a non-negative integer")
            max_age = int(v)
        result.append(PrivateTokenChallenge(raw, b64url_decode(p["token-key"]), max_age))
    return result


def select_challenge(
    challenges: Iterable[PrivateTokenChallenge],
    supported_types: Iterable[int] = (TOKEN_TYPE_BLIND_RSA,),
) -> tuple[PrivateTokenChallenge, TokenChallenge] | None:
    """First challenge of a supported type that decodes; grease and garbage are skipped."""
    types = set(supported_types)
    for ch in challenges:
        if ch.token_type not in types:
            continue
        try:
            return ch, ch.challenge()
        except DecodeError:
            continue
    return None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_www_authenticate(
    challenges: Iterable[PrivateTokenChallenge] | PrivateTokenChallenge,
) -> str:
    """``PrivateToken challenge="…", token-key="…"[, max-age="…"]``, joined by ", "."""
    if isinstance(challenges, PrivateTokenChallenge):
        challenges = [challenges]
    parts = []
    for ch in challenges:
        items = [
            f"challenge={_quote(b64url_encode(ch.token_challenge))}",
            f"token-key={_quote(b64url_encode(ch.token_key))}",
        ]
        if ch.max_age is not None:
            if ch.max_age < 0:
                raise EncodeError("max-age must be non-negative")
            items.append(f"max-age={_quote(str(ch.max_age))}")
        parts.append(f"{AUTH_SCHEME} " + ", ".join(items))
    if not parts:
        raise EncodeError("no challenges")
    return ", ".join(parts)


def format_authorization(token: Token | bytes) -> str:
    """``PrivateToken token="<base64url>"``."""
    raw = token.encode() if isinstance(token, Token) else bytes(token)
    return f"{AUTH_SCHEME} token={_quote(b64url_encode(raw))}"


def parse_authorization(header: str) -> list[bytes]:
    """Raw token bytes of every PrivateToken credential in the header (others ignored)."""
    tokens = []
    for ch in parse_auth_header(header):
        if ch.scheme.lower() != AUTH_SCHEME.lower():
            continue
        p = _private_token_params(ch)
        if "token" not in p:
            raise DecodeError("PrivateToken credentials lack token")
        tokens.append(b64url_decode(p["token"]))
    return tokens


# What every client sends (``format_authorization``): the scheme exactly as registered, one
# space, one ``token`` parameter, its base64url value quoted or bare, nothing else. For
# such a value the full RFC 9110 parse below yields this one parameter and this value, so
# the shortcut gives the same token or the same error; any other spelling takes the parse.
_PLAIN_AUTHORIZATION = re.compile(
    r'PrivateToken token=(?:"([A-Za-z0-9_-]+={0,2})"|([A-Za-z0-9_-]+={0,2}))'
)


def parse_authorization_token(header: str) -> Token:
    """The single PrivateToken token in an Authorization value, decoded.

    Zero or several PrivateToken credentials raise DecodeError; an unknown token
    type raises UnsupportedError. The gateway parses one per request: the plain form
    costs one regular-expression match and the base64 decode, about a fifth of the
    general parse (RFC 9110 §11, ~25-50 µs here), which every other spelling still takes.
    """
    if isinstance(header, str) and len(header) <= MAX_HEADER_LEN:
        m = _PLAIN_AUTHORIZATION.fullmatch(header)
        if m is not None:
            return Token.decode(b64url_decode(m.group(1) or m.group(2)))
    return _parse_authorization_token_full(header)


def _parse_authorization_token_full(header: str) -> Token:
    """``parse_authorization_token`` without the shortcut (tests hold the two equal)."""
    tokens = parse_authorization(header)
    if len(tokens) != 1:
        raise DecodeError(f"expected one PrivateToken credential, found {len(tokens)}")
    return Token.decode(tokens[0])
