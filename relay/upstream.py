"""The relay's HTTP/1.1 client for its gateways: what relaying needs and nothing else.

aiohttp's ClientSession spent ~100 us of CPU per relayed request, most of it on what the
relay switches off (cookies, redirects, proxies, auth, tracing, decompression, a URL and a
header multidict built per request) and on a task per request body. This client sends a
request head that the caller built from its allow-list plus ``Host`` and the framing
header, streams the body, and hands back the status, the allow-listed response headers and
the body as it arrives. Keep-alive connections are pooled per gateway origin.

Privacy: the client adds no header of its own (no User-Agent, Accept, Accept-Encoding,
Connection, cookies), follows no redirects and ignores proxy settings: the gateway sees
the relay's address and the caller's lines, nothing else.

Strictness: a response that is not plainly framed (a bad status line, a header line
with a stray CR or LF, conflicting or malformed ``Content-Length``, a transfer coding
other than ``chunked``, a malformed chunk) fails the exchange (502), and a connection
is reused only after a response that ended exactly where its framing said, on HTTP/1.1
without ``Connection: close``, with the request body fully sent. Anything else is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, urlsplit

from openpcc.errors import OpenPCCError
from openpcc.service.http1 import (
    CHUNK_SIZE,
    DONE,
    HEAD,
    HIGH_WATER,
    IDLE,
    IDLE_TIMEOUT,
    LENGTH,
    RESPONSE_HEAD,
    UNTIL_CLOSE,
    ResponseFraming,
    field_values,
)

DNS_TTL = 60.0  # how long a gateway host's resolved addresses are reused


class UpstreamError(OpenPCCError):
    """The gateway broke, garbled or cut the exchange (502)."""

    status_hint = 502


class UpstreamUnreachable(UpstreamError):
    """No connection to the gateway could be made (502)."""


class UpstreamTimeout(UpstreamError):
    """The gateway did not connect, or stayed silent, for longer than allowed (504)."""

    status_hint = 504


# b"\r\nname:" for each kept field name, and each kept name as written back: built once.
_FIELD_KEYS: dict[bytes, bytes] = {}
_NAMES: dict[str, bytes] = {}


class Endpoint:
    """One upstream URL, parsed once: where to connect and the request line's fixed part."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        host = parts.hostname or ""
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        default_port = 443 if self.tls else 80
        self.host = host
        self.port = parts.port or default_port
        try:
            self.numeric: int | None = (
                socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            )
        except ValueError:
            self.numeric = None  # a name: resolved when connecting, cached for DNS_TTL
        self.origin = (parts.scheme, host, self.port)
        authority = f"[{host}]" if ":" in host else host
        if parts.port and parts.port != default_port:
            authority += f":{parts.port}"
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
        self.target = target.encode("ascii")
        self.host_line = b"Host: " + authority.encode("ascii") + b"\r\n"


class Connection(ResponseFraming, asyncio.Protocol):
    """One keep-alive connection and the response currently being read on it.

    Two ways to follow a response: ``async with client.request(...)`` (awaits the head,
    then ``read()``), or ``client.send(..., on_event)``, the relay's fast path for a
    request whose body is all here: ``on_event(conn)`` is called once, without a task,
    when the head is in (with the whole body if it came along) or the exchange failed."""

    framing_error = UpstreamError

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.origin: tuple[str, str, int] = ("", "", 0)
        self.idle_since = 0.0
        self.upload: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._state = IDLE
        self._reusable = True
        self._buf = b""
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._paused = False
        self._exc: BaseException | None = None
        self.on_event: Callable[[Connection], None] | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._remaining = 0
        self._keep: dict[bytes, str] = {}
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_lines = b""  # the kept headers as wire lines ("Name: value\r\n")
        self.length: int | None = None
        self.head_done = False

    # -- asyncio callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._reusable = False
        if self._state == UNTIL_CLOSE and exc is None:
            self._finish()
        elif self._state not in (IDLE, DONE):
            self._fail(UpstreamError("the gateway closed the connection"))
        self._cancel_timer()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("the gateway closed the connection"))
        if self.head_done or self._exc is not None:
            self._notify()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._state in (IDLE, DONE):
            self._reusable = False  # bytes nobody asked for: never reuse this connection
            return
        self._last_read = self._loop.time()
        buf = self._buf + data if self._buf else data
        try:
            buf = self._parse(buf)
        except (UpstreamError, ValueError) as exc:
            self._fail(UpstreamError(f"malformed response: {exc}"))
            return
        self._buf = buf
        if buf and self._state == DONE:
            self._reusable = False  # more than the framing announced
        if self.head_done and self.on_event is not None:
            self._notify()  # after the whole segment is parsed: the body may have come along

    # -- response parsing ----------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        if RESPONSE_HEAD.fullmatch(head) is None:
            raise UpstreamError("malformed head")
        status = int(head[9:12])
        low = head.lower()  # fields are found by name here; kept values come from ``head``
        length = field_values(low, low, b"\r\ncontent-length:")
        coding = (
            field_values(low, low, b"\r\ntransfer-encoding:") if b"\r\ntransfer-e" in low else []
        )
        keep_alive = head.startswith(b"HTTP/1.1")
        if keep_alive and b"close" in low and b"\r\nconnection:" in low:
            keep_alive = b"close" not in b",".join(field_values(low, low, b"\r\nconnection:"))
        headers: dict[str, str] = {}
        lines = b""
        for name, as_name in self._keep.items():
            key = _FIELD_KEYS.get(name)
            if key is None:
                key = _FIELD_KEYS[name] = b"\r\n" + name + b":"
            at = low.find(key)
            if at >= 0:
                start = at + len(key)
                end = low.find(b"\r\n", start)
                value = head[start : end if end >= 0 else len(head)].strip(b" \t")
                headers[as_name] = value.decode("utf-8", "surrogateescape")
                wire = _NAMES.get(as_name)
                if wire is None:
                    wire = _NAMES[as_name] = as_name.encode("ascii")
                lines += b"%s: %s\r\n" % (wire, value)
        if status < 200:
            if status == 101:
                raise UpstreamError("unexpected protocol switch")
            return  # an interim answer (100 Continue): the final one follows
        self.status, self.headers, self.head_lines = status, headers, lines
        if not keep_alive:
            self._reusable = False
        if status in (204, 304):
            self._finish()
        elif coding:
            if coding != [b"chunked"]:
                raise UpstreamError("unsupported transfer coding")
            if length:
                self._reusable = False  # both framings sent: use chunked, then close
            self._state = CHUNK_SIZE
        elif length:
            if len(length) > 1 or not length[0].isdigit() or len(length[0]) > 18:
                raise UpstreamError("bad content-length")
            self.length = self._remaining = int(length[0])
            self._state = LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self._reusable = False  # the body ends when the connection does
            self._state = UNTIL_CLOSE
        self.head_done = True
        self._wake()
        self.start_read_timeout()  # (already running unless the body is still going up)

    def _push(self, data: bytes) -> None:
        if data:
            self._body.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True  # back-pressure: the client is slower than the gateway
                self._cancel_timer()  # and the read timeout measures the gateway only
                self.transport.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self._state = DONE  # (the read timer, if any, finds the exchange over and stops)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._reusable = False
        self._cancel_timer()
        self._wake()
        if self.transport is not None:
            self.transport.close()
        self._notify()

    def _notify(self) -> None:
        """The ``send`` fast path's one call: the head is in, or the exchange failed."""
        callback = self.on_event
        if callback is not None:
            self.on_event = None
            callback(self)

    @property
    def error(self) -> BaseException | None:
        """Why the exchange failed, if it did."""
        return self._exc

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- read timeout: one timer, kept across exchanges, re-armed only when it fires early
    def start_read_timeout(self) -> None:
        if self._state in (IDLE, DONE) or self._exc is not None or self._paused:
            return
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._last_read + self._read_timeout, self._check_timeout
            )

    def _check_timeout(self) -> None:
        self._timer = None
        if self._state in (IDLE, DONE) or self._exc is not None or self._paused:
            return  # no exchange waiting on the gateway: the next one arms it again
        deadline = self._last_read + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
        else:
            self._fail(UpstreamTimeout("the gateway stayed silent"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the exchange, as seen by the caller -----------------------------------------
    def begin(self, keep: dict[bytes, str]) -> None:
        self._state = HEAD
        self._keep = keep
        self._buf = b""
        self._exc = None
        self._body = []
        self._buffered = 0
        self.status, self.headers, self.length, self.head_done = 0, {}, None, False
        self.head_lines = b""

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamError("the gateway closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamError("the gateway closed the connection")
        if self._write_paused:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    async def head(self) -> None:
        while not self.head_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    @property
    def complete(self) -> bool:
        """The whole body is here already (a short fixed-length answer)."""
        return self._state == DONE

    def read_nowait(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            self.start_read_timeout()
        return data

    async def read(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some; b"" at
        the end; raises if the gateway broke the response or went silent."""
        while not self._body:
            if self._exc is not None:
                raise self._exc
            if self._state == DONE:
                return b""
            await self._wait()
        return self.read_nowait()

    def upload_failed(self, exc: BaseException) -> None:
        self._fail(UpstreamError(f"request body not sent: {type(exc).__name__}"))

    @property
    def reusable(self) -> bool:
        return (
            self._reusable
            and not self.closed
            and self._state == DONE
            and self._exc is None
            and not self._buf
            and not self._paused  # (an abandoned body left reading paused)
        )

    def close(self) -> None:
        self._reusable = False
        self.on_event = None
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()


class Exchange:
    """``async with client.request(...) as conn``: the connection, once the response head
    is in; on leaving, the connection goes back to the pool or is closed."""

    __slots__ = ("_body", "_client", "_conn", "_ep", "_keep", "_length", "_lines", "_method")

    def __init__(
        self,
        client: Client,
        ep: Endpoint,
        method: bytes,
        lines: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
        keep: dict[bytes, str],
    ) -> None:
        self._client, self._ep, self._method, self._lines = client, ep, method, lines
        self._body, self._length, self._keep = body, length, keep
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        ep, body = self._ep, self._body
        conn = self._client.pooled(ep) or await self._client.connect(ep)
        self._conn = conn
        conn.begin(self._keep)
        head = b"%s %s HTTP/1.1\r\n%s%s" % (self._method, ep.target, ep.host_line, self._lines)
        try:
            if body is None:
                conn.write(head + b"\r\n")
                conn.start_read_timeout()
            elif isinstance(body, bytes):
                if len(body) <= 16384:  # one segment for a small request
                    conn.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
                else:
                    conn.write(b"%sContent-Length: %d\r\n\r\n" % (head, len(body)))
                    conn.write(body)
                conn.start_read_timeout()
            else:
                if self._length is None:
                    conn.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
                else:
                    conn.write(b"%sContent-Length: %d\r\n\r\n" % (head, self._length))
                # The body goes up while the answer may already be coming down.
                conn.upload = asyncio.ensure_future(_upload(conn, body, self._length is None))
            await conn.head()
        except BaseException:
            self._client.release(conn)  # closes it: the exchange did not finish
            raise
        return conn

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            self._client.release(self._conn)


async def _upload(conn: Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Request body -> gateway, paced by the gateway (drain) and by the body's source."""
    try:
        async for chunk in body:
            if chunk:
                conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:  # the source failed (too large, client gone): fail the exchange
        conn.upload_failed(exc)
    else:
        conn.start_read_timeout()


class Client:
    """Pools of keep-alive connections by gateway origin (unbounded, like the aiohttp
    connector with ``limit=0`` that it replaces; the relay's concurrency cap bounds them)."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pools: dict[tuple[str, str, int], deque[Connection]] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._tls: ssl.SSLContext | None = None

    def request(
        self,
        ep: Endpoint,
        method: bytes,
        lines: bytes,
        body: bytes | AsyncIterator[bytes] | None = None,
        length: int | None = None,
        keep: dict[bytes, str] | None = None,
    ) -> Exchange:
        """``lines``: the caller's header lines, each ending in CRLF; ``Host`` and the
        framing (``Content-Length``, or ``Transfer-Encoding: chunked`` for a body of
        unknown ``length``) are added here. ``keep``: the response headers to return
        (first value of each), as {lower-case name on the wire: name in ``headers``}."""
        return Exchange(self, ep, method, lines, body, length, keep or {})

    def send(
        self,
        ep: Endpoint,
        method: bytes,
        lines: bytes,
        body: bytes,
        keep: dict[bytes, str],
        on_event: Callable[[Connection], None],
    ) -> Connection | None:
        """The fast path for a body that is all here, on an idle pooled connection: one
        write, no task. ``on_event(conn)`` is called once, when the head is in (the body
        too if it came with it: ``conn.complete``) or the exchange failed (``conn.error``);
        then ``read()`` follows the rest, and ``release(conn)`` ends the exchange.
        None (nothing sent) when no pooled connection is idle: use ``request``."""
        conn = self.pooled(ep)
        if conn is None:
            return None
        conn.begin(keep)
        head = b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            method, ep.target, ep.host_line, lines, len(body)
        )  # fmt: skip
        try:
            if len(body) <= 16384:  # one segment for a small request
                conn.write(head + body)
            else:
                conn.write(head)
                conn.write(body)
        except UpstreamError:
            conn.close()
            return None
        conn.on_event = on_event
        conn.start_read_timeout()
        return conn

    def pooled(self, ep: Endpoint) -> Connection | None:
        """The most recently used idle connection to ``ep``'s origin, if one is left."""
        pool = self._pools.get(ep.origin)
        if pool:
            now = time.monotonic()
            while pool:
                conn = pool.pop()
                if conn.reusable and now - conn.idle_since < IDLE_TIMEOUT:
                    return conn
                conn.close()
        return None

    def release(self, conn: Connection) -> None:
        """Back to the pool after a cleanly finished exchange; closed otherwise."""
        upload = conn.upload
        if upload is not None:
            conn.upload = None
            if not upload.done():
                upload.cancel()  # the answer is over or abandoned: the rest of the body is moot
                conn.close()
        if not conn.reusable:
            conn.close()
            return
        now = time.monotonic()
        conn.idle_since = now
        pool = self._pools.setdefault(conn.origin, deque())
        while pool and now - pool[0].idle_since >= IDLE_TIMEOUT:
            pool.popleft().close()
        pool.append(conn)

    async def connect(self, ep: Endpoint) -> Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if ep.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        error: OSError | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                for family, address in await self._resolve(ep):
                    try:
                        _, conn = await loop.create_connection(
                            lambda: Connection(loop, self.read_timeout),
                            address,
                            ep.port,
                            family=family,
                            ssl=tls,
                            server_hostname=ep.host if tls else None,
                        )
                    except OSError as exc:
                        error = exc
                        continue
                    conn.origin = ep.origin
                    return conn
        except TimeoutError:
            raise UpstreamTimeout("connecting to the gateway timed out") from None
        except OSError as exc:
            raise UpstreamUnreachable(f"gateway unreachable: {type(exc).__name__}") from exc
        raise UpstreamUnreachable(f"gateway unreachable: {type(error).__name__}") from error

    async def _resolve(self, ep: Endpoint) -> list[tuple[int, str]]:
        if ep.numeric is not None:
            return [(ep.numeric, ep.host)]
        key = (ep.host, ep.port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(
            ep.host, ep.port, type=socket.SOCK_STREAM
        )
        addresses = list(dict.fromkeys((family, sockaddr[0]) for family, *_, sockaddr in infos))
        self._dns[key] = (now + DNS_TTL, addresses)
        return addresses

    async def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.pop().close()
