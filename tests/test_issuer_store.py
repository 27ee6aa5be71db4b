"""One contract suite for both issuer state backends (SQLite and a real Redis)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokens.store import (
    AccountExistsError,
    AccountNotFoundError,
    IssuerStore,
    RedisStore,
    SQLiteStore,
    StoreError,
    hash_api_key,
    new_api_key,
)

_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IssuerStore]:
    if request.param == "sqlite":
        s: IssuerStore = SQLiteStore(tmp_path / "issuer.sqlite3")
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisStore(url, prefix=f"test{next(_prefixes)}:")
    yield s
    await s.close()


T0 = 1_000_000.0  # a window boundary for per=100 and per=10


async def test_account_lifecycle(store: IssuerStore) -> None:
    key = new_api_key()
    acct = await store.add_account("alice", hash_api_key(key), 5, 60, T0)
    assert (acct.name, acct.quota, acct.per_seconds, acct.revoked) == ("alice", 5, 60, False)
    found = await store.account_by_key_hash(hash_api_key(key))
    assert found is not None and found.name == "alice"
    assert await store.account_by_key_hash(hash_api_key(new_api_key())) is None
    with pytest.raises(AccountExistsError):
        await store.add_account("alice", hash_api_key(new_api_key()), 1, 1, T0)
    await store.set_quota("alice", 7, 30)
    got = await store.get_account("alice")
    assert (got.quota, got.per_seconds) == (7, 30)
    await store.revoke("alice")
    assert (await store.get_account("alice")).revoked
    assert [a.name for a in await store.list_accounts()] == ["alice"]
    for bad in (store.revoke("bob"), store.set_quota("bob", 1, 1), store.get_account("bob")):
        with pytest.raises(AccountNotFoundError):
            await bad


async def test_invalid_account_values(store: IssuerStore) -> None:
    for name, quota, per in (("", 1, 1), ("a b", 1, 1), ("x", -1, 1), ("x", 1, 0)):
        with pytest.raises(StoreError):
            await store.add_account(name, hash_api_key(new_api_key()), quota, per, T0)
    assert await store.list_accounts() == []


async def test_consume_window_all_or_nothing(store: IssuerStore) -> None:
    await store.add_account("a", "h1", 10, 100, T0)
    d = await store.consume("a", 7, T0 + 1)
    assert d.granted and d.used == 7 and d.limit == 10
    d = await store.consume("a", 4, T0 + 2)  # would exceed: nothing taken
    assert not d.granted and d.used == 7 and d.retry_after == 98
    d = await store.consume("a", 3, T0 + 3)
    assert d.granted and d.used == 10
    assert not (await store.consume("a", 1, T0 + 99.5)).granted
    d = await store.consume("a", 10, T0 + 100)  # next window
    assert d.granted and d.used == 10
    await store.refund("a", 4, T0 + 101)
    assert (await store.consume("a", 4, T0 + 102)).granted
    with pytest.raises(AccountNotFoundError):
        await store.consume("nobody", 1, T0)
    with pytest.raises(StoreError):
        await store.consume("a", 0, T0)


async def test_consume_races_never_over_issue(store: IssuerStore) -> None:
    await store.add_account("race", "h2", 37, 1000, T0)
    results = await asyncio.gather(*(store.consume("race", 2, T0 + 1) for _ in range(50)))
    granted = sum(r.granted for r in results)
    assert granted == 18  # 18 * 2 = 36 <= 37 < 38
    assert max(r.used for r in results) == 36


async def test_quota_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "issuer.sqlite3"
    s = SQLiteStore(path)
    await s.add_account("p", "h3", 3, 100, T0)
    assert (await s.consume("p", 3, T0 + 1)).granted
    await s.close()
    s = SQLiteStore(path)
    assert not (await s.consume("p", 1, T0 + 2)).granted
    await s.close()
