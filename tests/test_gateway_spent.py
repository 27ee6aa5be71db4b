"""The SQLite spent-token store's group commit and durability (gateway/spent.py).

The contract both backends keep is in tests/test_gateway.py. Here: tokens redeemed
together share one transaction (fewer commits than tokens, each answered correctly); an
answer comes only after its commit, with the WAL fsynced (``synchronous=FULL``), so a
process killed right after its answers restarts with every token spent; a failed commit
accepts nothing; another process's write lock makes the store wait without blocking
its event loop; ``spend`` says "fresh" before the commit and "durable" after it, and the
gateway sends no answer byte before "durable" (tests/test_gateway_forward_durable.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway import spent
from gateway.spent import SQLiteSpentStore


def _commits(store: SQLiteSpentStore) -> list[str]:
    seen: list[str] = []
    store._db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def _fail_commits(store: SQLiteSpentStore, monkeypatch: pytest.MonkeyPatch) -> object:
    """Every COMMIT fails (as a full or broken disk would); returns the real one."""
    real = store._commit

    def failing(purge: bool, now: float) -> None:
        store._rollback()
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_commit", failing)
    return real


async def test_tokens_redeemed_together_share_a_commit(tmp_path: Path) -> None:
    store = SQLiteSpentStore(tmp_path / "s.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    commits = _commits(store)
    nonces = [bytes([i]) * 32 for i in range(40)]
    results = await asyncio.gather(
        *(store.mark_spent(b"k" * 32, n, 60) for n in nonces + nonces[:5]),
        store.key_first_redeemed(b"k" * 32, 12.5),
    )
    assert results == [True] * 40 + [False] * 5 + [12.5]
    assert 1 <= len(commits) < 10, commits
    await store.close()


def test_a_process_killed_after_its_answers_restarts_with_the_tokens_spent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    child = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from pathlib import Path
        from gateway.spent import SQLiteSpentStore

        async def main():
            store = SQLiteSpentStore(Path({str(path)!r}))
            ok = await asyncio.gather(*(store.mark_spent(b"k" * 32, bytes([i]) * 32, 600)
                                        for i in range(50)))
            assert all(ok)
            print("answered", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no commit left to run

        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9 and "answered" in out.stdout, out.stderr

    async def check() -> list[bool]:
        store = SQLiteSpentStore(path)
        try:
            return await asyncio.gather(
                *(store.mark_spent(b"k" * 32, bytes([i]) * 32, 600) for i in range(50))
            )
        finally:
            await store.close()

    assert asyncio.run(check()) == [False] * 50


async def test_a_failed_commit_accepts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteSpentStore(tmp_path / "s.sqlite3")
    real = _fail_commits(store, monkeypatch)
    got = await asyncio.gather(
        *(store.mark_spent(b"k" * 32, bytes([i]) * 32, 60) for i in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(g, sqlite3.OperationalError) for g in got), got
    monkeypatch.setattr(store, "_commit", real)
    # Rolled back: the same tokens are still unspent, and the store works on.
    assert (
        await asyncio.gather(*(store.mark_spent(b"k" * 32, bytes([i]) * 32, 60) for i in range(5)))
        == [True] * 5
    )
    await store.close()


async def test_another_process_holding_the_lock_does_not_block_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.sqlite3"
    store = SQLiteSpentStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick = asyncio.create_task(ticker())
    pending = asyncio.create_task(store.mark_spent(b"k" * 32, b"n" * 32, 60))
    await asyncio.sleep(0.3)
    assert not pending.done() and ticks >= 10  # waiting, and the loop runs on
    other.execute("ROLLBACK")
    assert await pending
    tick.cancel()
    other.close()
    # A lock held past LOCK_WAIT fails the redemption (503), it does not hang it.
    monkeypatch.setattr(spent, "LOCK_WAIT", 0.2)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    t = time.monotonic()
    with pytest.raises(sqlite3.OperationalError):
        await store.mark_spent(b"k" * 32, b"m" * 32, 60)
    assert time.monotonic() - t < 5
    other.execute("ROLLBACK")
    other.close()
    assert await store.mark_spent(b"k" * 32, b"m" * 32, 60)
    await store.close()


async def test_spend_is_decided_before_its_commit_and_durable_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: the gateway forwards once a token is known fresh and overlaps the fsync
    with the node's work; ``durable`` resolves only once COMMIT returned."""
    import threading

    store = SQLiteSpentStore(tmp_path / "s.sqlite3")
    real, gate = store._commit, threading.Event()

    def slow(purge: bool, now: float) -> None:
        assert gate.wait(10)
        real(purge, now)

    monkeypatch.setattr(store, "_commit", slow)
    got = await asyncio.wait_for(store.spend(b"k" * 32, b"n" * 32, 60), 5)
    assert got.fresh
    durable = asyncio.ensure_future(got.durable)
    await asyncio.sleep(0.05)
    assert not durable.done()  # decided, not yet on disk
    gate.set()
    await asyncio.wait_for(durable, 5)
    assert not (await store.spend(b"k" * 32, b"n" * 32, 60)).fresh
    await store.close()


async def test_a_failed_commit_after_fresh_leaves_the_token_unspent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteSpentStore(tmp_path / "s.sqlite3")
    real = _fail_commits(store, monkeypatch)
    got = await store.spend(b"k" * 32, b"n" * 32, 60)
    assert got.fresh  # decided in the open transaction...
    with pytest.raises(sqlite3.OperationalError):
        await got.durable  # ...which never became durable: the gateway answers 503
    monkeypatch.setattr(store, "_commit", real)
    again = await store.spend(b"k" * 32, b"n" * 32, 60)
    assert again.fresh  # rolled back: the token was never spent
    await again.durable
    await store.close()
