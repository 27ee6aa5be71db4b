"""The relay's HTTP/1.1 server: one asyncio protocol per client connection, no framework.

Why not aiohttp: under load the relay spent most of its CPU in aiohttp's server (a request
object, a header multidict, a URL, a task and a response object per request, a write for
the head and another for the body) for a job that is two routes and an allow-list.
This server parses the request head with one regular expression, answers everything but
the relayed exchanges without a task, writes each answer's head together with its body
(or first chunk) in one ``send``, keeps no per-chunk metrics and allocates little per
request. It is the default; ``--http-server aiohttp`` keeps the old one (relay/app.py).
Both share relay/core.py and pass the same contract suite (tests/test_relay.py).

Strict where leniency is a smuggling risk: a head that is not plainly ``method SP target
SP HTTP/1.x`` and ``token: value`` fields ending in CRLF (no obs-fold, no bare CR or LF,
no control bytes, no space before the colon) is 400; so are a ``Content-Length`` that is
not digits, two that differ, ``Transfer-Encoding`` other than ``chunked``, both framings
at once, and malformed chunks. A head over 16 KiB or 100 fields is 431.

The connection hygiene is the service kit's (openpcc/service/serve.py), with the same
flags: a head must arrive within ``--head-timeout``, an idle connection closes after
``--keepalive-timeout``, a body must keep ``--body-min-rate`` after ``--body-grace`` and
end within ``--body-timeout`` (408), at most ``--max-per-client`` connections per address.
One timer per connection, re-armed only when it fires early, enforces them all.

Privacy: no client address, header or body is logged (the access log, when on, has
method, route, status, bytes, seconds); asyncio's exception handler is replaced by one
that logs exception types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from openpcc.service.http1 import chunk_size, field_values
from openpcc.service.limits import ConnectionLimits, ServeSettings
from relay.config import Gateway, RelayConfig
from relay.core import (
    INCREMENTAL,
    NO_UPLOAD,
    OHTTP_REQUEST_TYPES,
    PREFLIGHT_HEADERS,
    RESPONSE_HEADERS,
    SERVER,
    CachedKeys,
    RelayCore,
    Upload,
    UploadError,
    classify,
    failure_status,
    log,
    problem_body,
)
from relay.upstream import Connection

MAX_HEAD = 16 * 1024  # request line and fields (nginx: 1 KiB, then up to 4 x 8 KiB)
MAX_FIELDS = 100
MAX_LINE = 4096  # a chunk-size or trailer line
MAX_TRAILERS = 16 * 1024
HIGH_WATER = 256 * 1024  # request body bytes buffered before the client is no longer read
MAX_PIPELINED = 64 * 1024  # bytes of later requests buffered while one is answered
LINGER = 5.0  # seconds unread body bytes are drained after an answer that ends the connection
BODY_CHECK = 1.0  # how often a body still arriving is checked against the rate rules
BACKLOG = 1024

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# The request line, then fields named by tokens right before the colon; values without
# control bytes other than HTAB; lines end in CRLF only.
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])"
    rb"((?:\r\n" + _TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*)*)"
)
_OHTTP_TYPES = {k.encode(): v for k, v in OHTTP_REQUEST_TYPES.items()}
_METHODS = {b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"}
_PROBLEM = b"Content-Type: application/problem+json\r\n"
_JSON_OK = (b"Content-Type: application/json; charset=utf-8\r\n", b'{"status": "ok"}')
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PREFLIGHT = b"".join(
    b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in PREFLIGHT_HEADERS.items()
)
_NO_BODY_STATUSES = frozenset({204, 304})

# Where the request body stands (``_Conn._body``); _BROKEN: malformed or abandoned, and
# whatever still comes is dropped until the connection closes.
_DONE, _LENGTH, _SIZE, _DATA, _DATA_END, _TRAILERS, _BROKEN = 0, 1, 2, 3, 4, 5, 6
# Routes.
_OHTTP, _KEYS, _HEALTH, _METRICS = 0, 1, 2, 3

_status_lines: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
        line = _status_lines[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())
    return line


_date = [0, b""]


def _server_date() -> bytes:
    """``Server`` and ``Date`` lines, the date formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _date[0], _date[1] = now, b"Server: %s\r\nDate: %s\r\n" % (SERVER.encode(), stamp.encode())
    return _date[1]  # type: ignore[return-value]


def _header_lines(headers: dict[str, str]) -> bytes:
    # Values came from the gateway's head, checked there (no CR, LF or NUL): same bytes out.
    return b"".join(
        b"%s: %s\r\n" % (k.encode(), v.encode("utf-8", "surrogateescape"))
        for k, v in headers.items()
    )


def _first(fields: bytes, low: bytes, key: bytes) -> bytes | None:
    """The first value of the field ``key`` (b"\\r\\nname:") finds in ``low``, else None."""
    at = low.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = low.find(b"\r\n", start)
    return fields[start : end if end >= 0 else len(fields)].strip(b" \t")


class BodyTooSlowError(TimeoutError):
    """The request body missed its total deadline, its minimum rate or the client timeout."""


class _Malformed(ValueError):
    """The request body broke its chunked framing."""


class _Route:
    __slots__ = ("allow", "cors", "gateway", "kind", "method", "name", "preflight")

    def __init__(
        self,
        kind: int,
        method: bytes,
        name: str,
        gateway: Gateway | None = None,
        cors: bool = False,
        preflight: bool = False,
    ) -> None:
        self.kind, self.method, self.name, self.gateway = kind, method, name, gateway
        self.cors, self.preflight = cors, preflight
        allowed = method + (b", OPTIONS" if preflight else b"")
        self.allow = b"Allow: %s\r\n" % allowed


def build_routes(config: RelayConfig, metrics: bool = True) -> dict[bytes, _Route]:
    """Static routes only, one POST and one GET per gateway: never derived from a request."""
    cors = bool(config.allow_origins)
    routes: dict[bytes, _Route] = {}
    for g in config.gateways:
        routes[g.post_path.encode()] = _Route(_OHTTP, b"POST", g.post_path, g, cors, cors)
        routes[g.keys_path.encode()] = _Route(_KEYS, b"GET", g.keys_path, g, cors)
    routes[b"/healthz"] = _Route(_HEALTH, b"GET", "/healthz")
    routes[b"/readyz"] = _Route(_HEALTH, b"GET", "/readyz")
    if metrics:
        routes[b"/metrics"] = _Route(_METRICS, b"GET", "/metrics")
    return routes


class _Audit:
    """``--audit-log`` (tests and demo only): each request as openpcc/audit.py writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(
        self, peer: str | None, method: bytes, target: bytes, fields: bytes, body: bytes
    ) -> None:
        headers = []
        for line in fields.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers.append(
                [name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape")]
            )
        line = {
            "party": "relay",
            "time": time.time(),
            "peer": peer,
            "method": method.decode("latin-1"),
            "path": target.decode("latin-1"),
            "headers": headers,
            "body_hex": body.hex(),
            "notes": {},
        }
        with self._lock, self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


class Listener:
    """What every connection of one listening socket shares."""

    def __init__(
        self,
        core: RelayCore,
        routes: dict[bytes, _Route],
        limits: ConnectionLimits,
        access_log: logging.Logger | None = None,
        audit: _Audit | None = None,
    ) -> None:
        config = core.config
        self.core = core
        self.routes = routes
        self.limits = limits
        self.access_log = access_log
        self.audit = audit
        self.max_body = config.max_body
        self.client_timeout = config.client_timeout
        self.origins = frozenset(config.allow_origins)
        self.any_origin = config.allow_origins == ("*",)
        self.need_peer = bool(limits.max_per_client) or core.limiter.rate > 0 or audit is not None
        self.per_client: Counter[str] = Counter()
        self.connections: set[_Conn] = set()
        self.closing = False
        self.closed = asyncio.Event()
        self.closed.set()

    def protocol(self) -> _Conn:
        return _Conn(self)

    def shutdown(self) -> None:
        """Stop reusing connections; close those between requests now."""
        self.closing = True
        for conn in list(self.connections):
            if not conn._busy:
                conn._close()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn._abort()


class _Conn(asyncio.Protocol):
    """One client connection and the request on it (HTTP/1.1: one at a time)."""

    __slots__ = (
        "_audit_body", "_body", "_body_exc", "_body_start", "_body_waiter", "_buf", "_busy",
        "_chunks", "_closed", "_cors", "_drain", "_head_pending", "_head_start", "_http11",
        "_idle_since", "_in_process", "_keep_alive", "_last_byte", "_lingering", "_listener",
        "_loop", "_partial", "_paused", "_peer", "_queued", "_received", "_remaining", "_req",
        "_stream_chunked", "_stream_head", "_stream_sent", "_stream_status", "_t0", "_t_trace",
        "_task", "_timer", "_timer_at", "_trailer_bytes", "_upstream", "_write_paused",
        "transport",
    )  # fmt: skip

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._buf = b""
        self._busy = False
        self._closed = False
        self._lingering = False
        self._in_process = False
        self._keep_alive = True
        self._http11 = True
        self._head_pending = True
        self._head_start = 0.0
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._upstream: Connection | None = None  # the fast path's exchange, until answered
        self._t_trace = 0.0
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # the current request
        self._req: tuple[bytes, bytes, bytes, _Route | None] | None = None
        self._cors = b""
        self._t0 = 0.0
        self._body = _DONE
        self._remaining = 0
        self._chunks: list[bytes] = []
        self._queued = 0
        self._received = 0
        self._trailer_bytes = 0
        self._body_exc: BaseException | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_start = 0.0
        self._last_byte = 0.0
        self._audit_body: bytearray | None = None
        self._partial = b""
        self._stream_head = b""
        self._stream_chunked = False
        self._stream_status = 0
        self._stream_sent = 0

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        lst = self._listener
        if lst.need_peer:
            peer = transport.get_extra_info("peername")
            self._peer = peer[0] if isinstance(peer, tuple) and peer else None
            cap = lst.limits.max_per_client
            if cap and self._peer is not None:
                if lst.per_client[self._peer] >= cap:
                    self._peer = None  # not counted: this connection never held a slot
                    self._closed = True
                    transport.close()
                    return
                lst.per_client[self._peer] += 1
        lst.connections.add(self)
        lst.closed.clear()
        if lst.closing:
            self._close()
            return
        self._head_start = self._loop.time()
        self._arm(self._head_start + lst.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        lst = self._listener
        if self._closed and self not in lst.connections:
            return  # refused at the cap
        self._closed = True
        lst.connections.discard(self)
        if not lst.connections:
            lst.closed.set()
        if self._peer is not None and lst.limits.max_per_client:
            counts = lst.per_client
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
        self._cancel_timer()
        if self._body != _DONE and self._body_exc is None:
            self._body_exc = ConnectionResetError("the client closed the connection")
            self._wake_body()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
        if self._task is not None:
            self._task.cancel()  # a client that leaves cancels the upstream request
        up = self._upstream
        if up is not None:  # the same on the fast path: no task, so close it here
            self._upstream = None
            up.on_event = None
            client = lst.core.client
            if client is not None:
                client.release(up)  # (closes it: the exchange is not over)
            self._account("client_aborted")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def eof_received(self) -> bool:
        # The client's FIN: gone, as nginx and aiohttp take it (a half-closed HTTP/1.1
        # client is rare; an abandoned request must not keep its gateway exchange).
        return False  # close: connection_lost cancels what is in flight

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._closed:
            return  # draining what the client still sends after our final answer
        if self._body != _DONE:
            data = self._feed(data)
            if not data:
                return
        if self._busy:
            self._buf += data  # the next request, pipelined: read once this one is answered
            if len(self._buf) > MAX_PIPELINED and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            return
        self._buf = self._buf + data if self._buf else data
        self._process()

    # -- request heads ---------------------------------------------------------------
    def _process(self) -> None:
        self._in_process = True
        try:
            while not self._busy and not self._closed and self._buf:
                buf = self._buf
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if len(buf) > MAX_HEAD + 3:
                        self._reject_head(431)
                        return
                    if b"\n\n" in buf:  # a head ended by bare LFs: refused, not waited on
                        self._reject_head(400)
                        return
                    if not self._head_pending:
                        self._head_pending = True  # a head has started: it has head_timeout
                        self._head_start = self._loop.time()
                        self._arm(self._head_start + self._listener.limits.head_timeout)
                    return
                self._buf = buf[end + 4 :]
                self._head_pending = False
                self._request(buf[:end] if end else b"")
        finally:
            self._in_process = False

    def _reject_head(self, status: int) -> None:
        self._buf = b""
        self._busy = True
        self._keep_alive = False
        self._body = _BROKEN  # whatever follows cannot be framed: drop it, then close
        self._req = (b"", b"", b"", None)  # (no method: nothing to audit)
        self._cors = b""
        self._answer(status, _PROBLEM, problem_body(status))

    def _request(self, head: bytes) -> None:
        if head.startswith(b"\r\n"):  # RFC 9112 2.2: an empty line before the request line
            head = head.lstrip(b"\r\n")
        m = _REQUEST_HEAD.fullmatch(head)
        if m is None:
            self._reject_head(400)
            return
        method, target, minor, fields = m.groups()
        if fields.count(b"\r\n") > MAX_FIELDS:
            self._reject_head(431)
            return
        low = fields.lower()
        lst = self._listener
        self._busy = True
        self._t0 = self._loop.time() if lst.access_log is not None else 0.0
        conn = _first(fields, low, b"\r\nconnection:")
        self._http11 = minor == b"1"
        self._keep_alive = self._http11 and (conn is None or b"close" not in conn.lower())

        # Framing of the request body.
        chunked = False
        length = 0
        te = _first(fields, low, b"\r\ntransfer-encoding:")
        cl = _first(fields, low, b"\r\ncontent-length:")
        if te is not None:
            codings = field_values(fields, low, b"\r\ntransfer-encoding:")
            if cl is not None or minor != b"1" or [c.lower() for c in codings] != [b"chunked"]:
                self._bad_framing()
                return
            chunked = True
        elif cl is not None:
            again = low.count(b"\r\ncontent-length:") > 1  # (rare: then all must agree)
            values = field_values(fields, low, b"\r\ncontent-length:") if again else (cl,)
            if not cl.isdigit() or len(cl) > 18 or any(v != cl for v in values):
                self._bad_framing()
                return
            length = int(cl)

        # Where it goes: the path only (query ignored), matched against static routes.
        if target[0] == 47:  # b"/"
            path = target.partition(b"?")[0]
        elif target.startswith((b"http://", b"https://")):  # absolute form: the path in it
            rest = target[target.index(b"//") + 2 :]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            path = rest[cut:].partition(b"?")[0] if cut >= 0 else b"/"
            path = path or b"/"
        else:
            path = b""  # CONNECT's authority form, OPTIONS *: no route
        if b"%" in path:
            path = unquote_to_bytes(path)
        route = lst.routes.get(path)
        self._req = (method, target, fields, route)
        if lst.audit is not None:
            self._audit_body = bytearray()
        self._cors = b""
        if route is not None and route.cors:
            self._cors = self._cors_lines(fields, low)

        # The body: often whole in this segment (one slice); else read as it comes.
        body: bytes | None = b""
        if chunked:
            self._body = _SIZE
            self._trailer_bytes = self._received = 0
            self._chunks, self._queued, self._partial = [], 0, b""
            rest, self._buf = self._buf, b""
            if rest:
                self._buf = self._feed(rest)
            body = None
            if self._body == _DONE:
                body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
                self._chunks, self._queued = [], 0
        elif length:
            buf = self._buf
            if len(buf) >= length:
                body, self._buf = buf[:length], buf[length:]
            else:
                self._body, self._remaining = _LENGTH, length - len(buf)
                self._chunks, self._queued = ([buf], len(buf)) if buf else ([], 0)
                self._received = len(buf)
                self._buf = b""
                body = None
        if body is None and self._body != _DONE:
            self._watch_body()

        if route is None:
            self._problem(404)
        elif method == route.method:
            kind = route.kind
            if kind == _OHTTP:
                self._ohttp(route, fields, low, body, None if chunked else length)
            elif kind == _KEYS:
                self._keys(route)
            elif kind == _HEALTH:
                self._answer(200, *_JSON_OK)
            else:
                text = lst.core.metrics.render().encode()
                self._answer(200, b"Content-Type: text/plain; charset=utf-8\r\n", text)
        elif method == b"OPTIONS" and route.preflight:
            # Answered here, never forwarded: the gateway sees no preflight and no Origin.
            self._answer(204, _PREFLIGHT, b"")
        else:
            self._problem(405, route.allow)

    def _bad_framing(self) -> None:
        self._keep_alive = False
        self._body = _BROKEN
        self._req = (b"", b"", b"", None)  # (no method: nothing to audit)
        self._cors = b""
        self._problem(400)

    def _cors_lines(self, fields: bytes, low: bytes) -> bytes:
        """Access-Control-Allow-Origin on every answer of the gateway routes, errors too."""
        lst = self._listener
        if lst.any_origin:
            return b"Access-Control-Allow-Origin: *\r\n"
        origin = _first(fields, low, b"\r\norigin:")
        # The answer depends on Origin: caches must key on it.
        if origin is not None and origin.decode("latin-1") in lst.origins:
            return b"Vary: Origin\r\nAccess-Control-Allow-Origin: %s\r\n" % origin
        return b"Vary: Origin\r\n"

    # -- the routes that need the gateway ---------------------------------------------
    def _ohttp(
        self, route: _Route, fields: bytes, low: bytes, body: bytes | None, length: int | None
    ) -> None:
        lst = self._listener
        core = lst.core
        if length is not None and length > lst.max_body:
            core.metrics.count("ohttp", "too_large")
            self._problem(413)
            return
        ctype = _first(fields, low, b"\r\ncontent-type:")
        line = None
        if ctype is not None:  # the media type, lower-cased, parameters dropped
            line = _OHTTP_TYPES.get(ctype.split(b";", 1)[0].strip(b" \t").lower())
        if line is None:
            core.metrics.count("ohttp", "unsupported_type")
            self._problem(415)
            return
        refused = core.admit(self._peer, "ohttp")
        if refused is not None:
            self._refuse(*refused)
            return
        trace = core.trace.enabled
        t0 = time.perf_counter() if trace else 0.0
        # The whole allow-list: canonical values only, so no client byte rides in a header
        # (Host and the framing, Content-Length or chunked, are the upstream client's).
        headers = line
        incremental = _first(fields, low, b"\r\nincremental:")
        if incremental == b"?1":
            headers += INCREMENTAL
        self._stream_status = self._stream_sent = 0
        self._t_trace = t0
        upload = NO_UPLOAD
        data: bytes | AsyncIterator[bytes]
        gateway = route.gateway
        assert gateway is not None
        core.metrics.in_flight += 1
        if body is not None:
            data = body
            core.metrics.bytes_in += len(body)
            if self._audit_body is not None:
                self._audit_body += body
            if trace:  # (before the send: a write that wakes the gateway may yield the CPU)
                core.trace.record("upstream_sent", time.perf_counter() - t0)
            # The fast path: an idle pooled connection, one write, no task; the answer is
            # written from the gateway connection's data_received (_on_upstream).
            client = core.client
            assert client is not None
            up = client.send(
                core.endpoints[gateway.url], b"POST", headers, body, RESPONSE_HEADERS,
                self._on_upstream,
            )  # fmt: skip
            if up is not None:
                self._upstream = up
                return
        else:
            upload = Upload()
            data = self._pump(upload)
            expect = _first(fields, low, b"\r\nexpect:")
            if expect is not None and expect.lower() == b"100-continue" and self.transport:
                self.transport.write(_CONTINUE)
            if trace:  # (the task's start is the hop's: queueing, not request-side work)
                core.trace.record("upstream_sent", time.perf_counter() - t0)
        self._task = self._loop.create_task(self._forward(gateway, headers, data, length, upload))

    def _on_upstream(self, up: Connection) -> None:
        """The fast path's answer: the gateway's head is in (with its body, mostly)."""
        self._upstream = None
        core = self._listener.core
        client = core.client
        assert client is not None
        exc = up.error
        if exc is None and not up.complete:
            # A streamed or longer answer: follow it from a task, as the slow path does.
            self._task = self._loop.create_task(self._stream(up))
            return
        metrics = core.metrics
        metrics.in_flight -= 1
        if exc is not None:
            client.release(up)  # (closes it)
            metrics.count("ohttp", classify(exc, NO_UPLOAD))
            self._problem(failure_status(exc, NO_UPLOAD))
            return
        body = up.read_nowait()
        status, lines = up.status, up.head_lines
        client.release(up)  # first: answering may start the client's next request
        metrics.bytes_out += len(body)
        metrics.count("ohttp", "ok")
        # (No upstream_wait/first_out here: like the other parties, those are recorded for
        # streamed answers only, so the benchmark's hop arithmetic pairs like with like.)
        self._answer(status, lines, body)

    async def _pump(self, upload: Upload) -> AsyncIterator[bytes]:
        """Client body -> gateway, one read at a time: the upstream write paces our reads."""
        lst = self._listener
        total = 0
        while True:
            try:
                chunk = await self._read_body()
            except TimeoutError:
                upload.timed_out = True
                raise UploadError("client body too slow") from None
            except _Malformed:
                upload.malformed = True
                raise UploadError("malformed request body") from None
            if not chunk:
                return
            total += len(chunk)
            if total > lst.max_body:
                upload.too_large = True
                raise UploadError("body too large")
            lst.core.metrics.bytes_in += len(chunk)
            if self._audit_body is not None:
                self._audit_body += chunk
            yield chunk

    async def _forward(
        self,
        gateway: Gateway,
        headers: bytes,
        data: bytes | AsyncIterator[bytes],
        length: int | None,
        upload: Upload,
    ) -> None:
        """The slow path: a new gateway connection, or a body still arriving."""
        core = self._listener.core
        client = core.client
        assert client is not None
        outcome = "ok"
        try:
            ep = core.endpoints[gateway.url]
            async with client.request(ep, b"POST", headers, data, length, RESPONSE_HEADERS) as up:
                await self._relay_answer(up)
        except (asyncio.CancelledError, Exception) as exc:
            outcome = self._failed(exc, upload)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._account(outcome)

    async def _stream(self, up: Connection) -> None:
        """The fast path's answer when it is streamed: the rest as the slow path does it."""
        client = self._listener.core.client
        assert client is not None
        outcome = "ok"
        try:
            try:
                await self._relay_answer(up)
            finally:
                client.release(up)
        except (asyncio.CancelledError, Exception) as exc:
            outcome = self._failed(exc, NO_UPLOAD)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._account(outcome)

    async def _relay_answer(self, up: Connection) -> None:
        """Gateway answer -> client: one write when it is complete; else the head with the
        first chunk, each chunk as it comes, the last with the end of the chunked body."""
        if up.complete:
            body = up.read_nowait()
            self._stream_sent = len(body)
            self._answer(up.status, up.head_lines, body)
            return
        self._start_stream(up.status, up.head_lines, up.length)
        trace = self._listener.core.trace
        traced = trace.enabled
        t0 = self._t_trace
        first = True
        while True:
            chunk = await up.read()
            last = up.complete  # nothing more will come: end with this write
            if not traced:
                self._send(chunk, last)
            else:
                t, c = time.perf_counter(), time.thread_time()
                self._send(chunk, last)
                if first:
                    trace.record("upstream_wait", t - t0)
                    trace.record("first_out", time.perf_counter() - t0)
                else:
                    wall, cpu = time.perf_counter() - t, time.thread_time() - c
                    trace.record("chunk", wall)  # both read before either line is written
                    trace.record("chunk_cpu", cpu)
            first = False
            if last:
                return
            if self._write_paused:
                await self._drained()

    def _failed(self, exc: BaseException, upload: Upload) -> str:
        """Tell the client what it can still be told; the outcome for the metrics."""
        if isinstance(exc, asyncio.CancelledError) or self._closed:
            return "client_aborted"  # nobody left to tell; leaving closed the gateway side
        # Whatever failed upstream, the client learns a status, never the cause.
        outcome = classify(exc, upload)
        if self._stream_status and not self._stream_head:
            self._abort()  # the head is out: the only honest signal left is a cut
        else:
            self._problem(failure_status(exc, upload))
        return outcome

    def _account(self, outcome: str) -> None:
        metrics = self._listener.core.metrics
        metrics.in_flight -= 1
        metrics.bytes_out += self._stream_sent
        metrics.count("ohttp", outcome)

    def _keys(self, route: _Route) -> None:
        core = self._listener.core
        refused = core.admit(self._peer, "keys")
        if refused is not None:
            self._refuse(*refused)
            return
        gateway = route.gateway
        assert gateway is not None
        entry = core.cached_keys(gateway)
        if entry is not None:
            self._serve_keys(entry)
            return
        self._task = self._loop.create_task(self._fetch_keys(gateway))

    async def _fetch_keys(self, gateway: Gateway) -> None:
        try:
            got: CachedKeys | int = await self._listener.core.keys(gateway)
        except Exception as exc:  # a bug: still a generic problem, never a traceback
            log.error("handler failed: %s", type(exc).__name__)
            got = 500
        if self._closed:
            return
        if isinstance(got, int):
            self._problem(got)
        else:
            self._serve_keys(got)

    def _serve_keys(self, entry: CachedKeys) -> None:
        self._answer(entry.status, _header_lines(entry.response_headers()), entry.body)

    # -- request bodies --------------------------------------------------------------
    def _feed(self, data: bytes) -> bytes:
        """Take the current body's bytes from ``data``; return what follows it."""
        if self._body == _BROKEN:
            return b""
        if self._partial:
            data, self._partial = self._partial + data, b""
        try:
            data = self._parse_body(data)
        except _Malformed as exc:
            self._body_exc = exc
            self._body = _BROKEN
            self._keep_alive = False
            data = b""
        self._wake_body()
        if self._queued > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # back-pressure: the gateway takes the body slower than it comes
            self.transport.pause_reading()
        return data

    def _parse_body(self, buf: bytes) -> bytes:
        now = 0.0
        while buf:
            state = self._body
            if state in (_LENGTH, _DATA):
                take = buf[: self._remaining]
                buf = buf[len(take) :]
                self._remaining -= len(take)
                self._chunks.append(take)
                self._queued += len(take)
                self._received += len(take)
                if not now:
                    now = self._loop.time()
                    self._last_byte = now
                if self._remaining == 0:
                    self._body = _DONE if state == _LENGTH else _DATA_END
            elif state in (_SIZE, _TRAILERS):
                end = buf.find(b"\r\n", 0, MAX_LINE + 2)
                if end < 0:
                    if len(buf) >= MAX_LINE + 2 or b"\n" in buf:
                        raise _Malformed("chunk line too long or bare LF")
                    self._partial = buf  # the rest of the line comes with the next segment
                    return b""
                line, buf = buf[:end], buf[end + 2 :]
                if b"\n" in line or b"\r" in line or b"\0" in line:
                    raise _Malformed("stray CR, LF or NUL in a chunk or trailer line")
                if state == _TRAILERS:
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > MAX_TRAILERS:
                        raise _Malformed("trailers too large")
                    if not line:
                        self._body = _DONE
                    continue  # trailer fields are dropped, like every other header
                size = chunk_size(line)
                if size is None:
                    raise _Malformed("bad chunk size")
                self._remaining = size
                self._body = _DATA if self._remaining else _TRAILERS
            elif state == _DATA_END:
                if len(buf) < 2:
                    self._partial = buf
                    return b""
                if buf[:2] != b"\r\n":
                    raise _Malformed("chunk not followed by CRLF")
                buf = buf[2:]
                self._body = _SIZE
            else:  # _DONE: the rest is the next request
                return buf
        return buf

    async def _read_body(self) -> bytes:
        while not self._chunks:
            if self._body_exc is not None:
                raise self._body_exc
            if self._body == _DONE:
                return b""
            waiter = self._body_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._body_waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks, self._queued = [], 0
        if self._paused and self._body != _DONE and self.transport is not None:
            self._paused = False  # (paused for the body; a pipelined pause ends in _finish)
            self.transport.resume_reading()
        return data

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _watch_body(self) -> None:
        self._body_start = self._last_byte = self._loop.time()
        self._arm(self._body_start + BODY_CHECK)

    def _check_body(self, now: float) -> None:
        lst = self._listener
        limits = lst.limits
        elapsed = now - self._body_start
        if elapsed >= limits.body_timeout:
            why = f"request body not complete after {limits.body_timeout:g} s"
        elif elapsed >= limits.body_grace and self._received < limits.body_min_rate * elapsed:
            why = f"request body slower than {limits.body_min_rate:g} bytes/s"
        elif now - self._last_byte >= lst.client_timeout:
            why = "client silent while sending its body"
        else:
            self._arm(now + BODY_CHECK)
            return
        self._body_exc = BodyTooSlowError(why)
        self._body = _BROKEN
        self._keep_alive = False
        self._wake_body()

    # -- answers ---------------------------------------------------------------------
    def _head(self, status: int, lines: bytes, framing: bytes) -> bytes:
        close = not self._keep_alive or self._body != _DONE or self._listener.closing
        if close:
            self._keep_alive = False
        return b"%s%s%s%s%s%s\r\n" % (
            _status_line(status),
            _server_date(),
            lines,
            self._cors,
            framing,
            b"Connection: close\r\n" if close else b"",
        )

    def _answer(self, status: int, lines: bytes, body: bytes) -> None:
        """A whole answer, head and body in one write; then the request is over."""
        if self._closed or self.transport is None:
            return
        req = self._req
        if status in _NO_BODY_STATUSES:
            head = self._head(status, lines, b"")
            body = b""
        else:
            head = self._head(status, lines, b"Content-Length: %d\r\n" % len(body))
            if req is not None and req[0] == b"HEAD":
                body = b""
        self.transport.write(head + body if body else head)
        self._finish(status, len(body))

    def _problem(self, status: int, lines: bytes = b"") -> None:
        self._answer(status, _PROBLEM + lines, problem_body(status))

    def _refuse(self, status: int, headers: dict[str, str]) -> None:
        self._problem(status, _header_lines(headers))

    def _start_stream(self, status: int, lines: bytes, length: int | None) -> None:
        """The head of a streamed answer, written with its first chunk (``_send``)."""
        self._stream_status, self._stream_sent = status, 0
        if length is not None:
            framing = b"Content-Length: %d\r\n" % length
            self._stream_chunked = False
        elif self._http11:
            framing = b"Transfer-Encoding: chunked\r\n"
            self._stream_chunked = True
        else:  # an HTTP/1.0 client: the body until the close
            framing = b""
            self._stream_chunked = False
            self._keep_alive = False
        self._stream_head = self._head(status, lines, framing)

    def _send(self, chunk: bytes, last: bool) -> None:
        if self._closed or self.transport is None:
            return
        out = self._stream_head
        if out:
            self._stream_head = b""
        if self._stream_chunked:
            if chunk:
                out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
            if last:
                out += b"0\r\n\r\n"
        else:
            out += chunk
        if out:
            self.transport.write(out)
        self._stream_sent += len(chunk)
        if last:
            self._finish(self._stream_status, self._stream_sent)

    async def _drained(self) -> None:
        if self._closed:
            raise ConnectionResetError("the client closed the connection")
        if self._write_paused:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _finish(self, status: int, size: int) -> None:
        """The answer is written: log it, then keep the connection, linger or close."""
        self._busy = False
        self._task = None
        lst = self._listener
        req = self._req
        self._req = None
        if req is not None:
            method, target, fields, route = req
            if lst.access_log is not None:
                name = method.decode("latin-1") if method in _METHODS else "OTHER"
                path = route.name if route is not None else "-"
                took = self._loop.time() - self._t0
                lst.access_log.info("%s %s %d %d %.3f", name, path, status, max(size, 0), took)
            if lst.audit is not None and method:
                body = bytes(self._audit_body or b"")
                with contextlib.suppress(OSError):
                    lst.audit.write(self._peer, method, target, fields, body)
            self._audit_body = None
        if self._body != _DONE:
            self._linger()  # body bytes still coming: read them off, then close
            return
        if not self._keep_alive or lst.closing:
            if self._buf:
                self._linger()  # pipelined requests we will not answer
            else:
                self._close()
            return
        self._idle_since = self._loop.time()
        self._arm(self._idle_since + lst.limits.keepalive_timeout)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._buf and not self._in_process:
            self._process()

    # -- closing ---------------------------------------------------------------------
    def _close(self) -> None:
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self._closed = True
            self.transport.abort()

    def _linger(self) -> None:
        """After a final answer while the client still sends: stop sending (FIN), read and
        drop what comes for up to LINGER seconds, so the answer is not lost to a reset."""
        transport = self.transport
        if self._closed or transport is None:
            return
        self._lingering = True
        self._body = _BROKEN
        self._chunks, self._queued, self._buf = [], 0, b""
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._cancel_timer()
        self._arm(self._loop.time() + LINGER)

    # -- the one timer ---------------------------------------------------------------
    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # fires first; it re-arms for the later deadline then
            timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        if self._lingering:
            self._close()
            return
        if self._body != _DONE:
            self._check_body(now)
            return
        if self._busy:
            return  # answering: the upstream's timeouts apply; re-armed when idle again
        limits = self._listener.limits
        if self._head_pending:
            deadline = self._head_start + limits.head_timeout
        else:
            deadline = self._idle_since + limits.keepalive_timeout
        if now >= deadline:
            self._close()
        else:
            self._arm(deadline)


# ------------------------------------------------------------------ the serve loop


def event_loop_is_uvloop(wanted: bool) -> bool:
    """uvloop when asked for (the default) and installed, unless
    ``OPENPCC_EVENT_LOOP=asyncio`` (the service kit's switch) says otherwise."""
    if not wanted or os.environ.get("OPENPCC_EVENT_LOOP", "").strip().lower() == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _write_port_file(path: Path, ports: dict[str, int]) -> None:
    """Atomically (write, then rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ports) + "\n")
    os.replace(tmp, path)


def _quiet_exceptions(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler prints the context (a protocol's repr, a traceback with
    request data in its frames): log the exception's type only."""
    exc = context.get("exception")
    what = type(exc).__name__ if exc is not None else "-"
    log.error("event loop: %s (%s)", context.get("message", "error"), what)


def serve(
    config: RelayConfig,
    settings: ServeSettings,
    *,
    use_uvloop: bool,
    access_log: logging.Logger | None,
    on_bound: Callable[[dict[str, int]], None] | None = None,
) -> int:
    """Run the relay until SIGINT/SIGTERM; then stop accepting, let answers in flight
    finish for ``config.shutdown_timeout`` seconds, cut the rest, exit 0."""
    main = _serve(config, settings, access_log, on_bound)
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
    return 0


async def _serve(
    config: RelayConfig,
    settings: ServeSettings,
    access_log: logging.Logger | None,
    on_bound: Callable[[dict[str, int]], None] | None,
) -> None:
    from openpcc.lifecycle import watch_parent  # (the relay imports the rest of openpcc late)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_exceptions)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    def orphaned() -> None:
        log.warning("the process that started us is gone; stopping")
        stop.set()

    watch_parent(loop, orphaned)  # started by `openpcc up` (a Lifeline): go down with it
    core = RelayCore(config)
    await core.start()
    limits, where = settings.limits, settings.metrics
    audit = _Audit(Path(config.audit_log)) if config.audit_log else None
    listeners: list[tuple[Listener, asyncio.AbstractServer]] = []
    try:
        plan = [("public", config.host, config.port, build_routes(config, not where.metrics_port))]
        if where.metrics_port:  # /metrics only there; the public listener answers 404
            metrics_only = {b"/metrics": _Route(_METRICS, b"GET", "/metrics")}
            plan.append(("metrics", where.metrics_host, where.metrics_port, metrics_only))
        ports: dict[str, int] = {}
        for name, host, port, routes in plan:
            public = name == "public"
            lst = Listener(core, routes, limits, access_log if public else None,
                           audit if public else None)  # fmt: skip
            server = await loop.create_server(
                lst.protocol, host, port, reuse_address=True, backlog=BACKLOG
            )
            listeners.append((lst, server))
            ports[name] = int(server.sockets[0].getsockname()[1])
        if on_bound is not None:
            on_bound(ports)
        if settings.report.port_file is not None:
            _write_port_file(settings.report.port_file, ports)
        await stop.wait()
    finally:
        # Drain: stop accepting, let in-flight answers finish (up to shutdown_timeout),
        # then cut what is left, and only then close the gateway connections.
        for lst, server in listeners:
            server.close()
            lst.shutdown()
        waits = [asyncio.ensure_future(lst.closed.wait()) for lst, _ in listeners]
        if waits:
            await asyncio.wait(waits, timeout=config.shutdown_timeout)
        for w in waits:
            w.cancel()
        for lst, _ in listeners:
            lst.abort_all()
        await asyncio.sleep(0)  # connection_lost runs: in-flight handlers are cancelled
        await core.stop()
