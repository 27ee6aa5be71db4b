"""Issuer state: accounts and quota counters behind one async interface.

Two backends share one contract (tests/test_issuer_store.py runs against both):
SQLite (embedded default, WAL) and Redis (several issuer replicas). Quota checks
are all-or-nothing and atomic, so 50 racing requests never over-issue.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import sqlite3
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpcc.errors import OpenPCCError

API_KEY_PREFIX = "opcc_"


class StoreError(OpenPCCError):
    """Issuer state error a CLI or service reports to its user."""


class AccountExistsError(StoreError):
    pass


class AccountNotFoundError(StoreError):
    pass


@dataclass(frozen=True)
class Account:
    name: str
    quota: int
    per_seconds: int
    revoked: bool
    created_at: float


@dataclass(frozen=True)
class QuotaDecision:
    granted: bool
    used: int  # tokens issued in the current window, after this decision
    limit: int
    retry_after: int  # seconds until the window resets (meaningful when not granted)


def new_api_key() -> str:
    """A random bearer key; only its hash is ever stored."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough (no offline guessing).
    return hashlib.sha256(key.encode()).hexdigest()


def _window(now: float, per: int) -> tuple[int, int]:
    """Fixed window index and seconds until it ends."""
    idx = math.floor(now / per)
    return idx, max(1, math.ceil((idx + 1) * per - now))


def _validate_quota(quota: int, per_seconds: int) -> None:
    if quota < 0:
        raise StoreError("quota must be >= 0")
    if per_seconds < 1:
        raise StoreError("window (--per) must be >= 1 second")


def _validate_name(name: str) -> None:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.@" for c in name):
        raise StoreError("account name: 1-128 characters of letters, digits, '-', '_', '.', '@'")


class IssuerStore(ABC):
    """Accounts (looked up by API-key hash) and per-window issuance counters."""

    @abstractmethod
    async def add_account(
        self, name: str, key_hash: str, quota: int, per_seconds: int, now: float
    ) -> Account: ...

    @abstractmethod
    async def account_by_key_hash(self, key_hash: str) -> Account | None: ...

    @abstractmethod
    async def get_account(self, name: str) -> Account: ...

    @abstractmethod
    async def list_accounts(self) -> list[Account]: ...

    @abstractmethod
    async def revoke(self, name: str) -> None: ...

    @abstractmethod
    async def set_quota(self, name: str, quota: int, per_seconds: int) -> None: ...

    @abstractmethod
    async def consume(self, name: str, n: int, now: float) -> QuotaDecision:
        """Atomically take ``n`` tokens from the current window, or none at all."""

    @abstractmethod
    async def refund(self, name: str, n: int, now: float) -> None:
        """Give back tokens taken by ``consume`` when issuance then failed."""

    @abstractmethod
    async def close(self) -> None: ...


class SQLiteStore(IssuerStore):
    """Embedded default. BEGIN IMMEDIATE serialises writers across processes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS accounts (
                name TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                quota INTEGER NOT NULL,
                per_seconds INTEGER NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS usage (
                name TEXT NOT NULL,
                window INTEGER NOT NULL,
                used INTEGER NOT NULL,
                PRIMARY KEY (name, window)
            );
            """
        )
        self._lock = asyncio.Lock()

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Account:
        return Account(row[0], int(row[1]), int(row[2]), bool(row[3]), float(row[4]))

    async def add_account(
        self, name: str, key_hash: str, quota: int, per_seconds: int, now: float
    ) -> Account:
        _validate_name(name)
        _validate_quota(quota, per_seconds)
        try:
            self._db.execute(
                "INSERT INTO accounts (name, key_hash, quota, per_seconds, revoked, created_at) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                (name, key_hash, quota, per_seconds, now),
            )
        except sqlite3.IntegrityError as exc:
            raise AccountExistsError(f"account {name!r} already exists") from exc
        return Account(name, quota, per_seconds, False, now)

    async def account_by_key_hash(self, key_hash: str) -> Account | None:
        row = self._db.execute(
            "SELECT name, quota, per_seconds, revoked, created_at FROM accounts WHERE key_hash=?",
            (key_hash,),
        ).fetchone()
        return None if row is None else self._row(row)

    async def get_account(self, name: str) -> Account:
        row = self._db.execute(
            "SELECT name, quota, per_seconds, revoked, created_at FROM accounts WHERE name=?",
            (name,),
        ).fetchone()
        if row is None:
            raise AccountNotFoundError(f"no account named {name!r}")
        return self._row(row)

    async def list_accounts(self) -> list[Account]:
        rows = self._db.execute(
            "SELECT name, quota, per_seconds, revoked, created_at FROM accounts ORDER BY name"
        ).fetchall()
        return [self._row(r) for r in rows]

    async def revoke(self, name: str) -> None:
        cur = self._db.execute("UPDATE accounts SET revoked=1 WHERE name=?", (name,))
        if cur.rowcount == 0:
            raise AccountNotFoundError(f"no account named {name!r}")

    async def set_quota(self, name: str, quota: int, per_seconds: int) -> None:
        _validate_quota(quota, per_seconds)
        cur = self._db.execute(
            "UPDATE accounts SET quota=?, per_seconds=? WHERE name=?", (quota, per_seconds, name)
        )
        if cur.rowcount == 0:
            raise AccountNotFoundError(f"no account named {name!r}")

    async def consume(self, name: str, n: int, now: float) -> QuotaDecision:
        if n < 1:
            raise StoreError("must consume at least one token")
        async with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                acct = db.execute(
                    "SELECT quota, per_seconds FROM accounts WHERE name=?", (name,)
                ).fetchone()
                if acct is None:
                    raise AccountNotFoundError(f"no account named {name!r}")
                quota, per = int(acct[0]), int(acct[1])
                window, retry = _window(now, per)
                row = db.execute(
                    "SELECT used FROM usage WHERE name=? AND window=?", (name, window)
                ).fetchone()
                used = 0 if row is None else int(row[0])
                if used + n > quota:
                    db.execute("COMMIT")
                    return QuotaDecision(False, used, quota, retry)
                db.execute(
                    "INSERT INTO usage (name, window, used) VALUES (?, ?, ?) "
                    "ON CONFLICT(name, window) DO UPDATE SET used = used + excluded.used",
                    (name, window, n),
                )
                # Old windows are dead weight; drop them while we hold the lock.
                db.execute("DELETE FROM usage WHERE name=? AND window<?", (name, window))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return QuotaDecision(True, used + n, quota, retry)

    async def refund(self, name: str, n: int, now: float) -> None:
        acct = await self.get_account(name)
        window, _ = _window(now, acct.per_seconds)
        self._db.execute(
            "UPDATE usage SET used = MAX(0, used - ?) WHERE name=? AND window=?",
            (n, name, window),
        )

    async def close(self) -> None:
        self._db.close()


# KEYS[1] = account hash, KEYS[2] = usage counter; ARGV = n, now
_CONSUME_LUA = """
local quota = tonumber(redis.call('HGET', KEYS[1], 'quota'))
local per = tonumber(redis.call('HGET', KEYS[1], 'per_seconds'))
if quota == nil or per == nil then return {-1, 0, 0} end
local n = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used + n > quota then return {0, used, quota} end
used = redis.call('INCRBY', KEYS[2], n)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return {1, used, quota}
"""


class RedisStore(IssuerStore):
    """Shared state for several issuer replicas; counters expire with their window."""

    def __init__(self, url: str, prefix: str = "openpcc:issuer:") -> None:
        import redis.asyncio as aioredis  # optional extra: openpcc[redis]

        self._r = aioredis.from_url(url, decode_responses=True)
        self._p = prefix
        self._consume = self._r.register_script(_CONSUME_LUA)

    def _acct(self, name: str) -> str:
        return f"{self._p}acct:{name}"

    def _hash(self, key_hash: str) -> str:
        return f"{self._p}keyhash:{key_hash}"

    @staticmethod
    def _from(d: dict[str, str]) -> Account:
        return Account(
            d["name"],
            int(d["quota"]),
            int(d["per_seconds"]),
            d["revoked"] == "1",
            float(d["created_at"]),
        )

    async def add_account(
        self, name: str, key_hash: str, quota: int, per_seconds: int, now: float
    ) -> Account:
        _validate_name(name)
        _validate_quota(quota, per_seconds)
        fields = {
            "name": name,
            "key_hash": key_hash,
            "quota": str(quota),
            "per_seconds": str(per_seconds),
            "revoked": "0",
            "created_at": repr(now),
        }
        # HSETNX on the name first makes creation race-free across replicas.
        if not await self._r.hsetnx(self._acct(name), "name", name):
            raise AccountExistsError(f"account {name!r} already exists")
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._acct(name), mapping=fields)
            pipe.set(self._hash(key_hash), name)
            pipe.sadd(f"{self._p}accounts", name)
            await pipe.execute()
        return self._from(fields)

    async def account_by_key_hash(self, key_hash: str) -> Account | None:
        name = await self._r.get(self._hash(key_hash))
        if name is None:
            return None
        d = await self._r.hgetall(self._acct(name))
        return self._from(d) if d else None

    async def get_account(self, name: str) -> Account:
        d = await self._r.hgetall(self._acct(name))
        if not d or "quota" not in d:
            raise AccountNotFoundError(f"no account named {name!r}")
        return self._from(d)

    async def list_accounts(self) -> list[Account]:
        names = sorted(await self._r.smembers(f"{self._p}accounts"))
        return [await self.get_account(n) for n in names]

    async def revoke(self, name: str) -> None:
        await self.get_account(name)
        await self._r.hset(self._acct(name), "revoked", "1")

    async def set_quota(self, name: str, quota: int, per_seconds: int) -> None:
        _validate_quota(quota, per_seconds)
        await self.get_account(name)
        await self._r.hset(
            self._acct(name), mapping={"quota": str(quota), "per_seconds": str(per_seconds)}
        )

    async def consume(self, name: str, n: int, now: float) -> QuotaDecision:
        if n < 1:
            raise StoreError("must consume at least one token")
        per = await self._r.hget(self._acct(name), "per_seconds")
        if per is None:
            raise AccountNotFoundError(f"no account named {name!r}")
        window, retry = _window(now, int(per))
        counter = f"{self._p}usage:{name}:{window}"
        ok, used, quota = await self._consume(
            keys=[self._acct(name), counter], args=[n, int(per) + 60]
        )
        if ok == -1:
            raise AccountNotFoundError(f"no account named {name!r}")
        return QuotaDecision(ok == 1, int(used), int(quota), retry)

    async def refund(self, name: str, n: int, now: float) -> None:
        acct = await self.get_account(name)
        window, _ = _window(now, acct.per_seconds)
        await self._r.decrby(f"{self._p}usage:{name}:{window}", n)

    async def close(self) -> None:
        await self._r.aclose()


def open_store(state_dir: Path, redis_url: str | None = None) -> IssuerStore:
    """The backend a CLI or service should use for this configuration."""
    if redis_url:
        return RedisStore(redis_url)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SQLiteStore(state_dir / "issuer.sqlite3")


def now() -> float:
    return time.time()
