"""Issuer directory, RFC 9578 §4: ``/.well-known/private-token-issuer-directory``.

JSON object (media type ``application/private-token-issuer-directory``)::

    {"issuer-request-uri": "<absolute or relative URL>",
     "token-keys": [{"token-type": 2, "token-key": "<base64url>", "not-before": 1686913811}, ...]}

Keys are listed in issuer preference order; a client uses the first key of its
token type whose ``not-before`` is absent or not in the future. Unknown members
are ignored (forward compatibility); keys of token types we do not implement are
kept as opaque bytes so a directory listing them still parses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

from openpcc.errors import DecodeError, EncodeError, LimitExceededError, UnsupportedError
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, b64url_decode, b64url_encode
from openpcc.privacypass.issuance import decode_token_key

__all__ = [
    "MAX_DIRECTORY_BYTES",
    "MEDIA_TYPE",
    "WELL_KNOWN_PATH",
    "IssuerDirectory",
    "TokenKeyEntry",
]

WELL_KNOWN_PATH: Final = "/.well-known/private-token-issuer-directory"
MEDIA_TYPE: Final = "application/private-token-issuer-directory"
MAX_DIRECTORY_BYTES: Final = 256 * 1024
MAX_KEYS: Final = 256


@dataclass(frozen=True)
class TokenKeyEntry:
    """One ``token-keys`` element. ``token_key`` is the decoded key encoding."""

    token_type: int
    token_key: bytes
    not_before: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.token_type <= 0xFFFF:
            raise EncodeError("token-type must fit 16 bits")
        if self.not_before is not None and self.not_before < 0:
            raise EncodeError("not-before must be non-negative")

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "token-type": self.token_type,
            "token-key": b64url_encode(self.token_key),
        }
        if self.not_before is not None:
            obj["not-before"] = self.not_before
        return obj


def _int_member(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = obj[name]
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DecodeError(f"{name} must be an integer in [{lo}, {hi}]")
    return v


@dataclass(frozen=True)
class IssuerDirectory:
    issuer_request_uri: str
    token_keys: tuple[TokenKeyEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.token_keys, tuple):
            object.__setattr__(self, "token_keys", tuple(self.token_keys))
        if not self.issuer_request_uri:
            raise EncodeError("issuer-request-uri must not be empty")

    @classmethod
    def parse(cls, data: bytes | str) -> IssuerDirectory:
        """Parse and validate; type-2 keys must be valid RSA-2048 PSS SPKIs."""
        if len(data) > MAX_DIRECTORY_BYTES:
            raise LimitExceededError("issuer directory too large")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8
            raise DecodeError(f"issuer directory is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeError("issuer directory must be a JSON object")
        uri = obj.get("issuer-request-uri")
        if not isinstance(uri, str) or not uri:
            raise DecodeError("issuer-request-uri must be a non-empty string")
        keys = obj.get("token-keys")
        if not isinstance(keys, list):
            raise DecodeError("token-keys must be an array")
        if len(keys) > MAX_KEYS:
            raise LimitExceededError("too many token keys")
        entries = []
        for k in keys:
            if not isinstance(k, dict):
                raise DecodeError("token-keys entries must be objects")
            if "token-type" not in k or "token-key" not in k:
                raise DecodeError("token-keys entry lacks token-type or token-key")
            token_type = _int_member(k, "token-type", 0, 0xFFFF)
            key_text = k["token-key"]
            if not isinstance(key_text, str):
                raise DecodeError("token-key must be a string")
            key = b64url_decode(key_text)
            if token_type == TOKEN_TYPE_BLIND_RSA:
                try:
                    decode_token_key(key)
                except UnsupportedError as exc:
                    raise DecodeError(f"invalid type-2 token key: {exc}") from None
            not_before = None
            if "not-before" in k:
                not_before = _int_member(k, "not-before", 0, 2**63 - 1)
            entries.append(TokenKeyEntry(token_type, key, not_before))
        return cls(uri, tuple(entries))

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "issuer-request-uri": self.issuer_request_uri,
            "token-keys": [e.to_json_obj() for e in self.token_keys],
        }

    def serialize(self) -> bytes:
        """Compact UTF-8 JSON, base64url keys with padding."""
        return json.dumps(self.to_json_obj(), separators=(",", ":")).encode()

    def select_key(
        self, token_type: int = TOKEN_TYPE_BLIND_RSA, *, now: float | None = None
    ) -> TokenKeyEntry:
        """First key of ``token_type`` whose not-before is absent or <= now (RFC 9578 §4)."""
        t = time.time() if now is None else now
        for e in self.token_keys:
            if e.token_type == token_type and (e.not_before is None or e.not_before <= t):
                return e
        raise UnsupportedError(f"no usable token key of type 0x{token_type:04x}")
