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
  only bodies that changed (a heartbeat only moves the score);
- ``PREFIX nodes:key``: HASH node id -> the attested signing key (hex) it is bound to;
- ``PREFIX nodes:signed``: HASH node id -> the latest signed registration time (ms);
- ``PREFIX nodes:cred``: HASH node id -> the name of the credential that listed it.

The admission rules that need shared state (gateway/registry.py ``check``: id bound to
its key, replays, the per-credential cap, the global cap) run inside ``_PUT``, so two
replicas cannot both admit what one of them alone would refuse.

Times come from Redis (``TIME`` inside the scripts), so replicas' clocks don't matter.
What is read back is validated with ``parse_registration`` again: Redis is trusted like
the spent store, but a bad entry must cost one node, not the sync.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.registry import (
    MAX_NODES,
    CredentialCapError,
    NodeIdTakenError,
    NodeRegistry,
    Registration,
    RegistrationError,
    RegistryFullError,
    ReplayedRegistrationError,
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
  for i = 2, 6 do redis.call('HDEL', KEYS[i], unpack(gone)) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
"""
# Drop expired members; a known node must come with its bound key and a later signed
# time; a new one within its credential's cap (ARGV[8]) and the global one. The body is
# written only when its digest changed. 1: recorded; 0 full; -1 taken; -2 replay; -3 cap.
_PUT = (
    _EXPIRE
    + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if known then
  if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[6] then return -1 end
  local last = redis.call('HGET', KEYS[5], ARGV[1])
  if last and tonumber(last) >= tonumber(ARGV[7]) then return -2 end
else
  local listed = 0
  for _, c in ipairs(redis.call('HVALS', KEYS[6])) do
    if c == ARGV[9] then listed = listed + 1 end
  end
  if listed >= tonumber(ARGV[8]) then return -3 end
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[6])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[7])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[9])
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
local digests, creds = {}, {}
if #members > 0 then
  local ids = {}
  for i = 1, #members, 2 do ids[#ids + 1] = members[i] end
  digests = redis.call('HMGET', KEYS[3], unpack(ids))
  creds = redis.call('HMGET', KEYS[6], unpack(ids))
end
return {tostring(now), members, digests, creds}
"""
)


_REFUSED: dict[int, OpenPCCError] = {
    0: RegistryFullError("node registry is full"),
    -1: NodeIdTakenError("node id is held by another attested node key"),
    -2: ReplayedRegistrationError("registration is older than one already heard"),
    -3: CredentialCapError("the credential lists as many nodes as its cap"),
}


@dataclass
class _Known:
    digest: bytes
    credential: bytes
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
        names = ("nodes", "nodes:body", "nodes:digest", "nodes:key", "nodes:signed", "nodes:cred")
        self._keys = [self.prefix + k for k in names]
        self._put = self._r.register_script(_PUT)
        self._snapshot = self._r.register_script(_SNAPSHOT)

    async def put(
        self, reg: Registration, body: bytes, ttl: float, signed_ms: int, max_nodes: int
    ) -> None:
        """Record an admitted registration or heartbeat; the registry's refusals
        (RegistryFullError, NodeIdTakenError, ...), or redis errors."""
        digest = reg.digest.hex()  # of these very bytes (parse_registration)
        args = [
            reg.node_id.hex(), ttl, MAX_NODES, digest, body, reg.signing_key.hex(), signed_ms,
            max_nodes, reg.credential,
        ]  # fmt: skip
        code = int(await self._put(keys=self._keys, args=args))
        if code != 1:
            raise _REFUSED.get(code, RegistryFullError("node registry refused"))

    async def sync(
        self, registry: NodeRegistry, judge: Callable[[Registration], Registration | None]
    ) -> None:
        """Make the local registry match Redis; raises redis errors (local state kept).

        ``judge`` admits what another replica wrote under this replica's trust policy
        (None: not listed here). Each entry's local expiry follows its heartbeat time in
        Redis, not this sync.
        """
        now_s, members, digests, creds = await self._snapshot(keys=self._keys)
        server_now, mono = float(now_s), time.monotonic()
        pairs = zip(members[::2], members[1::2], strict=True)
        expiry = {m.decode(errors="replace"): float(s) for m, s in pairs}
        ids = list(expiry)
        changed: dict[str, tuple[bytes, bytes]] = {}
        for nid, d, c in zip(ids, digests, creds, strict=True):
            known = self._known.get(nid)
            if known is not None and (known.digest, known.credential) == (d or b"", c or b""):
                continue
            if d is None:  # no digest: not written by a gateway
                self._known[nid] = _Known(b"", b"", _parse(nid, b""))
            else:
                changed[nid] = (d, c or b"")
        if changed:
            # The digest read with the snapshot marks the version: a body rewritten
            # since is fetched again on the next sync, as its digest differs then.
            bodies = await self._r.hmget(self._keys[1], list(changed))
            for (nid, (d, c)), body in zip(changed.items(), bodies, strict=True):
                if body is None:  # expired between the two calls: next sync
                    self._known.pop(nid, None)
                    continue
                reg = _parse(nid, body)
                if reg is not None:
                    cred = c.decode(errors="replace")
                    judged = judge(dataclasses.replace(reg, credential=cred))
                    if judged is None:
                        log.warning("a node in the shared registry does not verify here")
                    reg = judged
                self._known[nid] = _Known(d, c, reg)
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
