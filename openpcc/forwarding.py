"""Gateway -> node: a node opens only envelopes a gateway forwarded, and each only once.

Why: a node reachable by anyone answered a sealed envelope posted straight to it, five
times (five engine runs, no token spent, replays included). Three checks close that:

- **The forwarder.** The gateway adds ``OpenPCC-Forward: t=<unix seconds>, mac=<hex>``,
  an HMAC-SHA256 under a per-node key over the time and the envelope's SHA-256. The key
  is derived from the node's admission credential (openpcc/admission.py), which both
  already hold, and the node id, so every gateway replica can compute it and a key
  learned from one node says nothing of another's. The node refuses a missing or wrong
  MAC, or a time off by more than ``FORWARD_WINDOW`` seconds.
- **The client's time.** Inside the encryption the client puts ``openpcc-sent-at`` (Unix
  seconds) in its inner request; the node refuses one off by more than ``CLIENT_WINDOW``
  seconds, so not even a gateway can have an old envelope answered again later.
- **Once.** Within that window the node remembers each envelope's request nonce
  (``ReplayCache``) and refuses a second one.

Standard library only: the gateway, the node and the test helpers share it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict

from openpcc.errors import OpenPCCError

__all__ = [
    "CLIENT_WINDOW",
    "FORWARD_HEADER",
    "FORWARD_WINDOW",
    "SENT_AT_HEADER",
    "ForwardAuthError",
    "ReplayCache",
    "forward_key",
    "sign_forward",
    "verify_forward",
]

FORWARD_HEADER = "OpenPCC-Forward"
SENT_AT_HEADER = b"openpcc-sent-at"
FORWARD_WINDOW = 60  # seconds the gateway's and the node's clocks may differ
CLIENT_WINDOW = 300  # seconds a client's clock may differ from the node's
_KEY_LABEL = b"openpcc forward key v1\x00"
_MAC_LABEL = b"openpcc forward v1\x00"
_VALUE = re.compile(r"t=(\d{1,12}), mac=([0-9a-f]{64})")


class ForwardAuthError(OpenPCCError):
    """Not forwarded by a gateway holding this node's key, or not now (401 at the node)."""

    status_hint = 401


def forward_key(secret: str | bytes, node_id: bytes) -> bytes:
    """The per-node key a gateway signs forwarded envelopes with."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    return hmac.new(raw, _KEY_LABEL + bytes(node_id), hashlib.sha256).digest()


def _mac(key: bytes, t: int, envelope: bytes) -> str:
    msg = _MAC_LABEL + str(t).encode() + b"\x00" + hashlib.sha256(envelope).digest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign_forward(key: bytes, envelope: bytes, now: float | None = None) -> str:
    """The ``OpenPCC-Forward`` value for ``envelope``."""
    t = int(time.time() if now is None else now)
    return f"t={t}, mac={_mac(key, t, envelope)}"


def verify_forward(key: bytes, envelope: bytes, value: str | None, now: float) -> None:
    """ForwardAuthError unless ``value`` is this envelope's MAC under ``key``, made within
    ``FORWARD_WINDOW`` seconds of ``now``."""
    m = _VALUE.fullmatch(value or "")
    if m is None:
        raise ForwardAuthError("not forwarded by a gateway")
    t = int(m.group(1))
    if not hmac.compare_digest(_mac(key, t, envelope), m.group(2)):
        raise ForwardAuthError("not forwarded by a gateway")
    if abs(now - t) > FORWARD_WINDOW:
        raise ForwardAuthError("forwarded outside the time window")


class ReplayCache:
    """Request nonces seen in the last ``ttl`` seconds: long enough to cover every envelope
    the time checks still let through. Nonces arrive roughly in order, so expired ones
    are dropped from the front. Full (``max_entries`` still in their window), it refuses
    new ones rather than forget any: refusing is the safe side."""

    def __init__(self, ttl: float = 2 * CLIENT_WINDOW + FORWARD_WINDOW,
                 max_entries: int = 1_000_000) -> None:  # fmt: skip
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, nonce: bytes, now: float) -> bool:
        """True if ``nonce`` came within ``ttl`` (or the cache is full); else remember it."""
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self.ttl:
                break
            del self._seen[oldest]
        if nonce in self._seen or len(self._seen) >= self.max_entries:
            return True
        self._seen[bytes(nonce)] = now
        return False
