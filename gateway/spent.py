"""The spent-token store: a Privacy Pass token is accepted at most once, across replicas.

Two backends, one contract (tests/test_gateway.py runs it against both):
SQLite (embedded default; also safe for several gateway processes on one host) and
Redis (replicas on several hosts). ``mark_spent`` is a single atomic operation in
both, so two racing redemptions of one token can never both succeed.

An entry lives ``ttl`` seconds. That is safe only while no token key is accepted for
longer than ``ttl``, whatever the issuer's key lifetime says: so the store also remembers
when each token key was first redeemed (``key_first_redeemed``, kept for good), and the
gateway refuses a key after ``ttl`` (gateway/redeem.py). A token spent at t was redeemed
no earlier than its key's first redemption s, so any replay while the key is still
accepted (before s + ttl) comes before t + ttl, while the record is still there.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from abc import ABC, abstractmethod
from pathlib import Path

# Issuer default key lifetime (30 days) + its rotation lead (1 h), rounded up.
DEFAULT_TTL = 32 * 24 * 3600
PURGE_EVERY = 3600.0


class SpentStore(ABC):
    @abstractmethod
    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        """Atomically record (key_id, nonce); True if it was not spent before."""

    @abstractmethod
    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        """When a token under ``key_id`` was first redeemed (``now`` if this is the first);
        atomic, shared by every replica of the store, never forgotten."""

    @abstractmethod
    async def close(self) -> None: ...


class SQLiteSpentStore(SpentStore):
    """``INSERT`` into a PRIMARY KEY table: the database decides which racer wins.

    An upsert revives an entry only once it has expired, in the same statement, so
    expiry needs no separate read (which would reopen the race).
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spent ("
            " key_id BLOB NOT NULL, nonce BLOB NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (key_id, nonce)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS token_keys ("
            " key_id BLOB PRIMARY KEY, first_redeemed REAL NOT NULL) WITHOUT ROWID"
        )
        self._lock = asyncio.Lock()
        self._next_purge = 0.0

    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        now = time.time()
        async with self._lock:
            cur = self._db.execute(
                "INSERT INTO spent (key_id, nonce, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key_id, nonce) DO UPDATE SET expires_at = excluded.expires_at "
                "WHERE spent.expires_at <= ?",
                (bytes(key_id), bytes(nonce), now + ttl, now),
            )
            fresh = cur.rowcount == 1
            if now >= self._next_purge:
                self._next_purge = now + PURGE_EVERY
                self._db.execute("DELETE FROM spent WHERE expires_at <= ?", (now,))
        return fresh

    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        async with self._lock:
            self._db.execute(
                "INSERT INTO token_keys (key_id, first_redeemed) VALUES (?, ?) "
                "ON CONFLICT(key_id) DO NOTHING",
                (bytes(key_id), now),
            )
            (first,) = self._db.execute(
                "SELECT first_redeemed FROM token_keys WHERE key_id = ?", (bytes(key_id),)
            ).fetchone()
        return float(first)

    async def close(self) -> None:
        self._db.close()


class RedisSpentStore(SpentStore):
    """``SET key 1 NX EX ttl``: one round trip, atomic on the Redis server."""

    def __init__(self, url: str, prefix: str = "openpcc:gateway:spent:") -> None:
        import redis.asyncio as aioredis  # optional extra: openpcc[redis]

        self._r = aioredis.from_url(url)
        self._p = prefix

    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        name = f"{self._p}{bytes(key_id).hex()}:{bytes(nonce).hex()}"
        return bool(await self._r.set(name, b"1", nx=True, ex=max(1, int(ttl))))

    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        name = f"{self._p}key:{bytes(key_id).hex()}"
        async with self._r.pipeline(transaction=True) as tx:  # MULTI: SET NX, then GET
            _, first = await tx.set(name, repr(now).encode(), nx=True).get(name).execute()
        return float(first)

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()


def open_spent_store(
    state_dir: Path, redis_url: str | None = None, redis_prefix: str = "openpcc:gateway:"
) -> SpentStore:
    """The backend for this configuration (Redis when given, else SQLite in the state dir)."""
    if redis_url:
        return RedisSpentStore(redis_url, redis_prefix + "spent:")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SQLiteSpentStore(state_dir / "spent.sqlite3")
