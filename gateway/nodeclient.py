"""The gateway's HTTP/1.1 client for its nodes: POST one sealed envelope, stream the answer.

aiohttp's ClientSession cost the gateway about a fifth of its CPU per request, most of it
on what forwarding switches off (cookies, redirects, proxies, auth, tracing, a URL and a
header multidict built per request, a payload object and a task per request body) and on
extra event-loop passes before the first byte. This client writes the request head and
the envelope in one ``write`` and parses the answer in ``data_received``: a short answer
that arrives in one segment is ready, head and body, after a single wake-up. Keep-alive
connections are pooled per node origin (scheme, host, port).

Privacy: it adds no header of its own (no User-Agent, Accept, Accept-Encoding, cookies)
beyond ``Host`` and ``Content-Length``, follows no redirects and reads no proxy settings.

Strictness (as ``relay/upstream.py``, the relay's client): an answer that is not plainly
framed (a bad status line, a header line with a stray CR, LF or NUL, conflicting or
malformed ``Content-Length``, a transfer coding other than ``chunked``, a malformed chunk)
fails the exchange, and a connection is reused only after an answer that ended exactly
where its framing said, on HTTP/1.1 without ``Connection: close``. Anything else closes it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
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


class NodeError(OpenPCCError):
    """The node broke, garbled, cut or stalled the exchange."""

    status_hint = 502


class NodeUnreachable(NodeError):
    """The connection was refused or failed, or the node closed it before any answer
    byte: the gateway takes the node out until its health check passes again."""


class NodeTimeout(NodeError):
    """The node did not accept the connection in time, or stayed silent for longer than
    the read timeout."""

    status_hint = 504


class Origin:
    """A node URL, parsed once: where to connect and the request line's fixed part."""

    __slots__ = ("host", "host_line", "key", "port", "prefix", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        default = 443 if self.tls else 80
        host = parts.hostname or ""
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        self.host = host
        self.port = parts.port or default
        self.key = (parts.scheme, host, self.port)
        authority = f"[{host}]" if ":" in host else host
        if parts.port and parts.port != default:
            authority += f":{parts.port}"
        self.prefix = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~").encode("ascii")
        self.host_line = b"Host: " + authority.encode("ascii") + b"\r\n"


class NodeConnection(ResponseFraming, asyncio.Protocol):
    """One keep-alive connection and the answer being read on it.

    After ``NodeClient.post``: ``status`` and ``media_type`` are set; ``read()`` gives the
    body as it arrives (b"" at its end); ``complete`` says the whole body is in already.
    """

    framing_error = NodeError

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.key: tuple[str, str, int] = ("", "", 0)
        self.closed = False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of this exchange's answer
        self._state = IDLE
        self._reusable = True
        self._buf = b""
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._paused = False
        self._exc: BaseException | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._remaining = 0
        self.status = 0
        self.media_type = ""
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
            self._fail(
                NodeError("the node closed the connection")
                if self.got_bytes
                else NodeUnreachable("the node closed the connection before answering")
            )
        self._cancel_timer()

    def data_received(self, data: bytes) -> None:
        if self._state in (IDLE, DONE):
            self._reusable = False  # bytes nobody asked for: never reuse this connection
            return
        self.got_bytes = True
        self._last_read = self._loop.time()
        buf = self._buf + data if self._buf else data
        try:
            buf = self._parse(buf)
        except (NodeError, ValueError) as exc:
            self._fail(NodeError(f"malformed answer: {exc}"))
            return
        self._buf = buf
        if buf and self._state == DONE:
            self._reusable = False  # more than the framing announced

    # -- answer parsing --------------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        if RESPONSE_HEAD.fullmatch(head) is None:
            raise NodeError("malformed head")
        status = int(head[9:12])
        low = head.lower()
        length = field_values(low, low, b"\r\ncontent-length:")
        coding = field_values(low, low, b"\r\ntransfer-encoding:")
        connection = b",".join(field_values(low, low, b"\r\nconnection:"))
        ctype = field_values(low, low, b"\r\ncontent-type:")
        if status < 200:
            if status == 101:
                raise NodeError("unexpected protocol switch")
            return  # an interim answer (100 Continue): the final one follows
        self.status = status
        # As aiohttp's ``content_type``: the first value's media type, lower case.
        self.media_type = (
            ctype[0].split(b";", 1)[0].strip(b" \t").decode("latin-1") if ctype else ""
        )
        if not head.startswith(b"HTTP/1.1") or b"close" in connection:
            self._reusable = False
        self.head_done = True
        if status in (204, 304):
            self._finish()
        elif coding:
            if coding != [b"chunked"]:
                raise NodeError("unsupported transfer coding")
            if length:
                self._reusable = False  # both framings sent: use chunked, then close
            self._state = CHUNK_SIZE
        elif length:
            if len(length) > 1 or not length[0].isdigit() or len(length[0]) > 18:
                raise NodeError("bad content-length")
            self._remaining = int(length[0])
            self._state = LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self._reusable = False  # the body ends when the connection does
            self._state = UNTIL_CLOSE
        self._wake()

    def _push(self, data: bytes) -> None:
        if data:
            self._body.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True  # back-pressure: the client is slower than the node
                self._cancel_timer()  # and the read timeout measures the node only
                self.transport.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self._state = DONE
        self._cancel_timer()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._reusable = False
        self._cancel_timer()
        self._wake()
        if self.transport is not None:
            self.transport.close()

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

    # -- read timeout: one timer per exchange, re-armed only when it fires early ------
    def _start_read_timeout(self) -> None:
        if self._state in (IDLE, DONE) or self._exc is not None or self._paused:
            return
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._last_read + self._read_timeout, self._check_timeout
            )

    def _check_timeout(self) -> None:
        self._timer = None
        deadline = self._last_read + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
        else:
            self._fail(NodeTimeout("the node stayed silent"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the exchange, as the caller sees it -----------------------------------------
    def send(self, request: bytes) -> None:
        """Start an exchange: the whole request in one write."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise NodeUnreachable("the node closed the connection")
        self._state = HEAD
        self._buf = b""
        self._exc = None
        self._body = []
        self._buffered = 0
        self.got_bytes = False
        self.status, self.media_type, self.head_done = 0, "", False
        self.transport.write(request)
        self._start_read_timeout()

    async def head(self) -> None:
        while not self.head_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    @property
    def complete(self) -> bool:
        """The whole body is here already: the next ``read`` after this one is b""."""
        return self._state == DONE

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" at the
        end; raises NodeError if the node broke the answer or went silent."""
        while not self._body:
            if self._exc is not None:
                raise self._exc
            if self._state == DONE:
                return b""
            await self._wait()
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            self._start_read_timeout()
        return data

    @property
    def reusable(self) -> bool:
        return (
            self._reusable
            and not self.closed
            and self._state == DONE
            and self._exc is None
            and not self._buf
            and not self._paused
        )

    def close(self) -> None:
        self._reusable = False
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()


class NodeClient:
    """Keep-alive connections to nodes, pooled per origin (unbounded, like the aiohttp
    connector with ``limit=0`` it replaces)."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pools: dict[tuple[str, str, int], deque[NodeConnection]] = {}
        self._origins: dict[str, Origin] = {}
        self._tls: ssl.SSLContext | None = None

    def origin(self, url: str) -> Origin:
        """``url`` parsed (once per node URL; registrations keep the set small)."""
        found = self._origins.get(url)
        if found is None:
            if len(self._origins) > 4096:  # URLs of long-gone nodes
                self._origins.clear()
            found = self._origins[url] = Origin(url)
        return found

    async def post(self, url: str, path: bytes, lines: bytes, body: bytes) -> NodeConnection:
        """POST ``body`` to ``url`` + ``path``; the connection once the answer's head is in.

        ``lines``: the caller's header lines, each ending in CRLF (``Host`` and
        ``Content-Length`` are added here). Hand the connection back with ``release``.
        """
        origin = self.origin(url)
        conn = self._pooled(origin) or await self._connect(origin)
        request = b"POST %s%s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
            origin.prefix, path, origin.host_line, lines, len(body), body,
        )  # fmt: skip
        try:
            conn.send(request)
            await conn.head()
        except BaseException:
            self.release(conn)  # closes it: the exchange did not finish
            raise
        return conn

    def _pooled(self, origin: Origin) -> NodeConnection | None:
        pool = self._pools.get(origin.key)
        if pool:
            now = time.monotonic()
            while pool:
                conn = pool.pop()
                if conn.reusable and now - conn.idle_since < IDLE_TIMEOUT:
                    return conn
                conn.close()
        return None

    def release(self, conn: NodeConnection) -> None:
        """Back to the pool after a cleanly finished exchange; closed otherwise."""
        if not conn.reusable:
            conn.close()
            return
        now = time.monotonic()
        conn.idle_since = now
        pool = self._pools.setdefault(conn.key, deque())
        while pool and now - pool[0].idle_since >= IDLE_TIMEOUT:
            pool.popleft().close()
        pool.append(conn)

    async def _connect(self, origin: Origin) -> NodeConnection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: NodeConnection(loop, self.read_timeout),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:  # slow, not refused: the node stays listed (as with aiohttp)
            raise NodeTimeout("connecting to the node timed out") from None
        except OSError as exc:  # refused, unreachable, TLS failure (ssl.SSLError)
            raise NodeUnreachable(f"node unreachable: {type(exc).__name__}") from None
        conn.key = origin.key
        return conn

    async def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.pop().close()
