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

Across a crash: ``mark_spent`` answers True only once the record is durable. The gateway
uses ``spend``, the same in two steps: it forwards once the store has decided the token
is fresh, and sends the client nothing of the answer before the record is durable
(``Spend.durable``), so the fsync overlaps the node's work instead of preceding it; if it
fails, the client gets 503 and no answer. SQLite: the commit that holds the record has
returned with ``synchronous=FULL``, so the WAL is fsynced, and a killed process or a
lost power leaves the record in place (``SQLiteSpentStore``). Redis: Redis has answered
the SET, so the record is as durable as Redis's persistence makes it (AOF; docs/THREATS.md).
A crash before the record was durable delivered no answer; the record may or may not be
there after the restart, so such a token is answered at most once, or refused as spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.resp import Resp

# Issuer default key lifetime (30 days) + its rotation lead (1 h), rounded up.
DEFAULT_TTL = 32 * 24 * 3600
PURGE_EVERY = 3600.0


@dataclass(frozen=True)
class Spend:
    """A token's redemption in two steps. ``fresh``: it was not spent before (known as soon
    as the store has decided, before its record is durable). ``durable``: resolves once the
    record is durable, raises if it could not be made so; nothing may reach the client
    before it resolves (gateway/forward.py), so the gateway's work overlaps the fsync."""

    fresh: bool
    durable: Awaitable[object]


class SpentStore(ABC):
    @abstractmethod
    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        """Atomically record (key_id, nonce); True if it was not spent before. Returns only
        once the record is as durable as the store makes it."""

    async def spend(self, key_id: bytes, nonce: bytes, ttl: int) -> Spend:
        """``mark_spent`` in two steps (see Spend); stores whose answer is already durable
        (Redis's reply) keep this default."""
        return Spend(await self.mark_spent(key_id, nonce, ttl), _DURABLE)

    @abstractmethod
    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        """When a token under ``key_id`` was first redeemed (``now`` if this is the first);
        atomic, shared by every replica of the store, never forgotten."""

    @abstractmethod
    async def close(self) -> None: ...


_SPEND = (
    "INSERT INTO spent (key_id, nonce, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT(key_id, nonce) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE spent.expires_at <= ?"
)
_FIRST = (
    "INSERT INTO token_keys (key_id, first_redeemed) VALUES (?, ?) ON CONFLICT(key_id) DO NOTHING"
)
_FIRST_GET = "SELECT first_redeemed FROM token_keys WHERE key_id = ?"
_PURGE = "DELETE FROM spent WHERE expires_at <= ?"
MAX_BATCH = 256  # operations in one transaction
LOCK_RETRY = (0.0005, 0.02)  # first and longest wait for another process's write lock, s
LOCK_WAIT = 30.0  # then the operations fail (the gateway answers 503)


class SQLiteSpentStore(SpentStore):
    """An upsert into a PRIMARY KEY table: the database decides which racer wins.

    The upsert revives an entry only once it has expired, in the same statement, so expiry
    needs no separate read (which would reopen the race).

    Group commit. Operations wait in a queue; one transaction takes all that queued
    (``BEGIN IMMEDIATE``, one upsert each, on the event loop: a few µs apiece, results
    known at once: ``spend``'s ``fresh``), then ``COMMIT`` runs in a worker thread while
    the next ones queue. ``mark_spent`` and ``Spend.durable`` resolve only after that
    commit returned, so with ``durable``
    (the default, ``synchronous=FULL``: SQLite fsyncs the WAL in every commit) a token
    is accepted only once its record is on stable storage: a gateway process that is
    killed, or a host that loses power, restarts with every accepted token still spent.
    A crash before the commit returned accepted nothing (the caller was still waiting);
    the token may then be recorded or not, and is accepted at most once after the restart.
    ``durable=False`` (``synchronous=NORMAL``) commits on the loop and survives a killed
    process (the WAL is in the OS cache), not a power loss: tests and benchmarks only.

    Several processes may share the file (``--workers``, or replicas on one host): the
    loop never waits on another one's write lock (``busy_timeout`` 0); it retries the
    transaction later, for up to ``LOCK_WAIT`` seconds. One store serves one event loop.
    """

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spent ("
            " key_id BLOB NOT NULL, nonce BLOB NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (key_id, nonce)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS token_keys ("
            " key_id BLOB PRIMARY KEY, first_redeemed REAL NOT NULL) WITHOUT ROWID"
        )
        self._db.execute("PRAGMA busy_timeout=0")  # from here on: never block the loop
        self.durable = durable
        self._committer = (
            ThreadPoolExecutor(1, thread_name_prefix="openpcc-spent") if durable else None
        )
        self._queue: list[_Op] = []
        self._inflight: list[_Op] = []  # the batch being committed
        self._running = False  # a batch is in flight (or scheduled): the next one waits
        self._idle: asyncio.Event | None = None
        self._next_purge = 0.0
        self._locked_since: float | None = None
        self._retry = LOCK_RETRY[0]

    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        return bool(await self._submit(_Op(bytes(key_id), nonce=bytes(nonce), ttl=ttl)))

    async def spend(self, key_id: bytes, nonce: bytes, ttl: int) -> Spend:
        """Fresh once the upsert ran in the open transaction; durable after its COMMIT."""
        op = _Op(bytes(key_id), nonce=bytes(nonce), ttl=ttl)
        op.fresh = asyncio.get_running_loop().create_future()
        durable = self._submit(op)
        durable.add_done_callback(_retrieve)  # a refused token's caller never awaits it
        return Spend(bool(await op.fresh), durable)

    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        return float(await self._submit(_Op(bytes(key_id), now=now)))

    def _submit(self, op: _Op) -> asyncio.Future[bool | float]:
        loop = asyncio.get_running_loop()
        op.future = loop.create_future()
        self._queue.append(op)
        if not self._running:
            self._running = True
            # Not at once: the other requests this loop pass redeems join the batch.
            loop.call_soon(self._begin, loop)
        return op.future

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Apply the queued operations in one open transaction, then commit it."""
        try:
            self._batch(loop)
        except BaseException as exc:  # a bug here must not leave callers waiting for ever
            self._rollback()
            ops, self._inflight, self._queue = [*self._inflight, *self._queue], [], []
            self._running = False
            self._fail(ops, exc)
            raise

    def _batch(self, loop: asyncio.AbstractEventLoop) -> None:
        ops = self._queue[:MAX_BATCH]
        if not ops:
            self._running = False
            if self._idle is not None:
                self._idle.set()
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if self._lock_wait(loop, exc):
                return  # another process holds the write lock: _begin runs again later
            del self._queue[: len(ops)]
            self._settle(loop, ops, None, exc)
            return
        self._locked_since, self._retry = None, LOCK_RETRY[0]
        del self._queue[: len(ops)]
        self._inflight = ops
        now = time.time()
        try:
            results = [self._apply(op, now) for op in ops]
        except Exception as exc:
            self._rollback()
            self._settle(loop, ops, None, exc)
            return
        for op, result in zip(ops, results, strict=True):
            if op.fresh is not None and not op.fresh.done():
                op.fresh.set_result(result)  # decided; durable only after the commit
        purge = now >= self._next_purge
        if purge:
            self._next_purge = now + PURGE_EVERY
        if self._committer is None:  # not durable: a commit without fsync, here
            try:
                self._commit(purge, now)
            except Exception as exc:
                self._settle(loop, ops, None, exc)
            else:
                self._settle(loop, ops, results, None)
            return
        done = loop.run_in_executor(self._committer, self._commit, purge, now)
        done.add_done_callback(lambda f: self._committed(loop, ops, results, f))

    def _apply(self, op: _Op, now: float) -> bool | float:
        db = self._db
        if op.nonce is not None:
            return db.execute(_SPEND, (op.key_id, op.nonce, now + op.ttl, now)).rowcount == 1
        db.execute(_FIRST, (op.key_id, op.now))
        return float(db.execute(_FIRST_GET, (op.key_id,)).fetchone()[0])

    def _commit(self, purge: bool, now: float) -> None:
        """In the worker thread (durable) or on the loop: the expiry sweep, hourly, then
        the commit (with ``durable``, SQLite's fsync of the WAL)."""
        try:
            if purge:
                self._db.execute(_PURGE, (now,))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _committed(
        self,
        loop: asyncio.AbstractEventLoop,
        ops: list[_Op],
        results: list[bool | float],
        done: asyncio.Future[None],
    ) -> None:
        exc = None if done.cancelled() else done.exception()
        if done.cancelled():
            exc = sqlite3.OperationalError("spent-token commit cancelled")
        self._settle(loop, ops, None if exc else results, exc)

    def _settle(
        self,
        loop: asyncio.AbstractEventLoop,
        ops: list[_Op],
        results: list[bool | float] | None,
        exc: BaseException | None,
    ) -> None:
        """Answer a batch (all of it, or none: a failed commit accepted no token), then
        start the next one with whatever queued meanwhile."""
        self._inflight = []
        if results is None:
            self._fail(ops, exc or sqlite3.OperationalError("spent-token store failed"))
        else:
            for op, result in zip(ops, results, strict=True):
                if op.future is not None and not op.future.done():  # else: caller gone
                    op.future.set_result(result)
        self._begin(loop)

    @staticmethod
    def _fail(ops: list[_Op], exc: BaseException) -> None:
        for op in ops:
            for fut in (op.fresh, op.future):
                if fut is not None and not fut.done():
                    fut.set_exception(exc)

    def _lock_wait(self, loop: asyncio.AbstractEventLoop, exc: sqlite3.OperationalError) -> bool:
        """Another process writes: try again shortly, backing off, for up to LOCK_WAIT s."""
        if getattr(exc, "sqlite_errorcode", None) not in (
            sqlite3.SQLITE_BUSY,
            sqlite3.SQLITE_LOCKED,
        ):
            return False
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        elif now - self._locked_since > LOCK_WAIT:
            self._locked_since, self._retry = None, LOCK_RETRY[0]
            return False
        loop.call_later(self._retry, self._begin, loop)
        self._retry = min(self._retry * 2, LOCK_RETRY[1])
        return True

    async def close(self) -> None:
        if self._running:  # let the batch in flight and those queued finish
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._db.close()


@dataclass(slots=True)
class _Op:
    """One queued operation: a token to spend (``nonce``) or a key's first redemption."""

    key_id: bytes
    nonce: bytes | None = None
    ttl: int = 0
    now: float = 0.0
    future: asyncio.Future[bool | float] | None = None  # the answer, once durable
    fresh: asyncio.Future[bool | float] | None = None  # spend(): the answer, once decided


class RedisSpentStore(SpentStore):
    """``SET key 1 NX EX ttl``: atomic on the Redis server, one command per token.

    The tokens redeemed in one event-loop pass go out together, as one write of pipelined
    commands (no MULTI: each SET stands alone, and its own reply says whether it was
    first): through gateway/resp.py for plain ``redis://``/``rediss://`` URLs (a few µs
    per command), else one redis-py pipeline per batch (~50 µs per command; a lone
    redis-py command cost ~120). A caller's answer is Redis's reply to its SET, so the
    durability is Redis's (docs/THREATS.md: run it with AOF).
    """

    def __init__(self, url: str, prefix: str = "openpcc:gateway:spent:") -> None:
        import redis.asyncio as aioredis  # optional extra: openpcc[redis]

        self._r = aioredis.from_url(url)
        self._p = prefix
        self._lean = Resp.for_url(url)  # gateway/resp.py; None: redis-py pipelines instead
        self._queue: list[tuple[str, int, asyncio.Future[bool]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def mark_spent(self, key_id: bytes, nonce: bytes, ttl: int) -> bool:
        name = f"{self._p}{bytes(key_id).hex()}:{bytes(nonce).hex()}"
        if self._lean is not None:
            return await self._lean.set_nx(name.encode(), max(1, int(ttl)))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._queue.append((name, max(1, int(ttl)), fut))
        if self._sender is None:
            # Its first step runs after this loop pass: what else is redeemed now joins.
            self._sender = loop.create_task(self._send())
        return await fut

    async def _send(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                try:
                    async with self._r.pipeline(transaction=False) as pipe:
                        for name, ttl, _ in batch:
                            pipe.set(name, b"1", nx=True, ex=ttl)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # connection lost, timeout: none of them is known
                    _fail([fut for *_, fut in batch], exc)
                    continue
                except BaseException:  # cancelled (shutdown): nobody is left waiting
                    _fail([fut for *_, fut in batch + self._queue], ConnectionError("closed"))
                    self._queue.clear()
                    raise
                for (*_, fut), reply in zip(batch, replies, strict=True):
                    if fut.done():
                        continue  # the caller went away; its token stays spent
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(bool(reply))
        finally:
            self._sender = None

    async def key_first_redeemed(self, key_id: bytes, now: float) -> float:
        name = f"{self._p}key:{bytes(key_id).hex()}"
        async with self._r.pipeline(transaction=True) as tx:  # MULTI: SET NX, then GET
            _, first = await tx.set(name, repr(now).encode(), nx=True).get(name).execute()
        return float(first)

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await self._sender
        await self._r.aclose()


class _Durable:
    """Already durable: awaiting it returns at once."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_DURABLE = _Durable()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: no "never retrieved" warning


def _fail(futures: list[asyncio.Future[bool]], exc: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


def open_spent_store(
    state_dir: Path, redis_url: str | None = None, redis_prefix: str = "openpcc:gateway:"
) -> SpentStore:
    """The backend for this configuration (Redis when given, else SQLite in the state dir)."""
    if redis_url:
        return RedisSpentStore(redis_url, redis_prefix + "spent:")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SQLiteSpentStore(state_dir / "spent.sqlite3")
