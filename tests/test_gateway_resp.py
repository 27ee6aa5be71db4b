"""gateway/resp.py: the spent-token store's lean Redis client.

Against real redis-servers: SET NX answers, AUTH (password, user and password) and
SELECT, a restart in the middle (the commands out fail, the next ones reconnect), a peer
that never answers (a timeout, not a hang), and the URLs it leaves to redis-py. Then the
reply parser on arbitrary bytes cut anywhere: replies resolve their callers in order, or
every caller gets a RespError, never another exception.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.resp import Resp, RespError, _Connection
from gateway.spent import RedisSpentStore
from tests.fuzz_profiles import PARSER
from tests.harness import HOST, Proc, free_port, spawn


def _redis(workdir: Path, *extra: str, port: int | None = None) -> Proc:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = port or free_port()
    cmd = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
           "--dir", str(workdir), *extra]  # fmt: skip
    p = spawn(f"redis-{port}-{os.urandom(2).hex()}", cmd, workdir, report=False,
              ports={"public": port})  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return p
        except OSError:
            if p.proc.poll() is not None or time.monotonic() > deadline:
                p.stop()
                raise AssertionError(f"redis-server did not start:\n{p.output()}") from None
            time.sleep(0.05)


@pytest.fixture
def redis_pw(tmp_path: Path) -> Iterator[Proc]:
    p = _redis(tmp_path, "--requirepass", "s3cret", "--user", "gw", "on", ">gwpass", "~*", "+@all")
    yield p
    p.stop()


def test_urls_it_takes_and_those_it_leaves_to_redis_py() -> None:
    r = Resp.for_url("rediss://gw:p%40ss@10.0.0.5:6380/3")
    assert r is not None and (r.host, r.port, r.db, r.tls) == ("10.0.0.5", 6380, 3, True)
    r = Resp.for_url("redis://:pw@127.0.0.1")
    assert r is not None and (r.port, r.db, r.tls) == (6379, 0, False)
    for url in ("unix:///run/redis.sock", "redis://h/0?ssl_cert_reqs=none", "redis://h/x",
                "redis://", "redis://h:99999/0"):  # fmt: skip
        assert Resp.for_url(url) is None, url


async def test_set_nx_auth_select_and_pipelining(redis_pw: Proc) -> None:
    port = redis_pw.port
    for url in (f"redis://:s3cret@{HOST}:{port}/5", f"redis://gw:gwpass@{HOST}:{port}/6"):
        r = Resp.for_url(url)
        assert r is not None
        names = [os.urandom(8).hex().encode() for _ in range(50)]
        first = await asyncio.gather(*(r.set_nx(n, 60) for n in names + names[:10]))
        assert first == [True] * 50 + [False] * 10  # one write, replies in order
        assert not await r.set_nx(names[0], 60)
        await r.close()
    wrong = Resp.for_url(f"redis://:nope@{HOST}:{port}/0")
    assert wrong is not None
    with pytest.raises(RespError):
        await wrong.set_nx(b"k", 60)
    # The store uses it for such URLs (SELECT 7 here) and keeps its contract.
    store = RedisSpentStore(f"redis://:s3cret@{HOST}:{port}/7", prefix="t:")
    assert store._lean is not None
    assert sum(await asyncio.gather(*(store.mark_spent(b"k" * 32, b"n" * 32, 60)
                                      for _ in range(20)))) == 1  # fmt: skip
    await store.close()


async def test_a_redis_restart_fails_what_was_out_then_reconnects(tmp_path: Path) -> None:
    server = _redis(tmp_path)
    r = Resp.for_url(f"redis://{HOST}:{server.port}/0")
    assert r is not None
    try:
        assert await r.set_nx(b"a", 60)
        server.stop()
        with pytest.raises(RespError):
            await r.set_nx(b"b", 60)  # the connection is gone: unknown, so refused
        with pytest.raises(RespError):
            await r.set_nx(b"c", 60)  # and nobody listens
        server = _redis(tmp_path, port=server.port)
        assert await r.set_nx(b"a", 60)  # a new connection (an empty Redis)
    finally:
        await r.close()
        server.stop()


async def test_a_silent_peer_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    r = Resp(HOST, port, timeout=0.3)
    try:
        t = time.monotonic()
        with pytest.raises(RespError, match="in time"):
            await r.set_nx(b"k", 60)
        assert time.monotonic() - t < 3
    finally:
        await r.close()
        server.close()


# -- the reply parser on arbitrary bytes -------------------------------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


_REPLY = st.one_of(
    st.just(b"+OK\r\n"),
    st.just(b"$-1\r\n"),
    st.binary(max_size=20).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.integers(-5, 10**6).map(lambda i: b":%d\r\n" % i),
    st.just(b"-ERR wrong\r\n"),
)


_SPLICED = st.tuples(
    st.lists(_REPLY, min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=6),
    st.integers(0, 200),
).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :])  # valid replies with junk inside


@pytest.mark.fuzz
@PARSER
@given(
    st.one_of(st.lists(_REPLY, max_size=8).map(b"".join), st.binary(max_size=80), _SPLICED),
    st.lists(st.integers(1, 16), max_size=6),
    st.integers(0, 8),
)
def test_fuzz_replies_resolve_in_order_or_fail_everyone(
    data: bytes, cuts: list[int], waiting: int
) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, 5.0)
        conn.connection_made(_Transport())
        futures = [loop.create_future() for _ in range(waiting)]
        conn.send(b"commands", futures)
        at = 0
        for n in [*cuts, len(data)]:
            if conn.closed:
                break
            conn.data_received(data[at : at + n])
            at += n
        conn.connection_lost(None)
        for fut in futures:
            assert fut.done()
            exc = fut.exception()
            assert exc is None or isinstance(exc, RespError), exc
            if exc is None:
                assert fut.result() is None or isinstance(fut.result(), bytes)

    asyncio.run(run())
