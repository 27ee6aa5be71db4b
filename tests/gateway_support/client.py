"""Test-side client: tokens from the real issuer, OHTTP (plain and chunked), sealed layer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp

from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import (
    TOKEN_TYPE_BLIND_RSA,
    Token,
    TokenChallenge,
    format_authorization,
)
from openpcc.privacypass.directory import IssuerDirectory
from openpcc.wire import bhttp, hpke, sealed
from openpcc.wire.bhttp_stream import ResponseStreamDecoder, StreamEnd, StreamHead
from openpcc.wire.chunked import ChunkedRequestSender
from openpcc.wire.ohttp import KeyConfig, encapsulate_request, parse_key_configs

CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "127.0.0.1", b"", ())


async def issuer_directory(s: aiohttp.ClientSession, issuer_url: str) -> IssuerDirectory:
    async with s.get(issuer_url + "/.well-known/private-token-issuer-directory") as r:
        assert r.status == 200
        return IssuerDirectory.parse(await r.read())


async def mint(
    s: aiohttp.ClientSession,
    issuer_url: str,
    api_key: str,
    n: int,
    challenge: TokenChallenge = CHALLENGE,
) -> list[Token]:
    """Tokens from the real issuer over HTTP (generic batch issuance)."""
    tk = (await issuer_directory(s, issuer_url)).select_key().token_key
    pairs = [issuance.begin_token_request(tk, challenge) for _ in range(n)]
    async with s.post(
        issuer_url + "/token-request",
        data=batched.encode_batch_request([r for r, _ in pairs]),
        headers={
            "Content-Type": batched.REQUEST_MEDIA_TYPE,
            "Authorization": f"Bearer {api_key}",
        },
    ) as r:
        assert r.status == 200, await r.text()
        responses = batched.decode_batch_response(await r.read())
    return [issuance.finalize_token(st, rsp) for (_, st), rsp in zip(pairs, responses, strict=True)]


async def key_configs(s: aiohttp.ClientSession, gw_url: str) -> list[KeyConfig]:
    async with s.get(gw_url + "/.well-known/ohttp-gateway") as r:
        assert r.status == 200
        assert r.content_type == "application/ohttp-keys"
        return parse_key_configs(await r.read())


async def key_config(
    s: aiohttp.ClientSession, gw_url: str, kem_id: int = hpke.KEM_DHKEM_X25519_HKDF_SHA256
) -> KeyConfig:
    """The gateway's newest config of one KEM: X25519 unless told (tests that cut or
    flip bytes at fixed offsets count on its 32-byte enc; test_gateway's key test and
    test_ohttp_xwing cover X-Wing)."""
    return next(c for c in await key_configs(s, gw_url) if c.kem_id == kem_id)


def inner_request(
    method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    return bhttp.encode_request(
        bhttp.Request(
            method.encode(),
            b"https",
            b"gateway",
            path.encode(),
            [(k.encode(), v.encode()) for k, v in headers],
            body,
        )
    )


def infer_request(token: Token | bytes | None, envelope: bytes) -> bytes:
    headers = [("content-type", sealed.REQUEST_MEDIA_TYPE)]
    if token is not None:
        headers.append(("authorization", format_authorization(token)))
    return inner_request("POST", "/v1/infer", headers, envelope)


def seal_chat(candidates: Sequence[sealed.NodeKey], model: str = "tiny") -> sealed.SealedRequest:
    req = bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"node",
            b"/v1/chat/completions",
            [(b"content-type", b"application/json")],
            b'{"model":"tiny","stream":true}',
        )
    )
    return sealed.seal_request(candidates, model, req)


async def plain(
    s: aiohttp.ClientSession, gw_url: str, kc: KeyConfig, inner: bytes
) -> tuple[int, bhttp.Response | bytes]:
    """Plain OHTTP: (outer status, decoded inner response, or the outer body if not 200)."""
    body, ctx = encapsulate_request(kc, inner)
    async with s.post(
        gw_url + "/gateway", data=body, headers={"Content-Type": "message/ohttp-req"}
    ) as r:
        raw = await r.read()
        if r.status != 200:
            return r.status, raw
        assert r.content_type == "message/ohttp-res"
        return 200, bhttp.decode_response(ctx.decapsulate_response(raw))


@dataclass
class ChunkedCall:
    """A chunked OHTTP exchange whose inner response events arrive as they are sealed."""

    response: aiohttp.ClientResponse
    sender: ChunkedRequestSender

    @property
    def status(self) -> int:
        return self.response.status

    async def events(self) -> AsyncIterator[StreamHead | bytes | StreamEnd]:
        receiver = self.sender.response_receiver()
        decoder = ResponseStreamDecoder()
        async for chunk in self.response.content.iter_any():
            for pt in receiver.receive_data(chunk):
                for ev in decoder.receive_data(pt):
                    yield ev
        for pt in receiver.end_of_input():  # the final chunk may carry content too
            for ev in decoder.receive_data(pt):
                yield ev
        for ev in decoder.end_of_input():
            yield ev

    async def collect(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = 0, {}, bytearray()
        async for ev in self.events():
            if isinstance(ev, StreamHead):
                status = ev.status
                headers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, bytes):
                body += ev
        return status, headers, bytes(body)


async def chunked(
    s: aiohttp.ClientSession, gw_url: str, kc: KeyConfig, inner: bytes, pieces: int = 3
) -> ChunkedCall:
    sender = ChunkedRequestSender(kc)
    step = max(1, -(-len(inner) // pieces))
    parts = [inner[i : i + step] for i in range(0, len(inner), step)]
    wire = b"".join(sender.seal_chunk(p) for p in parts[:-1]) + sender.seal_chunk(
        parts[-1], final=True
    )
    resp = await s.post(
        gw_url + "/gateway",
        data=wire,
        headers={"Content-Type": "message/ohttp-chunked-req", "Incremental": "?1"},
    )
    return ChunkedCall(resp, sender)


async def sealed_events(
    call: ChunkedCall, opener: sealed.ResponseOpener
) -> AsyncIterator[sealed.ResponseHead | bytes | StreamHead]:
    """Outer head first, then the node's opened events; raises TruncatedError if cut."""
    async for ev in call.events():
        if isinstance(ev, StreamHead):
            yield ev
        elif isinstance(ev, bytes):
            for item in opener.receive_data(ev):
                yield item
    opener.end_of_input()


def problem_of(body: bytes) -> dict:
    doc = json.loads(body)
    assert doc["status"] and doc["title"]
    return doc
