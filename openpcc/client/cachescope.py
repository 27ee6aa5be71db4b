"""Conversation-scoped prefix caching without identity (docs/PROTOCOL.md, "Prefix cache
scope and affinity").

Why: a chat resends its whole history every turn, so a fresh cache namespace per request
re-prefills all of it every turn. A salt derived by the client from a secret only it
holds and from the start of the conversation is the same for every turn of that
conversation and different for any other conversation or client; no party learns who
the client is, and the salt travels only inside the sealed request.

Also here: the affinity memory (salt -> the node that answered last), so the next turn
asks that node first and finds its cache.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from openpcc.errors import DecodeError
from openpcc.files import write_private

SALT_HEADER: Final = b"openpcc-cache-salt"
NODE_ID_HEADER: Final = b"openpcc-node-id"
CACHE_SECRET_FILE: Final = "cache-secret.json"
CACHE_SECRET_LIFETIME: Final = 7 * 86400
CONVERSATION: Final = "conversation"
_LABEL = b"openpcc cache scope v1\x00"
AFFINITY_ENTRIES: Final = 1024


CacheScope = str | None


def canonical_json(obj: Any) -> bytes:
    """Sorted keys at every level, no whitespace, non-ASCII as itself, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def conversation_prefix(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The messages up to and including the first user message (all if there is none)."""
    out: list[Any] = []
    for m in messages:
        out.append(m)
        if isinstance(m, Mapping) and m.get("role") == "user":
            break
    return out


def derive_salt(
    secret: bytes,
    scope: CacheScope,
    *,
    model: str = "",
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> bytes | None:
    """The request's 32-byte salt; None for no scope (or a conversation without messages).

    ``scope``: ``"conversation"`` (the default the SDKs pass), another string (a named
    scope shared on purpose), or None.
    """
    if scope is None:
        return None
    if scope == CONVERSATION:
        if messages is None:
            return None
        c = canonical_json({"messages": conversation_prefix(messages), "model": model})
        return hmac.new(secret, _LABEL + b"conversation\x00" + c, hashlib.sha256).digest()
    return hmac.new(secret, _LABEL + b"named\x00" + scope.encode(), hashlib.sha256).digest()


class CacheSecret:
    """The profile's cache secret (``cache-secret.json``, 0600), fresh every 7 days."""

    def __init__(
        self,
        path: Path | None,
        *,
        lifetime: float = CACHE_SECRET_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path  # None: in memory only (a client without a profile)
        self.lifetime = lifetime
        self._clock = clock
        self._secret: bytes | None = None
        self._created = 0.0

    def current(self) -> bytes:
        now = self._clock()
        if self._secret is None and self.path is not None:
            self._load()
        if self._secret is None or now - self._created >= self.lifetime:
            self._secret, self._created = secrets.token_bytes(32), now
            if self.path is not None:
                doc = {"secret": self._secret.hex(), "created_at": int(now)}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_private(self.path, (json.dumps(doc) + "\n").encode())
        return self._secret

    def _load(self) -> None:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text())
            secret = bytes.fromhex(doc["secret"])
            created = float(doc["created_at"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"{self.path} is not a cache secret ({exc})") from None
        if len(secret) != 32:
            raise DecodeError(f"{self.path} is not a cache secret (32 bytes)")
        self._secret, self._created = secret, created


class Affinity:
    """salt -> node id of the last answer, least recently used dropped beyond the cap."""

    def __init__(self, entries: int = AFFINITY_ENTRIES) -> None:
        self.entries = entries
        self._last: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, salt: bytes) -> bytes | None:
        node = self._last.get(salt)
        if node is not None:
            self._last.move_to_end(salt)
        return node

    def put(self, salt: bytes, node_id: bytes) -> None:
        self._last[salt] = node_id
        self._last.move_to_end(salt)
        while len(self._last) > self.entries:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)


def salt_header_value(salt: bytes) -> bytes:
    return salt.hex().encode()


__all__ = [
    "AFFINITY_ENTRIES",
    "CACHE_SECRET_FILE",
    "CACHE_SECRET_LIFETIME",
    "CONVERSATION",
    "NODE_ID_HEADER",
    "SALT_HEADER",
    "Affinity",
    "CacheScope",
    "CacheSecret",
    "canonical_json",
    "conversation_prefix",
    "derive_salt",
    "salt_header_value",
]
