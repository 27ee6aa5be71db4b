"""relay/upstream.py, the relay's own HTTP/1.1 client for its gateways, against raw TCP.

Every case runs a scripted ``asyncio`` server on 127.0.0.1 that reads the client's
request and answers with exact bytes, so framing, keep-alive reuse, timeouts and
back-pressure are checked on the wire rather than through another HTTP library. The
cases run on the default event loop and, where uvloop is installed, on uvloop too (the
relay's ``--uvloop``); uvloop is an optional extra (``openpcc[uvloop]``, part of ``dev``, so
CI runs both halves); without it its half is skipped, even under ``OPENPCC_REQUIRE_ALL``.

The fuzz case at the end answers with random and mutated responses and holds the client
to its module docstring: a result that an independent reading of RFC 9112 framing (strict
about line ends) agrees with, or ``UpstreamError``; no other exception, no hang, and no
reuse of a connection after anything but a cleanly framed keep-alive response. Examples:
tests/fuzz_profiles.py (``HTTP``: 300 per loop by default, 10 000 in CI, 100 000 with ``long``),
each drawn from one 64-bit seed as in tests/test_fuzz_parsers.py (``hostile``).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from openpcc.service.http1 import MAX_HEAD
from relay import upstream
from relay.upstream import (
    Client,
    Endpoint,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.fuzz_profiles import HTTP

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            not HAVE_UVLOOP, reason="uvloop not installed (optional, for relay --uvloop)"
        ),
    ),
]
KEEP = {b"content-type": "Content-Type", b"x-kept": "X-Kept"}
REQUEST_LINES = b"Content-Type: message/ohttp-req\r\n"


@pytest.fixture(params=LOOPS)
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    """One event loop per test, of each kind; anything that reaches the loop's exception
    handler (an error in a protocol callback, a task's lost exception) fails the test."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    errors: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=factory) as r:
        r.get_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        yield r
    # (Python 3.11's start_server reports its handler tasks cancelled at shutdown.)
    assert [e for e in errors if not isinstance(e.get("exception"), asyncio.CancelledError)] == []


# Timeouts that a test does not exercise: long enough that a loaded machine never hits
# them (issue 21: a 1 s connect timeout fired under load), short enough that a client
# waiting for bytes that never come still fails the test rather than hanging it.
PATIENT = (10.0, 5.0)  # (connect, read) seconds


# -- a scripted gateway ----------------------------------------------------------------------


@dataclass
class Request:
    line: bytes
    headers: list[bytes]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request as the client framed it (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *headers = head[:-4].split(b"\r\n")
    fields = {}
    for h in headers:
        name, _, value = h.partition(b":")
        fields[name.strip().lower()] = value.strip()
    body = b""
    if b"content-length" in fields:
        body = await reader.readexactly(int(fields[b"content-length"]))
    elif fields.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    return Request(line, headers, body)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Request], Awaitable[bool]]


class Server:
    """Runs ``script`` for each request; the connection stays open while it returns True."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.conns = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    def endpoint(self, path: str = "/") -> Endpoint:
        return Endpoint(f"http://127.0.0.1:{self.port}{path}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            while True:
                req = await read_request(reader)
                self.requests.append(req)
                if not await self.script(reader, writer, req):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(raw: bytes, again: bool = True, delay: float = 0) -> Script:
    """A script that sends ``raw`` (after ``delay``) and keeps the connection if ``again``."""

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: Request) -> bool:
        if delay:
            await asyncio.sleep(delay)
        w.write(raw)
        await w.drain()
        return again

    return script


def ok(body: bytes = b"hello") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: message/ohttp-res\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    length: int | None


async def fetch(
    client: Client,
    ep: Endpoint,
    body: bytes | AsyncIterator[bytes] | None = b"abc",
    length: int | None = None,
) -> Result:
    async with client.request(ep, b"POST", REQUEST_LINES, body, length, KEEP) as conn:
        out = b""
        while chunk := await conn.read():
            out += chunk
        return Result(conn.status, conn.headers, out, conn.length)


# -- request head, privacy, keep-alive -------------------------------------------------------


def test_request_head_is_host_callers_lines_and_framing_then_reuse(runner: asyncio.Runner) -> None:
    """The gateway sees Host, the caller's lines and Content-Length, nothing of the client's
    own (no User-Agent, Accept, Connection); clean keep-alive answers reuse one connection."""

    async def main() -> None:
        async with Server(answer(ok())) as s:
            c = Client(*PATIENT)
            for _ in range(4):
                r = await fetch(c, s.endpoint("/gw?q=1"))
                assert (r.status, r.headers, r.body, r.length) == (
                    200,
                    {"Content-Type": "message/ohttp-res"},
                    b"hello",
                    5,
                )
            assert s.conns == 1
            assert s.requests[0].line == b"POST /gw?q=1 HTTP/1.1"
            assert s.requests[0].headers == [
                b"Host: 127.0.0.1:%d" % s.port,
                b"Content-Type: message/ohttp-req",
                b"Content-Length: 3",
            ]
            await c.close()

    runner.run(main())


def test_get_without_body_sends_no_framing_header(runner: asyncio.Runner) -> None:
    """A GET carries Host alone; no allow-listed response header means empty ``headers``;
    a short fixed-length answer is ``complete`` at the head (the relay's fast path)."""

    async def main() -> None:
        async with Server(answer(ok(b"keys"))) as s:
            c = Client(*PATIENT)
            async with c.request(s.endpoint("/.well-known/ohttp-gateway"), b"GET", b"") as conn:
                assert conn.headers == {}
                assert conn.complete
                assert conn.read_nowait() == b"keys"
            assert s.requests[0].line == b"GET /.well-known/ohttp-gateway HTTP/1.1"
            assert s.requests[0].headers == [b"Host: 127.0.0.1:%d" % s.port]
            await c.close()

    runner.run(main())


def test_endpoint_parsing() -> None:
    """Host, port, target and Host line are fixed once per URL: host lower-cased, default
    port left out of Host, IPv6 bracketed, path and query percent-encoded."""
    e = Endpoint("https://GW.Example:443/a%20b?x=1")
    assert (e.host, e.port, e.tls, e.target, e.host_line) == (
        "gw.example",
        443,
        True,
        b"/a%20b?x=1",
        b"Host: gw.example\r\n",
    )
    e = Endpoint("http://[::1]:8080/")
    assert (e.host, e.port, e.host_line, e.numeric) == (
        "::1",
        8080,
        b"Host: [::1]:8080\r\n",
        socket.AF_INET6,
    )
    e = Endpoint("http://gw/p q")
    assert (e.target, e.port, e.numeric) == (b"/p%20q", 80, None)


def test_chunked_byte_by_byte_with_interim_and_trailers(runner: asyncio.Runner) -> None:
    """A 100 Continue is skipped, chunk extensions and trailers are dropped, the first
    value of a repeated kept header wins, and a response fed one byte at a time parses
    the same and leaves the connection reusable."""
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: ?1\r\n"
        b"content-type: a/b\r\nContent-Type: c/d\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: Request) -> bool:
        for i in range(len(raw)):
            w.write(raw[i : i + 1])
            await w.drain()
            await asyncio.sleep(0)
        return True

    async def main() -> None:
        async with Server(script) as s:
            c = Client(1, 2)
            for _ in range(2):
                r = await fetch(c, s.endpoint())
                assert (r.status, r.body, r.length) == (200, b"hello world", None)
                assert r.headers == {"X-Kept": "?1", "Content-Type": "a/b"}
            assert s.conns == 1
            await c.close()

    runner.run(main())


# -- strict framing ---------------------------------------------------------------------------

H200 = b"HTTP/1.1 200 OK\r\n"
CHUNKED = H200 + b"Transfer-Encoding: chunked\r\n\r\n"
MALFORMED = {
    "conflicting-lengths": H200 + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "repeated-length": H200 + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "negative-length": H200 + b"Content-Length: -5\r\n\r\nhello",
    "hex-length": H200 + b"Content-Length: 0x5\r\n\r\nhello",
    "empty-length": H200 + b"Content-Length:\r\n\r\n",
    "gzip-chunked": H200 + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "identity": H200 + b"Transfer-Encoding: identity\r\n\r\nhello",
    "chunked-twice": H200 + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "signed-chunk": CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "underscore-chunk": CHUNKED + b"5_0\r\nhello\r\n0\r\n\r\n",
    "chunk-overrun": CHUNKED + b"5\r\nhelloXX0\r\n\r\n",
    "chunk-ext-lf": CHUNKED + b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "chunk-ext-cr": CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "trailer-lf": CHUNKED + b"0\r\nX: a\nY: b\r\n\r\n",
    "trailer-cr": CHUNKED + b"0\r\nX: a\rb\r\n\r\n",
    "long-chunk-line": CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
    "space-before-colon": H200 + b"X : y\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": H200 + b" folded\r\nContent-Length: 0\r\n\r\n",
    "bare-lf-in-head": H200 + b"X: a\nContent-Length: 0\r\n\r\n",
    "bare-cr-in-head": H200 + b"X: a\rContent-Length: 0\r\n\r\n",
    "nul-in-head": H200 + b"X: a\0b\r\nContent-Length: 0\r\n\r\n",
    "lf-only-head": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n\r\n\r\n",
    "four-digit-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "http2-status-line": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "protocol-switch": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "garbage": b"garbage\r\n\r\n",
    "truncated-length": H200 + b"Content-Length: 10\r\n\r\nhello",
    "truncated-chunked": CHUNKED + b"5\r\nhello\r\n",
    "truncated-head": H200 + b"Content-Len",
    "nothing": b"",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_response_is_upstream_error(runner: asyncio.Runner, raw: bytes) -> None:
    """Anything not plainly framed fails the exchange as a plain UpstreamError (502), not
    a timeout, and the connection is not kept."""

    async def main() -> None:
        async with Server(answer(raw, again=False)) as s:
            c = Client(*PATIENT)
            with pytest.raises(UpstreamError) as caught:
                await fetch(c, s.endpoint())
            assert type(caught.value) is UpstreamError, caught.value
            assert not c._pools.get(s.endpoint().origin)
            await c.close()

    runner.run(main())


@pytest.mark.parametrize("over", [False, True], ids=["at-limit", "over-limit"])
def test_response_head_limit(runner: asyncio.Runner, over: bool) -> None:
    """A head of exactly MAX_HEAD bytes is read; one byte more fails at once, while the
    gateway keeps the connection open (no waiting for the read timeout)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: "
    head += b"a" * (MAX_HEAD - len(head) + over)
    raw = head + b"\r\n\r\nok"

    async def main() -> None:
        async with Server(answer(raw)) as s:
            c = Client(1, 5)
            if over:
                t0 = time.monotonic()
                with pytest.raises(UpstreamError, match="head too large"):
                    await fetch(c, s.endpoint())
                assert time.monotonic() - t0 < 2
            else:
                assert (await fetch(c, s.endpoint())).body == b"ok"
            await c.close()

    runner.run(main())


# -- when a connection is (not) reused ---------------------------------------------------------

LENGTH_OK = b"Content-Length: 2\r\n\r\nok"
REUSE = {
    "keep-alive": (H200 + b"Connection: keep-alive\r\n" + LENGTH_OK, 1),
    "connection-close": (H200 + b"Connection: close\r\n" + LENGTH_OK, 3),
    "close-in-list": (H200 + b"connection: Keep-Alive, CLOSE\r\n" + LENGTH_OK, 3),
    "http/1.0": (b"HTTP/1.0 200 OK\r\n" + LENGTH_OK, 3),
    "bytes-beyond-length": (H200 + LENGTH_OK + b"JUNK", 3),
    "bytes-beyond-chunks": (CHUNKED + b"2\r\nok\r\n0\r\n\r\nX", 3),
    "both-framings": (
        H200 + b"Content-Length: 9\r\n" + CHUNKED[len(H200) :] + b"2\r\nok\r\n0\r\n\r\n",
        3,
    ),
}


@pytest.mark.parametrize("raw,conns", REUSE.values(), ids=REUSE.keys())
def test_reuse_only_after_clean_keep_alive_response(
    runner: asyncio.Runner, raw: bytes, conns: int
) -> None:
    """Three requests; the server would keep every connection, so only the client's own
    rules (HTTP/1.1, no Connection: close, ending exactly where the framing says, one
    framing) decide how many connections it opens. Both framings: chunked wins."""

    async def main() -> None:
        async with Server(answer(raw)) as s:
            c = Client(*PATIENT)
            for _ in range(3):
                assert (await fetch(c, s.endpoint())).body == b"ok"
            assert s.conns == conns
            await c.close()

    runner.run(main())


def test_body_until_close_is_never_reused(runner: asyncio.Runner) -> None:
    """No Content-Length and no chunking: the body ends with the connection, whole."""

    async def main() -> None:
        async with Server(
            answer(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nall of it", False)
        ) as s:
            c = Client(*PATIENT)
            for _ in range(2):
                r = await fetch(c, s.endpoint())
                assert (r.status, r.body, r.length) == (200, b"all of it", None)
            assert s.conns == 2
            await c.close()

    runner.run(main())


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_end_at_the_head(runner: asyncio.Runner, status: int) -> None:
    """204 and 304 have no body whatever their headers say, and keep the connection."""
    raw = b"HTTP/1.1 %d X\r\nContent-Type: x\r\nTransfer-Encoding: chunked\r\n\r\n" % status

    async def main() -> None:
        async with Server(answer(raw)) as s:
            c = Client(*PATIENT)
            for _ in range(2):
                r = await fetch(c, s.endpoint())
                assert (r.status, r.body) == (status, b"")
            assert s.conns == 1
            await c.close()

    runner.run(main())


def test_connection_closed_by_gateway_while_idle_is_not_reused(runner: asyncio.Runner) -> None:
    """A pooled connection the gateway has since closed is dropped, not written to."""

    async def main() -> None:
        async with Server(answer(ok(b"ok"), again=False)) as s:
            c = Client(*PATIENT)
            assert (await fetch(c, s.endpoint())).body == b"ok"
            await asyncio.sleep(0.05)
            assert (await fetch(c, s.endpoint())).body == b"ok"
            assert s.conns == 2
            await c.close()

    runner.run(main())


def test_idle_connection_expires(runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection idle for IDLE_TIMEOUT is closed rather than reused (the gateway may
    be about to close it)."""
    monkeypatch.setattr(upstream, "IDLE_TIMEOUT", 0.3)

    async def main() -> None:
        async with Server(answer(ok())) as s:
            c = Client(*PATIENT)
            await fetch(c, s.endpoint())
            await fetch(c, s.endpoint())
            assert s.conns == 1
            await asyncio.sleep(0.4)
            await fetch(c, s.endpoint())
            assert s.conns == 2
            await c.close()

    runner.run(main())


# -- timeouts and unreachable gateways ---------------------------------------------------------


def test_silence_is_upstream_timeout(runner: asyncio.Runner) -> None:
    """Silence before the head or in mid-body raises UpstreamTimeout (504) after the read
    timeout; a gateway that trickles bytes more often than that is never cut off."""
    body_stalls = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"

    async def trickle(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: Request) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for _ in range(6):
            await asyncio.sleep(0.05)
            w.write(b"x")
        return False

    async def main() -> None:
        for script in (answer(b"", delay=5), answer(body_stalls)):
            async with Server(script) as s:
                c = Client(10, 0.5)
                t0 = time.monotonic()
                with pytest.raises(UpstreamTimeout):
                    await fetch(c, s.endpoint())
                assert 0.45 < time.monotonic() - t0 < 2.5
                await c.close()
        async with Server(trickle) as s:
            c = Client(10, 0.5)  # a byte every 0.05 s: 10x inside the read timeout
            assert (await fetch(c, s.endpoint())).body == b"x" * 6
            await c.close()

    runner.run(main())


def test_connect_failures(runner: asyncio.Runner) -> None:
    """Refused and unresolvable are UpstreamUnreachable (502); a connect that hangs is
    UpstreamTimeout (504) after the connect timeout."""

    async def main() -> None:
        c = Client(0.3, 1)
        with socket.socket() as bound:  # bound, never listening: connecting is refused
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            with pytest.raises(UpstreamUnreachable):
                await fetch(c, Endpoint(f"http://127.0.0.1:{port}/"))

        async def no_such_name(_ep: Endpoint) -> list[tuple[int, str]]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        real_resolve = c._resolve
        c._resolve = no_such_name  # type: ignore[method-assign]
        with pytest.raises(UpstreamUnreachable):
            await fetch(c, Endpoint("http://gateway.invalid/"))
        c._resolve = real_resolve  # type: ignore[method-assign]

        loop = asyncio.get_running_loop()

        async def hang(*_args: object, **_kwargs: object) -> None:
            await asyncio.sleep(30)

        real_connect = loop.create_connection
        loop.create_connection = hang  # type: ignore[method-assign, assignment]
        try:
            t0 = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await fetch(c, Endpoint("http://127.0.0.1:9/"))
            assert 0.25 < time.monotonic() - t0 < 1.5
        finally:
            loop.create_connection = real_connect  # type: ignore[method-assign]
        await c.close()

    runner.run(main())


def test_name_is_resolved_and_each_address_tried(runner: asyncio.Runner) -> None:
    """A gateway named by host name connects through whichever resolved address answers
    (localhost may resolve to ::1 first, where nothing listens)."""

    async def main() -> None:
        async with Server(answer(ok())) as s:
            c = Client(*PATIENT)
            ep = Endpoint(f"http://localhost:{s.port}/")
            assert ep.numeric is None
            assert (await fetch(c, ep)).body == b"hello"
            assert s.requests[0].headers[0] == b"Host: localhost:%d" % s.port
            await c.close()

    runner.run(main())


def _self_signed(tmp_path: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, pem.decode()


def test_tls_verifies_the_gateway_and_reuses(runner: asyncio.Runner, tmp_path: Path) -> None:
    """https gateways: an untrusted certificate is UpstreamUnreachable; a trusted one
    carries keep-alive exchanges on one TLS connection, with SNI and Host by name."""
    cert_file, key_file, pem = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    conns: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            while True:
                await read_request(reader)
                writer.write(ok(b"tls"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        ep = Endpoint(f"https://localhost:{port}/x")
        untrusting = Client(2, 2)
        with pytest.raises(UpstreamUnreachable):
            await fetch(untrusting, ep)
        c = Client(2, 2)
        c._tls = ssl.create_default_context(cadata=pem)
        for _ in range(2):
            r = await fetch(c, ep)
            assert (r.status, r.body, r.headers) == (
                200,
                b"tls",
                {"Content-Type": "message/ohttp-res"},
            )
        assert len(conns) == 1  # (the refused handshake never reached the handler)
        await c.close()
        server.close()

    runner.run(main())


# -- request bodies, back-pressure, abandoning and cancelling ----------------------------------


def test_streaming_upload_chunked_or_with_length(runner: asyncio.Runner) -> None:
    """A body of unknown length goes up chunked, a known one with Content-Length (empty
    pieces skipped); a body source that fails fails the exchange and the connection."""
    payload = b"abcd" + b"e" * 100_000

    async def pieces() -> AsyncIterator[bytes]:
        for p in (b"ab", b"", b"cd", b"e" * 100_000):
            await asyncio.sleep(0.005)
            yield p

    async def failing() -> AsyncIterator[bytes]:
        yield b"x"
        raise ValueError("too large")

    async def main() -> None:
        async with Server(answer(ok(b"done"))) as s:
            c = Client(*PATIENT)
            assert (await fetch(c, s.endpoint(), pieces(), None)).body == b"done"
            assert s.requests[-1].body == payload
            assert b"Transfer-Encoding: chunked" in s.requests[-1].headers
            assert (await fetch(c, s.endpoint(), pieces(), len(payload))).body == b"done"
            assert s.requests[-1].body == payload
            assert b"Content-Length: %d" % len(payload) in s.requests[-1].headers
            assert s.conns == 1
            with pytest.raises(UpstreamError, match="request body not sent"):
                await fetch(c, s.endpoint(), failing(), None)
            assert (await fetch(c, s.endpoint())).body == b"done"
            assert s.conns == 2
            await c.close()

    runner.run(main())


def test_early_answer_while_body_still_going_up_is_not_reused(runner: asyncio.Runner) -> None:
    """The gateway answers (413) before the body is sent: the answer is returned, the
    rest of the upload is cancelled and the connection closed, never reused half-sent."""

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(30)
        yield b"b"

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(early, "127.0.0.1", 0)
        ep = Endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        c = Client(*PATIENT)
        r = await fetch(c, ep, slow_body(), None)
        assert (r.status, r.body) == (413, b"big")
        assert not c._pools.get(ep.origin)
        await c.close()
        server.close()

    runner.run(main())


def test_back_pressure_pauses_reading_without_timing_out(runner: asyncio.Runner) -> None:
    """A large body is buffered only up to HIGH_WATER (plus one read) before the gateway
    is no longer read; a consumer slower than the read timeout is not a silent gateway;
    the connection is reused once the body has been read to its end."""
    big = os.urandom(2 * 1024 * 1024)
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)

    async def main() -> None:
        async with Server(answer(raw)) as s:
            c = Client(1, 0.3)
            for pause in (0.2, 0.6):
                async with c.request(s.endpoint(), b"POST", b"", b"x") as conn:
                    await asyncio.sleep(pause)
                    assert conn._paused
                    assert conn._buffered <= upstream.HIGH_WATER + 256 * 1024
                    out = bytearray()
                    while chunk := await conn.read():
                        out += chunk
                    assert out == big
            assert s.conns == 1
            await c.close()

    runner.run(main())


def test_abandoned_body_closes_the_connection(runner: asyncio.Runner) -> None:
    """Leaving the exchange before the body's end hangs up on the gateway (it sees EOF)
    rather than pooling a connection with half a response on it."""
    hung_up = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: Request) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        assert await asyncio.wait_for(r.read(1), 5) == b""
        hung_up.set()
        return False

    async def main() -> None:
        async with Server(script) as s:
            c = Client(1, 10)
            async with c.request(s.endpoint(), b"POST", b"", b"x") as conn:
                assert await conn.read() == b"hello"
            await asyncio.wait_for(hung_up.wait(), 5)
            assert not c._pools.get(s.endpoint().origin)
            await c.close()

    runner.run(main())


def test_abandoned_paused_body_is_not_reused(runner: asyncio.Runner) -> None:
    """A body left unread while reading was paused: the next request gets a new
    connection and its own answer, never the rest of the old body."""
    big = b"y" * (upstream.HIGH_WATER * 3)

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request) -> bool:
        body = big if req.body == b"big" else b"ok"
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()
        return True

    async def main() -> None:
        async with Server(script) as s:
            c = Client(*PATIENT)
            async with c.request(s.endpoint(), b"POST", b"", b"big") as conn:
                await asyncio.sleep(0.1)
                assert conn._paused
            assert (await fetch(c, s.endpoint(), b"small")).body == b"ok"
            assert s.conns == 2
            await c.close()

    runner.run(main())


def test_cancellation_while_waiting_closes_connection_and_upload(runner: asyncio.Runner) -> None:
    """The relay cancels the exchange when its client goes away: the connection is closed
    (the gateway sees EOF), and the upload task ends with it."""
    hung_up = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        while await reader.read(65536):
            pass
        hung_up.set()
        writer.close()

    async def endless() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(30)
        yield b"b"

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ep = Endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        c = Client(1, 10)
        task = asyncio.ensure_future(fetch(c, ep, endless(), None))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(hung_up.wait(), 5)
        assert not c._pools.get(ep.origin)
        await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert all(t.done() for t in others if "_upload" in repr(t)), others
        await c.close()
        server.close()

    runner.run(main())


# -- the relay's fast path: send() and one callback, no task ----------------------------------


class Events:
    """``on_event`` for ``send``: records each call (the connection's state at that time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, BaseException | None, bytes]] = []
        self.fired = asyncio.Event()

    def __call__(self, conn: upstream.Connection) -> None:
        self.calls.append((conn.status, conn.complete, conn.error, conn.head_lines))
        self.fired.set()


def test_send_calls_back_once_with_the_whole_short_answer(runner: asyncio.Runner) -> None:
    """No idle connection: None, nothing sent. With one: one write, one call once the
    answer is parsed (complete, kept headers as wire lines), then reuse."""

    async def main() -> None:
        async with Server(answer(ok(b"fast"))) as s:
            c = Client(*PATIENT)
            ep = s.endpoint("/gw")
            assert c.send(ep, b"POST", REQUEST_LINES, b"abc", KEEP, Events()) is None
            assert s.requests == []
            await fetch(c, ep)  # the slow path opens (and pools) the connection
            for i in range(3):
                events = Events()
                conn = c.send(ep, b"POST", REQUEST_LINES, b"x" * i, KEEP, events)
                assert conn is not None
                await asyncio.wait_for(events.fired.wait(), 5)
                assert events.calls == [(200, True, None, b"Content-Type: message/ohttp-res\r\n")]
                assert conn.read_nowait() == b"fast"
                c.release(conn)
            assert s.conns == 1
            assert s.requests[-1].headers == [
                b"Host: 127.0.0.1:%d" % s.port,
                b"Content-Type: message/ohttp-req",
                b"Content-Length: 2",
            ]
            await c.close()

    runner.run(main())


def test_send_with_a_streamed_answer_hands_over_to_read(runner: asyncio.Runner) -> None:
    """The head first, the body later: the call comes at the head (not complete); read()
    then follows the rest as on the slow path."""

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: Request) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"3\r\none\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"3\r\ntwo\r\n0\r\n\r\n")
        await w.drain()
        return True

    async def main() -> None:
        async with Server(script) as s:
            c = Client(*PATIENT)
            ep = s.endpoint()
            await fetch(c, ep)
            events = Events()
            conn = c.send(ep, b"POST", REQUEST_LINES, b"abc", KEEP, events)
            assert conn is not None
            await asyncio.wait_for(events.fired.wait(), 5)
            assert events.calls == [(200, False, None, b"Content-Type: a/b\r\n")]
            out = b""
            while chunk := await conn.read():
                out += chunk
            assert out == b"onetwo" and len(events.calls) == 1
            c.release(conn)
            assert c.pooled(ep) is conn  # cleanly framed: reused
            await c.close()

    runner.run(main())


def test_send_reports_silence_and_a_cut_connection(runner: asyncio.Runner) -> None:
    async def main() -> None:
        for script, error in ((answer(ok(), delay=3), UpstreamTimeout), (None, UpstreamError)):
            calls = 0

            async def cut(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _q: Request) -> bool:
                nonlocal calls
                calls += 1
                if calls == 1:
                    w.write(ok())
                    await w.drain()
                    return True
                w.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # then the gateway hangs up
                await w.drain()
                return False

            async with Server(script or cut) as s:
                c = Client(10.0, 0.3)
                ep = s.endpoint()
                if script is not None:
                    s.script = answer(ok())
                    await fetch(c, ep)
                    s.script = script
                else:
                    await fetch(c, ep)
                events = Events()
                conn = c.send(ep, b"POST", REQUEST_LINES, b"abc", KEEP, events)
                assert conn is not None
                await asyncio.wait_for(events.fired.wait(), 5)
                ((_, _, exc, _),) = events.calls
                assert isinstance(exc, error), exc
                c.release(conn)
                assert c.pooled(ep) is None  # never reused after a failure
                await c.close()

    runner.run(main())


# -- fuzz: arbitrary bytes from the gateway ----------------------------------------------------


class _Unframed(Exception):
    """The reference reading found the response malformed or cut short."""


@dataclass(frozen=True)
class Framed:
    """A response as an independent reading of RFC 9112 frames it (the fuzz oracle): as
    lenient as the client on what does not move message boundaries (control bytes in
    values, blanks around a chunk size, trailers' contents), strict on line ends."""

    status: int
    headers: dict[str, str]
    body: bytes
    length: int | None  # Content-Length framing
    end: int  # where the response ends in the bytes sent
    keep_alive: bool  # HTTP/1.1, no Connection: close, exactly one framing
    until_close: bool


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEXDIG = frozenset(b"0123456789abcdefABCDEF")


def _clean(line: bytes) -> bool:
    """No stray CR, LF or NUL: the bytes that make one reader's line two for another."""
    return b"\r" not in line and b"\n" not in line and b"\0" not in line


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",")]


def reference(raw: bytes) -> Framed | None:
    try:
        return _reference(raw)
    except _Unframed:
        return None


def _reference(raw: bytes) -> Framed:
    pos = 0
    while True:  # interim (1xx) heads, then the final one
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0 or end - pos > MAX_HEAD:
            raise _Unframed
        status_line, *lines = raw[pos:end].split(b"\r\n")
        pos = end + 4
        version, sp, code, reason = (
            status_line[:8],
            status_line[8:9],
            status_line[9:12],
            status_line[12:],
        )
        if version not in (b"HTTP/1.0", b"HTTP/1.1") or sp != b" " or len(code) != 3:
            raise _Unframed
        if not code.isdigit() or not 100 <= int(code) <= 599 or int(code) == 101:
            raise _Unframed
        if reason and (reason[:1] != b" " or not _clean(reason)):
            raise _Unframed
        fields: list[tuple[bytes, bytes]] = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or not set(name) <= _TCHAR or not _clean(value):
                raise _Unframed
            fields.append((name.lower(), value.strip(b" \t")))
        if int(code) >= 200:
            break

    def values(name: bytes) -> list[bytes]:
        return [v for n, v in fields if n == name]

    status = int(code)
    headers = {
        kept: values(name)[0].decode("utf-8", "surrogateescape")
        for name, kept in KEEP.items()
        if values(name)
    }
    keep_alive = version == b"HTTP/1.1" and b"close" not in _tokens(values(b"connection"))
    if status in (204, 304):
        return Framed(status, headers, b"", None, pos, keep_alive, False)
    if values(b"transfer-encoding"):
        if _tokens(values(b"transfer-encoding")) != [b"chunked"]:
            raise _Unframed
        body = bytearray()
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                raise _Unframed
            size, _, ext = raw[pos:eol].partition(b";")
            size = size.strip(b" \t")
            if not size or not set(size) <= _HEXDIG or not _clean(ext):
                raise _Unframed
            n, pos = int(size, 16), eol + 2
            if n == 0:
                break
            if raw[pos + n : pos + n + 2] != b"\r\n":
                raise _Unframed
            body += raw[pos : pos + n]
            pos += n + 2
        while True:  # trailer lines, up to an empty one
            eol = raw.find(b"\r\n", pos)
            if eol < 0 or not _clean(raw[pos:eol]):
                raise _Unframed
            line, pos = raw[pos:eol], eol + 2
            if not line:
                break
        single = keep_alive and not values(b"content-length")
        return Framed(status, headers, bytes(body), None, pos, single, False)
    if values(b"content-length"):
        lengths = set(_tokens(values(b"content-length")))
        if len(lengths) != 1 or not all(x.isdigit() for x in lengths):
            raise _Unframed
        n = int(lengths.pop())
        if len(raw) - pos < n:
            raise _Unframed
        return Framed(status, headers, raw[pos : pos + n], n, pos + n, keep_alive, False)
    return Framed(status, headers, raw[pos:], None, len(raw), False, True)


CODINGS = [b"gzip", b"identity", b"gzip, chunked", b"chunked, gzip", b"Chunked", b"chunked;q=1",
           b"chunked, chunked", b"chunked,", b" chunked "]  # fmt: skip
INSERTS = [b"Content-Length: 3\r\n", b"Content-Length: -1\r\n", b"Content-Length: 1e3\r\n",
           b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
           b"Connection: close\r\n", b" folded\r\n", b"X:\0\r\n", b"X\r\n", b"\r\n",
           b"HTTP/1.1 100 Continue\r\n\r\n"]  # fmt: skip


def _chunked(rng: random.Random, body: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        n = rng.randint(1, max(1, len(body) - i)) if i < len(body) else 0
        size = b"%x" % n if rng.randrange(3) else b"00%X" % n
        ext = rng.choice([b"", b"", b";a=b", b' ; name="v;x"', b";"])
        out += size + ext + b"\r\n"
        if n == 0:
            break
        out += body[i : i + n] + b"\r\n"
        i += n
    for _ in range(rng.choice((0, 0, 1, 2))):
        out += rng.choice([b"X-Trailer: 1", b"Server-Timing: x;dur=1", b"X:"]) + b"\r\n"
    return bytes(out + b"\r\n")


def _edit(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.randrange(9)
    at = rng.randint(0, len(b))
    if op == 0 and b:  # flip a byte
        b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    elif op == 1:  # cut short
        del b[at:]
    elif op == 2:  # insert random bytes
        b[at:at] = rng.randbytes(rng.randint(1, 8))
    elif op == 3:  # delete a run
        del b[at : at + rng.randint(1, 16)]
    elif op == 4 and b:  # duplicate a slice elsewhere (framing confusion)
        i = rng.randrange(len(b))
        b[at:at] = b[i : i + rng.randint(1, 64)]
    elif op == 5 and b"\r\n" in b:  # damage a line end
        crlfs = [i for i in range(len(b) - 1) if b[i : i + 2] == b"\r\n"]
        i = rng.choice(crlfs)
        b[i : i + 2] = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r", b"", b"\r\n\r\n"])
    elif op == 6:  # a stray control byte
        b[at:at] = rng.choice([b"\r", b"\n", b"\0", b" ", b"\t", b";", b":"])
    elif op == 7 and b"\r\n" in b:  # a header line after the status line
        i = b.index(b"\r\n") + 2
        b[i:i] = rng.choice(INSERTS)
    elif op == 8:  # nudge a digit (lengths, chunk sizes, status)
        digits = [i for i, c in enumerate(b) if 0x30 <= c <= 0x39]
        if digits:
            b[rng.choice(digits)] = rng.choice(b"0123456789aF")
    return bytes(b)


def hostile_response(rng: random.Random) -> tuple[bytes, bool]:
    """A response and whether it was mutated: random bytes (1 in 16), or a response
    built from random parts (framing, codings, interim heads, heads near MAX_HEAD,
    trailing junk), then 0-5 edits (bit flips, cuts, bad CRLF, stray bytes, header
    lines inserted, digits changed)."""
    if rng.randrange(16) == 0:
        return rng.randbytes(rng.randrange(rng.choice((16, 300)) + 1)), True
    body = rng.randbytes(rng.choice((0, 1, 7, 60, 700)))
    fields = [b"Content-Type: " + rng.choice([b"message/ohttp-res", b"text/event-stream"])]
    if rng.randrange(4) == 0:
        fields.append(b"X-Kept: " + rng.choice([b"?1", b"", b"a, b", b"\xff\xfe"]))
    if rng.randrange(5) == 0:
        fields.append(b"Connection: " + rng.choice([b"close", b"keep-alive", b"x, Close"]))
    framing = rng.choice(["length", "length", "chunked", "chunked", "close",
                          "both", "two-lengths", "coding", "no-body"])  # fmt: skip
    payload = body
    if framing == "length":
        fields.append(b"Content-Length: %d" % len(body))
    elif framing in ("chunked", "both"):
        fields.append(b"Transfer-Encoding: chunked")
        payload = _chunked(rng, body)
        if framing == "both":
            fields.append(b"Content-Length: %d" % rng.choice((len(body), len(payload))))
    elif framing == "two-lengths":
        fields += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    elif framing == "coding":
        fields.append(b"Transfer-Encoding: " + rng.choice(CODINGS))
        payload = _chunked(rng, body) if rng.randrange(2) else body
    status = rng.choice((204, 304)) if framing == "no-body" else rng.choice((200, 200, 404, 502))
    rng.shuffle(fields)
    version = b"HTTP/1.1" if rng.randrange(8) else b"HTTP/1.0"
    head = version + b" %d" % status + rng.choice([b" OK", b"", b" ", b" Not Quite OK"]) + b"\r\n"
    head += b"".join(f + b"\r\n" for f in fields)
    if rng.randrange(16) == 0:  # a head near the limit, either side
        pad = MAX_HEAD - len(head) - len(b"X-Pad: ") - 2 + rng.randint(-3, 3)
        head += b"X-Pad: " + b"p" * max(pad, 0) + b"\r\n"
    raw = head + b"\r\n" + payload
    if rng.randrange(6) == 0:
        raw = (
            rng.choice([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 X\r\nLink: <a>\r\n\r\n"])
            + raw
        )
    if rng.randrange(10) == 0:
        raw += rng.choice([b"junk", b"\r\n", ok(b"smuggled")])
    edits = rng.choice((0, 0, 0, 1, 1, 2, 3, 5))
    for _ in range(edits):
        raw = _edit(rng, raw)
    return raw, edits > 0


PROBE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nprobe"


class FuzzGateway:
    """Answers a request whose body is b"fuzz" with the current example's bytes, in
    pieces, then hangs up unless the reference reading says the response ended before
    the connection did; answers b"probe" cleanly and notes whether the probe came on the
    connection that carried the fuzz bytes (that is, whether the client reused it)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.keep_open = False
        self.probe_reused: bool | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        after_fuzz = False
        try:
            while True:
                req = await read_request(reader)
                if req.body == b"probe":
                    self.probe_reused, after_fuzz = after_fuzz, False
                    writer.write(PROBE)
                    continue
                after_fuzz = True
                for piece in self.pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if not self.keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


HANG = 15.0  # seconds: an exchange this long counts as a hang (3x PATIENT's read timeout)


async def check_one(client: Client, ep: Endpoint, gw: FuzzGateway, rng: random.Random) -> None:
    raw, mutated = hostile_response(rng)
    ref = reference(raw)
    # Pieces end inside the response: bytes past its end go out with its last bytes, since
    # arriving later, with the connection back in the pool, no client could tell them from
    # the next response's.
    limit = len(raw) if ref is None else ref.end
    cuts = sorted(rng.sample(range(1, limit), min(max(limit - 1, 0), rng.randrange(3))))
    gw.pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    gw.keep_open = ref is not None and not ref.until_close
    gw.probe_reused = None
    outcome: Result | UpstreamError
    try:
        async with asyncio.timeout(HANG):
            outcome = await fetch(client, ep, b"fuzz")
    except UpstreamError as exc:
        outcome = exc
    except TimeoutError:
        raise AssertionError(f"hang: no answer or error within {HANG} s") from None
    if isinstance(outcome, Result):
        assert ref is not None, f"accepted what a strict reading rejects: {outcome}"
        got = (outcome.status, outcome.headers, outcome.body, outcome.length)
        assert got == (ref.status, ref.headers, ref.body, ref.length), (got, ref)
    elif ref is not None and gw.keep_open:
        # Stricter than the reference is allowed; waiting for bytes the reference says
        # are not coming is a disagreement about where the response ends.
        assert not isinstance(outcome, UpstreamTimeout), (outcome, ref)
    async with asyncio.timeout(HANG):
        probe = await fetch(client, ep, b"probe")
    assert probe.body == b"probe"
    clean = ref is not None and ref.keep_alive and not ref.until_close and ref.end == len(raw)
    if gw.probe_reused:
        assert isinstance(outcome, Result) and clean, ("reused after", outcome, ref)
    elif isinstance(outcome, Result) and clean and not mutated:
        raise AssertionError(f"a clean keep-alive response was not reused: {ref}")


@pytest.mark.fuzz
def test_fuzz_gateway_bytes_give_a_framed_result_or_upstream_error(runner: asyncio.Runner) -> None:
    """Random and mutated gateway responses: the client returns what a strict reading
    frames, or raises UpstreamError; never another exception (nor one in a callback, see
    ``runner``), never a hang, never reuse after a response that did not end cleanly."""
    gw = FuzzGateway()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(gw.handle, "127.0.0.1", 0)

    server = runner.run(start())
    ep = Endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    client = Client(*PATIENT)

    @HTTP
    @given(st.integers(0, 2**64 - 1))
    def run(seed: int) -> None:
        runner.run(check_one(client, ep, gw, random.Random(seed)))

    try:
        run()
    finally:
        runner.run(client.close())
        server.close()
