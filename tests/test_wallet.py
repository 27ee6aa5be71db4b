"""Token wallet against the REAL issuer service, started as a separate process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import json
import os
import signal
import stat
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from openpcc.client import (
    IssuerAuthError,
    IssuerError,
    KeyConsistencyError,
    QuotaExceededError,
    TokenWallet,
    WalletError,
    WalletStoreError,
)
from openpcc.client.wallet import STORE_FORMAT, _retry_after
from openpcc.privacypass import batched, blindrsa, issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, Token, TokenChallenge, b64url_encode
from openpcc.privacypass.directory import IssuerDirectory, TokenKeyEntry
from tests.harness import Proc, cli, free_port, openpcc, serve_app

ISSUER_NAME = "issuer.test"
CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, ISSUER_NAME, b"", ())


@dataclass
class Issuer:
    proc: Proc
    state: Path

    @property
    def url(self) -> str:
        return self.proc.url

    def add_account(self, name: str, quota: int = 1000, per: int = 3600) -> str:
        out = cli(
            "issuer", "account", "add", name, "--quota", str(quota), "--per", str(per),
            "--state", str(self.state),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    def admin(self, *args: str) -> None:
        out = cli("issuer", *args, "--state", str(self.state))
        assert out.returncode == 0, out.stdout + out.stderr

    def directory(self) -> bytes:
        with urllib.request.urlopen(self.url + "/.well-known/private-token-issuer-directory") as r:
            return bytes(r.read())


def start_issuer(state: Path) -> Issuer:
    proc = openpcc(state.name, state.parent, "issuer", "serve", "--state", str(state))
    return Issuer(proc, state)


def stop(proc: Proc) -> None:
    proc.stop(signal.SIGINT)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    iss = start_issuer(tmp_path_factory.mktemp("issuer") / "state")
    yield iss
    stop(iss.proc)


@pytest.fixture
def fresh_issuer(tmp_path: Path) -> Iterator[Issuer]:
    """An issuer of its own, for tests that rotate its keys."""
    iss = start_issuer(tmp_path / "issuer-state")
    yield iss
    stop(iss.proc)


class Counting:
    """An aiohttp session that counts requests per (method, path): round trips are the claim."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        trace = aiohttp.TraceConfig()

        async def on_start(_s: object, _ctx: object, params: aiohttp.TraceRequestStartParams):
            self.calls.append((params.method, params.url.path))

        trace.on_request_start.append(on_start)
        self.session = aiohttp.ClientSession(trace_configs=[trace])

    def posts(self) -> int:
        return sum(1 for m, _ in self.calls if m == "POST")


def wallet(iss_url: str, key: str, path: Path, **kw: object) -> TokenWallet:
    kw.setdefault("issuer_name", ISSUER_NAME)
    kw.setdefault("refill_jitter", 0.0)
    return TokenWallet(iss_url, key, path, **kw)  # type: ignore[arg-type]


def directory_key(raw: bytes) -> bytes:
    return IssuerDirectory.parse(raw).select_key().token_key


def stored_tokens(path: Path) -> list[str]:
    return [t["token"] for t in json.loads(path.read_text())["tokens"]]


# --------------------------------------------------------------------------- issuance


async def test_take_batch_in_one_round_trip(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("batch")
    http = Counting()
    w = wallet(
        issuer.url, key, tmp_path / "t.json", batch_size=25, low_water=0, session=http.session
    )
    try:
        tokens = [await w.take() for _ in range(25)]
    finally:
        await w.aclose()
        await http.session.close()
    assert http.posts() == 1, http.calls  # one batched request for all 25
    assert http.calls.count(("GET", "/.well-known/private-token-issuer-directory")) == 1
    pk = directory_key(issuer.directory())
    for tok in tokens:
        issuance.verify_token(pk, tok, expected_challenge=CHALLENGE)
    assert len({t.nonce for t in tokens}) == 25
    assert w.count() == 0


async def test_default_challenge_is_openpcc_gateways(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("default-challenge")
    async with TokenWallet(issuer.url, key, tmp_path / "t.json", batch_size=2, low_water=0) as w:
        tok = await w.take()
    # Gateway default: type 2, issuer_name = host of the issuer URL, empty context/origins.
    want = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "127.0.0.1", b"", ())
    issuance.verify_token(directory_key(issuer.directory()), tok, expected_challenge=want)


async def test_store_is_private_and_taken_tokens_are_gone(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("store")
    path = tmp_path / "wallet" / "tokens.json"
    async with wallet(issuer.url, key, path, batch_size=6, low_water=0) as w:
        first = await w.take()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        on_disk = stored_tokens(path)
        assert len(on_disk) == 5 == w.count()
        assert b64url_encode(first.encode()) not in on_disk
        assert json.loads(path.read_text())["format"] == STORE_FORMAT
        assert key not in path.read_text()
    async with wallet(issuer.url, key, path, batch_size=6, low_water=0) as w2:
        assert w2.count() == 5
        rest = [await w2.take() for _ in range(5)]
    assert first.nonce not in {t.nonce for t in rest}
    assert stored_tokens(path) == []
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave nothing behind


async def test_reserve_grows_in_the_background_and_files_the_rest_back(
    issuer: Issuer, tmp_path: Path
) -> None:
    """The first take leases exactly one token; later ones pop from the in-memory
    reserve, which is refilled from the file in the background; the file only ever
    loses tokens handed out or held, and aclose() files held ones back."""
    key = issuer.add_account("reserve")
    path = tmp_path / "tokens.json"
    async with wallet(issuer.url, key, path, batch_size=20, low_water=0, reserve=4) as w:
        taken = [await w.take()]
        await w.settle()
        assert len(stored_tokens(path)) == 19  # a one-shot run takes exactly one
        taken.append(await w.take())  # the reserve ran dry: target 2, lease 1 + 2
        assert len(stored_tokens(path)) == 16 and len(w._held) == 2 and w.count() == 18
        taken += [await w.take(), await w.take()]  # from memory; background leases
        await w.settle()
        assert 1 <= len(w._held) <= 2  # refilled, never above its target
        assert len(stored_tokens(path)) + len(w._held) == w.count() == 16
        taken += [await w.take() for _ in range(2)]
        await w.settle()
        assert len(w._held) <= 4  # never more than ``reserve`` held (lost on a crash)
        on_disk = set(stored_tokens(path))
        assert not on_disk & {b64url_encode(t.encode()) for t in taken}
        assert len(on_disk) + len(w._held) + len(taken) == 20
    assert len(stored_tokens(path)) == 14  # the held ones are back
    async with wallet(issuer.url, key, path, batch_size=20, low_water=0) as w2:
        rest = [await w2.take() for _ in range(14)]
    assert len({t.nonce for t in taken + rest}) == 20


async def test_many_concurrent_takers_get_distinct_tokens(issuer: Issuer, tmp_path: Path) -> None:
    """64 takers on one event loop, three takes each, while the reserve refills."""
    key = issuer.add_account("concurrent-64")
    path = tmp_path / "t.json"
    async with wallet(issuer.url, key, path, batch_size=100, low_water=0, reserve=16) as w:
        await w.refill(100)
        await w.refill(100)

        async def taker() -> list[Token]:
            out = []
            for _ in range(3):
                out.append(await w.take())
                await asyncio.sleep(0)
            return out

        got = [t for ts in await asyncio.gather(*(taker() for _ in range(64))) for t in ts]
        await w.settle()
        assert len({t.nonce for t in got}) == 192
        left = set(stored_tokens(path)) | {b64url_encode(e.token.encode()) for e in w._held}
        assert not left & {b64url_encode(t.encode()) for t in got}
        assert len(left) == 8 == w.count()


async def test_a_burst_of_takers_shares_file_transactions(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("burst")
    path = tmp_path / "tokens.json"
    async with wallet(issuer.url, key, path, batch_size=40, low_water=0, reserve=16) as w:
        await w.refill()
        store_pop = w._store.pop
        calls: list[int] = []

        def counting_pop(usable: Callable[..., bool], n: int = 1) -> object:
            calls.append(n)
            return store_pop(usable, n)

        w._store.pop = counting_pop  # type: ignore[method-assign]
        tokens = await asyncio.gather(*(w.take() for _ in range(12)))
        assert len({t.nonce for t in tokens}) == 12
        assert len(calls) <= 3, calls  # not one fsynced transaction per request
        assert w.count() == 28  # file and held together


async def test_concurrent_takers_never_share_a_token(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("concurrent")
    path = tmp_path / "t.json"
    # Two wallet objects on one file stand in for two processes sharing it.
    a = wallet(issuer.url, key, path, batch_size=10, low_water=3)
    b = wallet(issuer.url, key, path, batch_size=10, low_water=3)
    try:
        got = await asyncio.gather(*[(a if i % 2 else b).take() for i in range(40)])
    finally:
        await a.aclose()
        await b.aclose()
    assert len({t.nonce for t in got}) == 40


async def test_background_refill_keeps_count_above_low_water(
    issuer: Issuer, tmp_path: Path
) -> None:
    key = issuer.add_account("background")
    http = Counting()
    w = wallet(
        issuer.url,
        key,
        tmp_path / "t.json",
        batch_size=10,
        low_water=4,
        refill_jitter=0.02,
        session=http.session,
    )
    try:
        for _ in range(30):
            await w.take()
            await w.settle()
            assert w.count() >= 4
        posts_sequential = http.posts()
        # Many takes at once: still at most one refill in flight, never a storm.
        await asyncio.gather(*[w.take() for _ in range(8)])
        await w.settle()
        assert w.count() >= 4
    finally:
        await w.aclose()
        await http.session.close()
    assert posts_sequential <= 4  # 10 + 3 refills of 10 cover 30 takes
    assert http.posts() - posts_sequential <= 2
    assert w.last_refill_error is None


async def _warm_reserve(w: TokenWallet, n: int) -> None:
    """n concurrent takes grow the reserve's target to n; settle() lets it fill."""
    await asyncio.gather(*(w.take() for _ in range(n)))
    await w.settle()


async def test_take_never_waits_for_a_slow_writer(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the writer stuck in fsync (up to 2 s each), every take still returns from
    memory at once (< 0.4 s, 5x under one fsync; in practice microseconds)."""
    key = issuer.add_account("slow-disk")
    path = tmp_path / "t.json"
    async with wallet(issuer.url, key, path, batch_size=40, low_water=0, reserve=8) as w:
        await w.refill()
        await _warm_reserve(w, 8)
        gate = threading.Event()
        fsyncs: list[int] = []
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            fsyncs.append(fd)
            gate.wait(2.0)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", slow_fsync)
        try:
            took = []
            for _ in range(8):
                t0 = time.perf_counter()
                await w.take()
                took.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)  # the background lease starts and blocks in fsync
            writer_was_stuck = bool(fsyncs) and not gate.is_set()
        finally:
            gate.set()
        assert writer_was_stuck  # a lease was in flight, blocked, during the takes
        assert max(took) < 0.4, took
        await w.settle()
        assert w.count() == 40 - 16


async def test_aclose_during_a_lease_files_its_tokens_back(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() while a taker waits on a lease stuck in fsync: the taker gets
    WalletError, the lease lands, and its token goes back to the file (none lost)."""
    key = issuer.add_account("close-mid-lease")
    path = tmp_path / "t.json"
    w = wallet(issuer.url, key, path, batch_size=10, low_water=0)
    await w.refill()
    gate = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        gate.wait(5.0)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    taker = asyncio.create_task(w.take())
    await asyncio.sleep(0.2)  # its lease is in fsync now
    closing = asyncio.create_task(w.aclose())
    await asyncio.sleep(0.2)
    assert not closing.done()  # waits for the file transaction, which cannot be stopped
    gate.set()
    await closing
    with pytest.raises(WalletError):
        await taker
    assert len(stored_tokens(path)) == 10


async def test_crash_between_lease_and_hand_out_never_resurrects(
    issuer: Issuer, tmp_path: Path
) -> None:
    """A 'crash' right after a lease is persisted (before its tokens reach memory), then
    the process dies with its reserve: a new wallet on the file never returns a token
    the first one handed out, and loses at most the reserve plus that lease."""
    key = issuer.add_account("crash-sim")
    path = tmp_path / "t.json"
    w = wallet(issuer.url, key, path, batch_size=30, low_water=0, reserve=4)
    await w.refill()
    handed = [await w.take() for _ in range(5)]
    await w.settle()
    real_pop = w._store.pop
    lost_in_flight: list[str] = []

    def crashing_pop(usable: Callable[..., bool], n: int = 1) -> object:
        taken, _dropped, _left = real_pop(usable, n)  # fsynced and renamed
        lost_in_flight.extend(b64url_encode(e.token.encode()) for e in taken)
        raise RuntimeError("simulated crash before the leased tokens reach memory")

    w._store.pop = crashing_pop  # type: ignore[method-assign]
    with contextlib.suppress(RuntimeError):
        for _ in range(8):
            handed.append(await w.take())
    await w.settle()
    assert lost_in_flight
    # The process dies here: no aclose(), so the reserve is not filed back.
    held = len(w._held)
    async with wallet(issuer.url, key, path, batch_size=30, low_water=0) as w2:
        on_disk = set(stored_tokens(path))
        rest = [await w2.take() for _ in range(len(on_disk))]
    out = {b64url_encode(t.encode()) for t in handed}
    assert not out & {b64url_encode(t.encode()) for t in rest}
    assert not out & on_disk and not set(lost_in_flight) & on_disk
    assert len(handed) + len(rest) + held + len(lost_in_flight) == 30
    assert held + len(lost_in_flight) <= 4 + 1
    if w._session is not None:
        await w._session.close()


_TAKER = """
import asyncio, sys
from openpcc.client.wallet import TokenWallet
from openpcc.privacypass.auth import b64url_encode

async def main() -> None:
    url, key, path, name = sys.argv[1:5]
    w = TokenWallet(url, key, path, issuer_name=name, batch_size=10, low_water=0,
                    reserve=8, refill_jitter=0)
    while True:
        tok = await w.take()
        sys.stdout.write(b64url_encode(tok.encode()) + "\\n")
        sys.stdout.flush()

asyncio.run(main())
"""


async def test_killed_taker_never_double_spends(issuer: Issuer, tmp_path: Path) -> None:
    """SIGKILL a process taking tokens as fast as it can (leases in flight): the tokens
    left in the file never include one it handed out, and it lost at most its reserve."""
    key = issuer.add_account("crash-kill")
    path = tmp_path / "t.json"
    async with wallet(issuer.url, key, path, batch_size=100, low_water=0) as w:
        await w.refill(100)
    total = 100
    out: set[str] = set()
    for stop_after in (7, 23, 41):
        before = len(stored_tokens(path))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _TAKER, issuer.url, key, str(path), ISSUER_NAME,
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        assert proc.stdout is not None
        printed: list[str] = []
        while len(printed) < stop_after:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the taker exited early"
            printed.append(line.decode().strip())
        proc.kill()
        printed += (await proc.stdout.read()).decode().split()
        await proc.wait()
        on_disk = set(stored_tokens(path))  # still a valid store file
        assert not set(printed) & on_disk
        assert not set(printed) & out and len(set(printed)) == len(printed)
        out |= set(printed)
        # Lost: the reserve and a lease in flight (<= 8 + 1) and one taken, not printed.
        assert before - len(on_disk) - len(printed) <= 8 + 2
    async with wallet(issuer.url, key, path, batch_size=100, low_water=0) as w2:
        rest = [await w2.take() for _ in range(len(stored_tokens(path)))]
    assert not out & {b64url_encode(t.encode()) for t in rest}
    assert len(out) + len(rest) <= total


async def test_disk_full_is_a_typed_error_and_loses_nothing(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while the background lease writes: takes go on from the reserve, the error
    is kept in last_refill_error, a take on an empty reserve raises WalletStoreError,
    and the file keeps every token it had (no tmp file left behind)."""
    key = issuer.add_account("disk-full")
    path = tmp_path / "t.json"
    async with wallet(issuer.url, key, path, batch_size=30, low_water=0, reserve=8) as w:
        await w.refill()
        await _warm_reserve(w, 8)  # 8 handed out; the rest in the file and the reserve
        on_disk = stored_tokens(path)
        assert len(on_disk) + len(w._held) == 22
        tmp_fds: set[int] = set()
        real_open, real_write = os.open, os.write

        def tracking_open(p: Any, flags: int, *a: Any, **kw: Any) -> int:
            fd = real_open(p, flags, *a, **kw)
            if str(p).endswith(".tmp"):
                tmp_fds.add(fd)
            return fd

        def full_write(fd: int, data: Any) -> int:
            if fd in tmp_fds:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "open", tracking_open)
        monkeypatch.setattr(os, "write", full_write)
        got = [await w.take() for _ in range(len(w._held))]  # the reserve carries on
        await w.settle()
        assert isinstance(w.last_refill_error, WalletStoreError)
        with pytest.raises(WalletStoreError, match="No space left"):
            await w.take()
        assert stored_tokens(path) == on_disk  # nothing lost
        assert not list(tmp_path.glob(".*.tmp"))
        monkeypatch.undo()  # space again
        got += [await w.take() for _ in range(len(on_disk))]
        assert w.last_refill_error is None
    assert len({t.nonce for t in got}) == 22
    assert stored_tokens(path) == []


async def test_directory_is_refreshed_ahead_without_holding_up_takes(
    issuer: Issuer, tmp_path: Path
) -> None:
    """Past 3/4 of directory_ttl a take starts a background refresh and does not wait
    for it (here: a fetch that takes 1 s)."""
    key = issuer.add_account("refresh-ahead")
    fetches: list[float] = []

    async def slow_fetch() -> bytes:
        fetches.append(time.monotonic())
        if len(fetches) > 1:
            await asyncio.sleep(1.0)
        return issuer.directory()

    async with wallet(
        issuer.url, key, tmp_path / "t.json", batch_size=10, low_water=0,
        directory_ttl=100, directory_fetcher=slow_fetch,
    ) as w:  # fmt: skip
        await w.take()
        assert w._keys is not None
        w._keys = dataclasses.replace(w._keys, fetched_at=time.monotonic() - 80)
        t0 = time.monotonic()
        await w.take()
        assert time.monotonic() - t0 < 0.5
        await w.settle()
        assert len(fetches) == 2
        assert time.monotonic() - w._keys.fetched_at < 5


# --------------------------------------------------------------------------- errors


async def test_quota_exhaustion_raises_with_retry_after(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("quota", quota=5, per=3600)
    async with wallet(issuer.url, key, tmp_path / "t.json", batch_size=4, low_water=0) as w:
        # 4 in one batch; then the batch of 4 is refused and halved down to the 1 left.
        tokens = [await w.take() for _ in range(5)]
        with pytest.raises(QuotaExceededError) as exc_info:
            await w.take()
    assert len({t.nonce for t in tokens}) == 5
    err = exc_info.value
    assert 0 < err.retry_after <= 3600
    assert "quota" in str(err) and key not in str(err)


async def test_quota_backoff_does_not_hammer(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("quota-backoff", quota=0, per=3600)
    http = Counting()
    w = wallet(
        issuer.url, key, tmp_path / "t.json", batch_size=1, low_water=0, session=http.session
    )
    try:
        with pytest.raises(QuotaExceededError):
            await w.take()
        posts = http.posts()
        with pytest.raises(QuotaExceededError) as again:
            await w.take()  # answered locally until Retry-After has passed
        assert http.posts() == posts
        assert again.value.retry_after > 0
    finally:
        await w.aclose()
        await http.session.close()


async def test_revoked_and_wrong_keys_raise_auth_error(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("revoked")
    issuer.admin("account", "revoke", "revoked")
    for api_key in (key, "opk_not-a-real-key"):
        async with wallet(issuer.url, api_key, tmp_path / "t.json", batch_size=3) as w:
            with pytest.raises(IssuerAuthError) as exc_info:
                await w.take()
        assert api_key not in str(exc_info.value) and api_key not in repr(w)
        assert "API key" in str(exc_info.value)
    assert issubclass(IssuerAuthError, IssuerError)


async def test_unreachable_issuer_is_an_issuer_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    async with wallet(url, "secret-key-123", tmp_path / "t.json", batch_size=2) as w:
        with pytest.raises(IssuerError) as exc_info:
            await w.take()
    assert "secret-key-123" not in str(exc_info.value)


async def test_malformed_store_is_reported_not_discarded(issuer: Issuer, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text("{not json")
    async with wallet(issuer.url, "k", path, batch_size=2) as w:
        with pytest.raises(WalletStoreError):
            w.count()
    assert path.read_text() == "{not json"


def test_retry_after_forms() -> None:
    assert _retry_after("120", 0) == 120
    assert _retry_after(None, 0) == 60
    assert _retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60
    assert _retry_after("soon", 0) == 60


# --------------------------------------------------------------------------- key consistency


def fetcher_of(raw: Callable[[], bytes]) -> Callable[[], Awaitable[bytes]]:
    async def fetch() -> bytes:
        return raw()

    return fetch


async def test_directory_with_too_many_keys_is_refused(
    fresh_issuer: Issuer, tmp_path: Path
) -> None:
    key = fresh_issuer.add_account("partition")
    for _ in range(3):
        fresh_issuer.admin("keys", "rotate", "--not-before-in", "0")
    raw = fresh_issuer.directory()
    assert len(IssuerDirectory.parse(raw).token_keys) == 4
    http = Counting()
    w = wallet(fresh_issuer.url, key, tmp_path / "t.json", batch_size=2, session=http.session)
    try:
        with pytest.raises(KeyConsistencyError, match="4 token keys in force"):
            await w.take()
    finally:
        await w.aclose()
        await http.session.close()
    assert http.posts() == 0  # nothing was requested under any of them
    # The same directory passes when the caller allows four keys.
    async with wallet(fresh_issuer.url, key, tmp_path / "u.json", batch_size=2, max_keys=4) as w4:
        issuance.verify_token(directory_key(raw), await w4.take(), expected_challenge=CHALLENGE)


async def test_upcoming_keys_do_not_count_as_in_force(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("upcoming")
    real = IssuerDirectory.parse(issuer.directory())
    later = int(time.time()) + 3600
    extra = tuple(
        TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, issuance.IssuerKey.generate().token_key, later)
        for _ in range(3)
    )
    raw = IssuerDirectory(real.issuer_request_uri, extra + real.token_keys).serialize()
    async with wallet(
        issuer.url, key, tmp_path / "t.json", directory_fetcher=fetcher_of(lambda: raw)
    ) as w:
        tok = await w.take()
    issuance.verify_token(real.select_key().token_key, tok)


async def test_directory_may_not_redirect_the_api_key(issuer: Issuer, tmp_path: Path) -> None:
    real = IssuerDirectory.parse(issuer.directory())
    raw = IssuerDirectory("https://elsewhere.example/token-request", real.token_keys).serialize()
    async with wallet(
        issuer.url, "k", tmp_path / "t.json", directory_fetcher=fetcher_of(lambda: raw)
    ) as w:
        with pytest.raises(IssuerError, match="refusing to send the API key"):
            await w.take()


async def test_tokens_under_an_unpublished_key_are_discarded(
    issuer: Issuer, tmp_path: Path
) -> None:
    key = issuer.add_account("withdrawn")
    path = tmp_path / "t.json"
    real = IssuerDirectory.parse(issuer.directory())
    async with wallet(issuer.url, key, path, batch_size=5, low_water=0) as w:
        await w.refill()
    assert len(stored_tokens(path)) == 5
    # Same issuer, but its directory no longer lists the key those tokens were issued
    # under (a stand-in listing only: the key the issuer actually signs with is gone).
    other = issuance.IssuerKey.generate()
    gone = IssuerDirectory(
        real.issuer_request_uri, (TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, other.token_key, 0),)
    ).serialize()
    async with wallet(
        issuer.url, key, path, batch_size=5, low_water=0, directory_fetcher=fetcher_of(lambda: gone)
    ) as w2:
        with pytest.raises(IssuerError):  # the issuer cannot sign under the listed key
            await w2.take()
    assert stored_tokens(path) == []


async def test_expired_key_tokens_are_dropped_after_real_rotation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Key B: long-lived, in force since a minute ago. Key A: newer, so listed (and
    # chosen) first, but it expires in 8 s; after that only B is published.
    for args in (["--not-before-in=-60"], ["--not-before-in", "0", "--lifetime", "8"]):
        out = cli("issuer", "keys", "rotate", *args, "--state", str(state))
        assert out.returncode == 0, out.stdout + out.stderr
    listed = cli("issuer", "keys", "list", "--state", str(state)).stdout.splitlines()
    a_expires = min(json.loads(line)["expires_at"] for line in listed)
    iss = start_issuer(state)
    try:
        key = iss.add_account("rotation")
        key_a = directory_key(iss.directory())
        path = tmp_path / "t.json"
        async with wallet(iss.url, key, path, batch_size=4, low_water=0, directory_ttl=0) as w:
            tok = await w.take()
            issuance.verify_token(key_a, tok, expected_challenge=CHALLENGE)
            assert w.count() == 3
            await asyncio.sleep(max(0.0, a_expires - time.time()) + 1.0)
            # A is gone from the directory: its 3 tokens are dropped, B issues new ones.
            tok_b = await w.take()
            assert tok_b.token_key_id != tok.token_key_id
            key_b = directory_key(iss.directory())
            assert key_b != key_a
            issuance.verify_token(key_b, tok_b, expected_challenge=CHALLENGE)
            assert w.count() == 3
            assert all(
                Token.decode(base64.urlsafe_b64decode(t)).token_key_id == tok_b.token_key_id
                for t in stored_tokens(path)
            )
    finally:
        stop(iss.proc)


@pytest.fixture
async def personal_key_issuer() -> Iterator[str]:
    """An issuer that lists one key but signs with another (a 'personal' key)."""
    listed = issuance.IssuerKey.generate()
    secret = issuance.IssuerKey.generate()
    directory = IssuerDirectory(
        "/token-request", (TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, listed.token_key, 0),)
    ).serialize()

    async def get_dir(_r: web.Request) -> web.Response:
        return web.Response(
            body=directory, content_type="application/private-token-issuer-directory"
        )

    async def post(r: web.Request) -> web.Response:
        reqs = batched.decode_batch_request(await r.read())
        n = secret.public_key.n  # blinded under the listed key: reduce into this one's range
        sigs = [
            blindrsa.blind_sign(
                secret.private_key, (int.from_bytes(q.blinded_msg, "big") % n).to_bytes(256, "big")
            )
            for q in reqs
            if isinstance(q, issuance.TokenRequest)
        ]
        body = batched.encode_batch_response(
            [(TOKEN_TYPE_BLIND_RSA, issuance.TokenResponse(s)) for s in sigs]
        )
        return web.Response(body=body, content_type=batched.RESPONSE_MEDIA_TYPE)

    app = web.Application()
    app.router.add_get("/.well-known/private-token-issuer-directory", get_dir)
    app.router.add_post("/token-request", post)
    async with serve_app(app) as url:
        yield url


async def test_signature_under_another_key_is_refused(
    personal_key_issuer: str, tmp_path: Path
) -> None:
    path = tmp_path / "t.json"
    async with wallet(personal_key_issuer, "k", path, batch_size=3) as w:
        with pytest.raises(KeyConsistencyError, match="do not verify"):
            await w.take()
        assert w.count() == 0
    assert not path.exists() or stored_tokens(path) == []


def test_store_file_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    from openpcc.client.wallet import _TokenStore

    old = os.umask(0)
    try:
        store = _TokenStore(tmp_path / "d" / "t.json")
        store.extend([])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "t.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


def test_store_count_reads_the_file_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`openpcc chat` counts every turn on its loop: one stat while the file is as last
    counted; any write (this store's or another process's) is seen at once."""
    from openpcc.client.wallet import _TokenStore

    path = tmp_path / "t.json"
    store, other = _TokenStore(path), _TokenStore(path)
    assert store.count() == 0  # no file yet
    items = [{"key_id": "ab" * 32, "token": f"t{i:04d}"} for i in range(6)]
    store._write(items)
    assert store.count() == 6
    reads = 0
    real = store._read

    def counting() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        return real()

    monkeypatch.setattr(store, "_read", counting)
    assert [store.count() for _ in range(5)] == [6] * 5 and reads == 0
    other._write(items[:4])  # another process takes two (same file, a new inode)
    assert store.count() == 4 and reads == 1
    store._write(items[:4] + items[:1])
    assert store.count() == 5 and reads == 2
    path.unlink()
    assert store.count() == 0


async def test_aclose_does_not_wait_out_the_refill_jitter(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("jitter")
    w = wallet(issuer.url, key, tmp_path / "t.json", batch_size=4, low_water=3, refill_jitter=30)
    await w.take()
    await w.take()  # 2 left: a background refill is scheduled, sleeping its jitter
    assert w._bg is not None and not w._bg.done()
    t0 = time.monotonic()
    await w.aclose()
    assert time.monotonic() - t0 < 2
    assert w.count() == 2


async def test_responses_arriving_in_pieces_are_read_whole(issuer: Issuer, tmp_path: Path) -> None:
    """A trickling front (1 KiB pieces) before the real issuer: the directory and a
    100-token batch response each take many socket reads, and the wallet must still
    read them whole (a single ``read(n)`` returns only what has arrived)."""

    async def forward(request: web.Request) -> web.StreamResponse:
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                issuer.url + request.path,
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as r,
        ):
            body = await r.read()
            resp = web.StreamResponse(
                status=r.status, headers={"Content-Type": r.headers["Content-Type"]}
            )
            resp.content_length = len(body)
            await resp.prepare(request)
            for i in range(0, len(body), 1024):
                await resp.write(body[i : i + 1024])
                await asyncio.sleep(0.001)
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with serve_app(app) as front:
        key = issuer.add_account("trickle")
        async with wallet(front, key, tmp_path / "t.json", batch_size=100, low_water=0) as w:
            assert await w.refill(100) == 100
            assert w.count() == 100
