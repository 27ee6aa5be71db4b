"""A lean Redis client for the spent-token store's one hot command, ``SET key 1 NX EX ttl``.

redis-py spent ~120 µs of CPU per lone command in the gateway (~50 in a pipeline); this
client spends a few: commands are RESP bytes built with one format, every command issued
in one event-loop pass leaves in one ``write`` on one connection, and ``data_received``
matches the replies to their callers in order (Redis answers a connection's commands in
the order they came), with no task per batch. Everything else the gateway asks Redis
(a key's first redemption, the node registry, ``ping``) stays on redis-py.

It speaks to what ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` name
(AUTH and SELECT once per connection, TLS with the system's CAs); for any other URL
``Resp.for_url`` returns None and the store keeps redis-py. A lost connection fails the
commands that were out (their outcome is unknown: the gateway answers 503 and never
accepts such a token) and the next command opens a new one; a command unanswered for
``timeout`` seconds closes the connection the same way.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import unquote, urlsplit

DEFAULT_TIMEOUT = 5.0
MAX_LINE = 64 * 1024  # longest reply line (an error text); more is a broken peer


class RespError(Exception):
    """Redis answered with an error (``-ERR ...``), or the connection broke."""


class _Connection(asyncio.Protocol):
    """Commands out in order; each reply resolves the oldest waiting future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiting: deque[asyncio.Future[bytes | None]] = deque()
        self._buf = b""
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RespError("connection to Redis lost"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, waiting = 0, self._waiting
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE:
                    self._broken("reply line too long")
                    return
                break
            kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
            if kind == b"$":  # a bulk string: its length, then the bytes
                try:
                    n = int(line)
                except ValueError:
                    self._broken("bad bulk length")
                    return
                if n < 0:
                    value: bytes | RespError | None = None
                    nxt = end + 2
                elif len(buf) < end + 2 + n + 2:
                    break  # the rest of it is still on its way
                elif buf[end + 2 + n : end + 4 + n] != b"\r\n":
                    self._broken("bulk string not followed by CRLF")
                    return
                else:
                    value, nxt = buf[end + 2 : end + 2 + n], end + 2 + n + 2
            elif kind in (b"+", b":"):
                value, nxt = line, end + 2
            elif kind == b"-":
                value, nxt = RespError(line.decode("utf-8", "replace")), end + 2
            else:  # arrays and RESP3 types: never a reply to what is sent here
                self._broken("unexpected reply type")
                return
            pos = nxt
            if not waiting:
                self._broken("a reply nobody asked for")
                return
            fut = waiting.popleft()
            if not fut.done():
                if isinstance(value, RespError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        self._buf = buf[pos:]
        self._progress = self._loop.time()
        if not waiting:
            self._disarm()

    def send(self, data: bytes, futures: list[asyncio.Future[bytes | None]]) -> None:
        """Write commands (RESP bytes) whose replies resolve ``futures``, in order."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise RespError("connection to Redis closed")
        if not self._waiting:
            self._progress = self._loop.time()
        self._waiting.extend(futures)
        self.transport.write(data)
        if self._timer is None:
            self._timer = self._loop.call_at(self._progress + self._timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._progress + self._timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
        else:
            self._broken("Redis did not answer in time")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _broken(self, why: str) -> None:
        self._fail(RespError(why))
        self.close()

    def _fail(self, exc: BaseException) -> None:
        self._disarm()
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Resp:
    """``set_nx``: pipelined ``SET name 1 NX EX ttl`` on one lazily opened connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.host, self.port, self.db, self.tls = host, port, db, tls
        self._auth = (
            None
            if password is None
            else _command(b"AUTH", *([username.encode()] if username else []), password.encode())
        )
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._out: list[bytes] = []
        self._futures: list[asyncio.Future[bytes | None]] = []
        self._flush_scheduled = False

    @classmethod
    def for_url(cls, url: str, timeout: float = DEFAULT_TIMEOUT) -> Resp | None:
        """A client for ``url``, or None where redis-py should keep it (another scheme, a
        unix socket, query options)."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or parts.query or not parts.hostname:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        try:
            port = parts.port or 6379
        except ValueError:
            return None
        return cls(
            parts.hostname,
            port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
            timeout=timeout,
        )

    async def set_nx(self, name: bytes, ttl: int) -> bool:
        """``SET name 1 NX EX ttl``: True if this call created the key."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        self._out.append(
            b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nEX\r\n$%d\r\n%d\r\n"
            % (len(name), name, len(str(ttl)), ttl)
        )
        self._futures.append(fut)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # what else this loop pass sends joins the write
        return await fut == b"OK"

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, futures = b"".join(self._out), self._futures
        self._out, self._futures = [], []
        conn = self._conn
        try:
            if conn is None:
                raise RespError("connection to Redis closed")
            conn.send(out, futures)
        except RespError as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)

    async def _connect(self) -> _Connection:
        """The one connection, opened (AUTH, SELECT) by whichever caller needs it first."""
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            conn = await self._open(loop)
        except BaseException as exc:
            self._connecting.set_exception(
                exc if isinstance(exc, Exception) else RespError("cancelled")
            )
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            self._conn = conn
            self._connecting.set_result(conn)
            return conn
        finally:
            self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        tls = ssl.create_default_context() if self.tls else None
        try:
            async with asyncio.timeout(self.timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.timeout),
                    self.host,
                    self.port,
                    ssl=tls,
                    server_hostname=self.host if tls else None,
                )
                setup = [c for c in (self._auth,) if c is not None]
                if self.db:
                    setup.append(_command(b"SELECT", str(self.db).encode()))
                if setup:
                    futures = [loop.create_future() for _ in setup]
                    conn.send(b"".join(setup), futures)
                    try:
                        await asyncio.gather(*futures)
                    except BaseException:
                        conn.close()
                        raise
        except TimeoutError:
            raise RespError("connecting to Redis timed out") from None
        except OSError as exc:
            raise RespError(f"Redis unreachable: {type(exc).__name__}") from None
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
