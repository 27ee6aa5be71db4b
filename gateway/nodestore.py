"""The node registry shared by gateway replicas through Redis (used with ``--redis``).

A node registers with whichever replica its internal Service picked; that replica
writes the registration to Redis, and every replica copies Redis into its local
``NodeRegistry`` every ``--registry-sync`` seconds. Routing and the node directory stay
local reads, so the per-request path never waits on Redis. Health stays per replica:
a synced entry is listed only after this replica's own ``/readyz`` check passed.

Layout under ``PREFIX`` (no SCAN: the same Redis holds the spent-token keys):

- ``PREFIX nodes``: ZSET, member node id (hex), score = expiry in Redis server time;
- ``PREFIX nodes:body``: HASH node id -> registration body as received;
- ``PREFIX nodes:digest``: HASH node id -> SHA-256 of that body, so a sync fetches
  only bodies that changed (a heartbeat only moves the score).

Times come from Redis (``TIME`` inside the scripts), so replicas' clocks don't matter.
What is read back is validated with ``parse_registration`` again: Redis is trusted like
the spent store, but a bad entry must cost one node, not the sync.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.registry import (
    MAX_NODES,
    NodeRegistry,
    Registration,
    RegistrationError,
    parse_registration,
)
from openpcc.errors import OpenPCCError

log = logging.getLogger("openpcc.gateway")

DEFAULT_PREFIX = "openpcc:gateway:"
# Both scripts start here: server time, and expired members dropped with their body/digest.
_EXPIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('HDEL', KEYS[3], unpack(gone))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
"""
# Drop expired members, then refuse a new member once the set is full; a heartbeat of a
# known node always passes. The body is written only when its digest changed.
_PUT = (
    _EXPIRE
    + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not known and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[4] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
end
return 1
"""
)
# One consistent view: server time, then members with expiry scores and digests.
_SNAPSHOT = (
    _EXPIRE
    + """
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local digests = {}
if #members > 0 then
  local ids = {}
  for i = 1, #members, 2 do ids[#ids + 1] = members[i] end
  digests = redis.call('HMGET', KEYS[3], unpack(ids))
end
return {tostring(now), members, digests}
"""
)


class RegistryFullError(OpenPCCError):
    """The shared registry holds MAX_NODES live nodes already."""

    status_hint = 503


@dataclass
class _Known:
    digest: bytes
    reg: Registration | None  # None: the body failed validation (skipped, logged once)


@dataclass
class RedisNodeStore:
    """Writes registrations to Redis and mirrors Redis into a local NodeRegistry."""

    url: str
    prefix: str = DEFAULT_PREFIX
    timeout: float = 2.0
    _known: dict[str, _Known] = field(default_factory=dict, repr=False)
    _r: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import redis.asyncio as aioredis  # optional extra: openpcc[redis]

        # Short timeouts: a registration must fail (503, the node retries) rather than hang.
        self._r = aioredis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )
        self._keys = [self.prefix + k for k in ("nodes", "nodes:body", "nodes:digest")]
        self._put = self._r.register_script(_PUT)
        self._snapshot = self._r.register_script(_SNAPSHOT)

    async def put(self, reg: Registration, body: bytes, ttl: float) -> None:
        """Record a registration or heartbeat; RegistryFullError, or redis errors."""
        digest = hashlib.sha256(body).hexdigest()
        args = [reg.node_id.hex(), ttl, MAX_NODES, digest, body]
        if not await self._put(keys=self._keys, args=args):
            raise RegistryFullError

    async def sync(self, registry: NodeRegistry) -> None:
        """Make the local registry match Redis; raises redis errors (local state kept).

        Each entry's local expiry follows its heartbeat time in Redis, not this sync.
        """
        now_s, members, digests = await self._snapshot(keys=self._keys)
        server_now, mono = float(now_s), time.monotonic()
        pairs = zip(members[::2], members[1::2], strict=True)
        expiry = {m.decode(errors="replace"): float(s) for m, s in pairs}
        ids = list(expiry)
        changed: dict[str, bytes] = {}
        for nid, d in zip(ids, digests, strict=True):
            known = self._known.get(nid)
            if known is not None and known.digest == (d or b""):
                continue
            if d is None:  # no digest: not written by a gateway
                self._known[nid] = _Known(b"", _parse(nid, b""))
            else:
                changed[nid] = d
        if changed:
            # The digest read with the snapshot marks the version: a body rewritten
            # since is fetched again on the next sync, as its digest differs then.
            bodies = await self._r.hmget(self._keys[1], list(changed))
            for (nid, d), body in zip(changed.items(), bodies, strict=True):
                if body is None:  # expired between the two calls: next sync
                    self._known.pop(nid, None)
                    continue
                self._known[nid] = _Known(d, _parse(nid, body))
        for nid in [n for n in self._known if n not in expiry]:
            del self._known[nid]
        for nid, exp in expiry.items():
            known = self._known.get(nid)
            if known is None or known.reg is None:
                continue
            # Heartbeat at (exp - ttl) server time: the same age locally.
            registry.heard(known.reg, mono + (exp - server_now) - registry.ttl)
        valid = {bytes.fromhex(n) for n, k in self._known.items() if k.reg is not None}
        for node_id in registry.ids() - valid:
            registry.forget(node_id)

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()


def _parse(nid: str, body: bytes) -> Registration | None:
    try:
        reg = parse_registration(body)
    except RegistrationError:
        reg = None
    if reg is None or reg.node_id.hex() != nid:
        # Content is not logged: it did not pass validation, so it may be anything.
        log.warning("skipping an invalid node registration stored in Redis")
        return None
    return reg
