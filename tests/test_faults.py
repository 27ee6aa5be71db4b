"""Faults and forgeries the rest of the suite does not already prove (issue 9).

Separate processes and real sockets: a real issuer mints tokens, real gateways redeem
them against SQLite or a private ``redis-server`` that the tests kill and restart.
The gateways here have no nodes, so a token the gateway *accepts* is answered
``503 no usable candidate``; one it refuses is ``401``; a store it cannot reach is
``503 token store unavailable``. The problem ``detail`` tells the three apart.

See docs/THREATS.md for the claims these back and the tests that cover the rest.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, Token, TokenChallenge
from openpcc.wire import bhttp, sealed
from openpcc.wire.chunked import ChunkedRequestSender
from openpcc.wire.ohttp import KeyConfig, encapsulate_request, parse_key_configs
from tests.conftest import free_port
from tests.gateway_support.client import (
    chunked,
    infer_request,
    inner_request,
    key_config,
    mint,
    plain,
    problem_of,
    seal_chat,
)
from tests.gateway_support.procs import Proc, cli, start_gateway, start_issuer

ENVELOPE = seal_chat([sealed.NodeKey(b"\x01" * 16, b"\x02" * 32)]).envelope
ACCEPTED = "no usable candidate"  # token accepted (spent), then no node to route to
STORE_DOWN = "token store unavailable"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def issuer(workdir: Path) -> Iterator[Proc]:
    proc = start_issuer(workdir)
    yield proc
    proc.stop()


async def redeem(gw_url: str, token: Token) -> tuple[int, str]:
    """(inner status, problem detail) of one redemption over chunked OHTTP."""
    async with aiohttp.ClientSession() as s:
        kc = await key_config(s, gw_url)
        call = await chunked(s, gw_url, kc, infer_request(token, ENVELOPE))
        status, _, body = await call.collect()
        return status, problem_of(body).get("detail", "")


async def tokens(issuer: Proc, n: int, challenge: TokenChallenge | None = None) -> list[Token]:
    async with aiohttp.ClientSession() as s:
        if challenge is None:
            return await mint(s, issuer.url, issuer.extra["api_key"], n)
        return await mint(s, issuer.url, issuer.extra["api_key"], n, challenge)


class Redis:
    """A private redis-server with an fsync-always AOF, restartable on the same port.

    Persistence matters: a Redis that forgets its spent-token keys on restart would
    accept every token spent before it (docs/THREATS.md says operators must enable it).
    """

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed; scripts/dev test installs it")
        self.exe = exe
        self.dir = workdir / f"redis-{free_port()}"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "no redis"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis(workdir: Path) -> Iterator[Redis]:
    r = Redis(workdir)
    r.start()
    yield r
    r.stop()


# -- restarts lose no spent-token record ------------------------------------------------------


async def test_gateway_restart_keeps_spent_tokens_sqlite(workdir: Path, issuer: Proc) -> None:
    gw = start_gateway(workdir, issuer.url, name="restart-sqlite")
    spent, fresh = await tokens(issuer, 2)
    try:
        status, detail = await redeem(gw.url, spent)
        assert status == 503 and ACCEPTED in detail
    finally:
        gw.stop()
    again = start_gateway(workdir, issuer.url, name="restart-sqlite", state=gw.extra["state"])
    try:
        assert (await redeem(again.url, spent))[0] == 401  # the record survived
        status, detail = await redeem(again.url, fresh)
        assert status == 503 and ACCEPTED in detail  # and redemption still works
    finally:
        again.stop()


async def test_gateway_and_redis_restarts_keep_spent_tokens(
    workdir: Path, issuer: Proc, redis: Redis
) -> None:
    extra = ["--redis", redis.url]
    gw = start_gateway(workdir, issuer.url, name="restart-redis", extra=extra)
    spent, fresh = await tokens(issuer, 2)
    try:
        assert ACCEPTED in (await redeem(gw.url, spent))[1]
    finally:
        gw.stop()
    redis.stop()  # the shared store restarts too, from its AOF
    redis.start()
    again = start_gateway(workdir, issuer.url, name="restart-redis2", extra=extra)
    try:
        assert (await redeem(again.url, spent))[0] == 401
        assert ACCEPTED in (await redeem(again.url, fresh))[1]
    finally:
        again.stop()


# -- Redis unreachable: fail closed, then recover ---------------------------------------------


async def test_redis_down_fails_closed_and_recovers(
    workdir: Path, issuer: Proc, redis: Redis
) -> None:
    gw = start_gateway(workdir, issuer.url, name="redis-down", extra=["--redis", redis.url])
    spent, during, after = await tokens(issuer, 3)
    try:
        assert ACCEPTED in (await redeem(gw.url, spent))[1]
        redis.stop()
        for token in (spent, during):  # neither a replay nor a fresh token gets through
            t0 = time.monotonic()
            status, detail = await redeem(gw.url, token)
            assert (status, STORE_DOWN in detail) == (503, True), (status, detail)
            assert time.monotonic() - t0 < 15, "the refusal must not hang"
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
            assert r.status == 200  # the process itself stays up
        redis.start()  # same port, same AOF
        deadline = time.monotonic() + 20
        while True:  # the client reconnects on its own (maybe after one stale connection)
            status, detail = await redeem(gw.url, during)
            if STORE_DOWN not in detail:
                break
            assert time.monotonic() < deadline, "the gateway did not reconnect to Redis"
            await asyncio.sleep(0.3)
        # The refused attempt did not spend `during`: it is accepted now, exactly once.
        assert (status, ACCEPTED in detail) == (503, True), (status, detail)
        assert (await redeem(gw.url, during))[0] == 401
        assert (await redeem(gw.url, spent))[0] == 401  # spent before the outage: still spent
        assert ACCEPTED in (await redeem(gw.url, after))[1]
    finally:
        gw.stop()
    assert "Traceback" not in gw.output(), gw.output()[-3000:]


# -- forgeries --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(workdir: Path, issuer: Proc) -> Iterator[Proc]:
    proc = start_gateway(workdir, issuer.url, name="forgeries")
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    "challenge",
    [
        TokenChallenge(TOKEN_TYPE_BLIND_RSA, "127.0.0.1", b"", ("other.example",)),
        TokenChallenge(TOKEN_TYPE_BLIND_RSA, "127.0.0.1", b"\x07" * 32, ()),
    ],
    ids=["another-origin", "a-redemption-context"],
)
async def test_tokens_for_another_challenge_are_refused(
    gw: Proc, issuer: Proc, challenge: TokenChallenge
) -> None:
    """Validly signed by our issuer, but for another origin/context: not redeemable here."""
    (token,) = await tokens(issuer, 1, challenge)
    status, detail = await redeem(gw.url, token)
    assert status == 401, detail


async def test_ohttp_key_id_confusion_is_refused(gw: Proc) -> None:
    """Ciphertext for key B labelled with key id A (and vice versa) never opens."""
    out = cli("gateway", "keys", "rotate", "--state", str(gw.extra["state"]))
    assert out.returncode == 0, out.stderr
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/.well-known/ohttp-gateway") as r:
            configs = parse_key_configs(await r.read())
        assert len(configs) >= 2
        a, b = configs[0], configs[1]
        inner = inner_request("GET", "/v1/nodes")
        for label, key in ((a, b), (b, a)):
            forged = KeyConfig(label.key_id, key.kem_id, key.public_key, key.symmetric_suites)
            body, _ = encapsulate_request(forged, inner)
            sender = ChunkedRequestSender(forged)
            chunked_body = sender.seal_chunk(inner, final=True)
            for ctype, data in (
                ("message/ohttp-req", body),
                ("message/ohttp-chunked-req", chunked_body),
            ):
                async with s.post(
                    gw.url + "/gateway", data=data, headers={"Content-Type": ctype}
                ) as r:
                    assert r.status == 400, (ctype, r.status)
                    assert r.content_type == "application/problem+json"
        # The genuine configurations still work, so the refusals above were the forgery.
        for cfg in (a, b):
            status, resp = await plain(s, gw.url, cfg, inner)
            assert status == 200 and isinstance(resp, bhttp.Response) and resp.status == 200


# -- node reports unhealthy while its engine restarts -------------------------------------------


async def test_engine_crash_makes_the_node_unhealthy_until_restarted(tmp_path: Path) -> None:
    """vLLM dies: ``ready`` drops at once (the node's /readyz is 503) until it is back.

    tests/test_engine.py proves the supervisor restarts vLLM (fake and real); this adds
    that the gap is visible, through the very method that answers ``/readyz``.
    """
    import os

    from node.app import NodeService
    from node.engine import VLLMEngine
    from tests.test_engine import FAKE_SERVER

    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    eng = VLLMEngine(tmp_path, python=str(exe), startup_timeout=30, backoff_initial=1.0)
    node = types.SimpleNamespace(
        engine_ready=lambda: eng.ready.is_set(),
        engine=eng,
        registrars=[],
        config=types.SimpleNamespace(node_id=b"\x01" * 16),
        _inflight=0,
        _engine_load={"waiting": 0, "kv_cache_usage": 0.0},
        _engine_state=lambda: "ready" if eng.ready.is_set() else "not ready",
    )

    async def healthz() -> int:  # readiness: what a gateway's health check asks
        return (await NodeService.readyz(node, None)).status  # type: ignore[arg-type]

    async with eng:
        assert await healthz() == 200
        assert eng.pgid is not None
        os.killpg(eng.pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while eng.ready.is_set():
            assert time.monotonic() < deadline, "ready never dropped"
            await asyncio.sleep(0.01)
        assert await healthz() == 503
        await eng.wait_ready(30)
        assert eng.restarts == 1 and await healthz() == 200
