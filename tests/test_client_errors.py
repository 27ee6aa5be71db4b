"""Every failure a caller of the client sees is an openpcc.client.errors type.

A scripted relay on loopback answers with real key configs and then tampered, garbled or
unpinned bytes; the client must raise ClientError subclasses that keep the core meaning
(a tampered answer is a TamperedResponseError *and* a DecryptError), cause chained.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from openpcc.client.client import Client
from openpcc.client.errors import (
    ClientError,
    MalformedResponseError,
    TamperedResponseError,
    UntrustedError,
)
from openpcc.errors import DecodeError, DecryptError, VerificationError
from openpcc.wire import bhttp, hpke, ohttp
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

KP = hpke.generate_key_pair()
CONFIG = KeyConfig(1, 0x20, KP.public_key, (SymmetricSuite(1, 1),))


class _NoTokens:
    async def take(self) -> Any:
        raise AssertionError("discovery spends no token")


class _Pins:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def accepts_ohttp_key(self, config: bytes) -> bool:
        return self.ok

    def accepts_token_key(self, key_id: bytes) -> bool:
        return True

    post_quantum_required = False

    def pins_post_quantum_key(self) -> bool | None:
        return False


def _answer_ok(body: bytes) -> bytes:
    """A real OHTTP answer to the client's request: a directory with no nodes."""
    _inner, ctx = ohttp.decapsulate_request({1: KP.private_key}, body)
    resp = bhttp.Response(200, [(b"content-type", b"application/json")], b'{"nodes": []}')
    return ctx.encapsulate_response(bhttp.encode_response(resp))


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    """start(keys=bytes, answer=fn(body)->bytes) -> relay URL; all stopped at the end."""
    runners: list[web.AppRunner] = []

    async def start(keys: bytes, answer: Callable[[bytes], bytes]) -> str:
        async def well_known(_r: web.Request) -> web.Response:
            return web.Response(body=keys, content_type=ohttp.MEDIA_TYPE_KEYS)

        async def post(r: web.Request) -> web.Response:
            return web.Response(body=answer(await r.read()), content_type=ohttp.MEDIA_TYPE_RESPONSE)

        app = web.Application()
        app.router.add_get("/.well-known/ohttp-gateway", well_known)
        app.router.add_post("/", post)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


def _client(url: str, pins: bool | None = None) -> Client:
    return Client(
        url,
        tokens=_NoTokens(),  # type: ignore[arg-type]
        verifier=lambda entry, now: pytest.fail("no node to verify"),  # type: ignore[arg-type]
        trust=None if pins is None else _Pins(pins),  # type: ignore[arg-type]
    )


async def test_the_scripted_relay_answers_correctly(scripted: Any) -> None:
    url = await scripted(ohttp.encode_key_configs([CONFIG]), _answer_ok)
    async with _client(url) as c:
        assert await c.verified_nodes() == []


async def test_a_tampered_answer_is_a_client_error_and_a_decrypt_error(scripted: Any) -> None:
    def tampered(body: bytes) -> bytes:
        out = bytearray(_answer_ok(body))
        out[-1] ^= 1
        return bytes(out)

    url = await scripted(ohttp.encode_key_configs([CONFIG]), tampered)
    async with _client(url) as c:
        with pytest.raises(TamperedResponseError) as exc:
            await c.verified_nodes()
    assert isinstance(exc.value, ClientError) and isinstance(exc.value, DecryptError)
    assert isinstance(exc.value.__cause__, DecryptError)


async def test_a_garbled_key_config_is_a_malformed_response(scripted: Any) -> None:
    url = await scripted(b"\x00\x05garba", _answer_ok)
    async with _client(url) as c:
        with pytest.raises(MalformedResponseError) as exc:
            await c.key_config()
    assert isinstance(exc.value, DecodeError)
    assert exc.value.__cause__ is not None


async def test_an_unpinned_gateway_key_is_untrusted(scripted: Any) -> None:
    url = await scripted(ohttp.encode_key_configs([CONFIG]), _answer_ok)
    async with _client(url, pins=False) as c:
        with pytest.raises(UntrustedError) as exc:
            await c.verified_nodes()
    assert isinstance(exc.value, VerificationError)
