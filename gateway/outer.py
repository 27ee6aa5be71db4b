"""The gateway's outer layer: OHTTP or chunked OHTTP in, the inner Binary HTTP answer out.

One ``Exchange`` per request carries what the pieces share (when it started, the streamed
answer once begun, the audit view of the inner request) instead of keys on the aiohttp
request. ``OuterLayer`` reads the body (bounded in size and per-read time), opens it and
hands the inner request to the inner router with a sink: a buffered plain-OHTTP answer,
or a chunked stream that seals each piece as it comes.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.limits import MAX_INNER_REQUEST
from gateway.tally import Tally, key
from openpcc import audit
from openpcc.errors import OpenPCCError, UnsupportedError
from openpcc.service.http import PROBLEM_JSON, Metrics, problem
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp
from openpcc.wire.bhttp_stream import ResponseStreamEncoder
from openpcc.wire.chunked import (
    DEFAULT_MAX_CHUNK_SIZE,
    MEDIA_TYPE_CHUNKED_REQUEST,
    MEDIA_TYPE_CHUNKED_RESPONSE,
    ChunkedRequestReceiver,
    ChunkedResponseSender,
)
from openpcc.wire.ohttp import MEDIA_TYPE_REQUEST, MEDIA_TYPE_RESPONSE, decapsulate_request

# RFC 9458 §5.3 / §9.5: "key configuration not acceptable" problem type.
OHTTP_KEY_PROBLEM = "https://iana.org/assignments/http-problem-types#ohttp-key"
# Content of one response chunk; leaves room for BHTTP framing inside the OHTTP limit.
OUT_PIECE = DEFAULT_MAX_CHUNK_SIZE - 64
_OK = key("requests_total", route="ohttp", outcome="ok")
_RECEIVED = key("request_bytes_total")


@dataclass
class Exchange:
    """One public request, from its first byte to its last answer byte."""

    request: web.Request
    t0: float
    response: web.StreamResponse | None = None  # the chunked answer, once started
    note: dict[str, Any] | None = None  # what the audit log records (tests and demo only)


@dataclass(frozen=True)
class OuterLimits:
    max_body: int
    client_timeout: float
    max_plain_response: int


class Refusal(Exception):
    """An outer-layer refusal (before any encapsulation context exists)."""

    def __init__(self, response: web.Response, outcome: str) -> None:
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


def inner_problem(
    status: int, title: str, detail: str | None = None, extra_headers: list[bhttp.Field] = ()
) -> tuple[int, list[bhttp.Field], bytes]:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return (
        status,
        [(b"content-type", PROBLEM_JSON.encode()), *extra_headers],
        json.dumps(body).encode(),
    )


class Sink(ABC):
    """Where the inner response goes: a buffered plain OHTTP answer or a chunked stream."""

    @abstractmethod
    async def respond(self, status: int, headers: list[bhttp.Field], body: bytes) -> None: ...

    @abstractmethod
    async def start(self, status: int, headers: list[bhttp.Field]) -> None:
        """Begin the inner response; the caller writes or ends it right after."""

    @abstractmethod
    async def write(self, data: bytes, *, more: bool = False) -> None:
        """One piece of the inner body. ``more``: another piece (or the end) is already
        at hand and follows at once, so this one may go out together with it."""

    @abstractmethod
    async def end(self) -> None:
        """Close the inner message (normal end, or after a node died mid-stream)."""


class PlainSink(Sink):
    def __init__(self, limit: int) -> None:
        self.status = 500
        self.headers: list[bhttp.Field] = []
        self.body = bytearray()
        self.limit = limit

    async def respond(self, status: int, headers: list[bhttp.Field], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, bytearray(body)

    async def start(self, status: int, headers: list[bhttp.Field]) -> None:
        self.status, self.headers = status, headers

    async def write(self, data: bytes, *, more: bool = False) -> None:
        if len(self.body) + len(data) > self.limit:
            raise NodeStreamError("node response over the plain-OHTTP buffer limit")
        self.body += data

    async def end(self) -> None:
        pass

    def encode(self) -> bytes:
        return bhttp.encode_response(bhttp.Response(self.status, self.headers, bytes(self.body)))


class _ChunkedResponse(web.StreamResponse):
    # The status line and headers go out in the same write as the first body bytes
    # (which follow at once), not in a write of their own: same bytes, one syscall less.
    _send_headers_immediately = False


_CHUNKED_HEADERS = {"Content-Type": MEDIA_TYPE_CHUNKED_RESPONSE, "Incremental": "?1"}


class ChunkedSink(Sink):
    """Writes an indeterminate-length BHTTP response, one sealed OHTTP chunk per piece.

    Every sealed chunk goes out as soon as it exists; chunks that exist at the same
    moment (the head and the first piece, the last piece and the end) share one write.
    """

    def __init__(self, exchange: Exchange, sender: ChunkedResponseSender) -> None:
        self.exchange = exchange
        self.sender = sender
        self.encoder = ResponseStreamEncoder()
        self.response: web.StreamResponse | None = None
        self._pending: list[bytes] = []

    async def start(self, status: int, headers: list[bhttp.Field]) -> None:
        self.response = _ChunkedResponse(status=200, headers=_CHUNKED_HEADERS)
        self.exchange.response = self.response
        await self.response.prepare(self.exchange.request)
        # Goes out with the first piece or the end, which the caller sends right away.
        self._pending.append(self.sender.seal_chunk(self.encoder.head(status, headers)))

    async def write(self, data: bytes, *, more: bool = False) -> None:
        seal, encode, pending = self.sender.seal_chunk, self.encoder.data, self._pending
        for off in range(0, len(data), OUT_PIECE):
            pending.append(seal(encode(data[off : off + OUT_PIECE])))
        if not more:
            await self._flush()

    async def _flush(self) -> None:
        assert self.response is not None
        if self._pending:
            out = b"".join(self._pending)
            self._pending.clear()
            await self.response.write(out)

    async def end(self) -> None:
        assert self.response is not None
        self._pending.append(self.sender.seal_chunk(self.encoder.end(), final=True))
        out = b"".join(self._pending)
        self._pending.clear()
        await self.response.write_eof(out)

    async def respond(self, status: int, headers: list[bhttp.Field], body: bytes) -> None:
        await self.start(status, headers)
        await self.write(body, more=True)
        await self.end()


class NodeStreamError(Exception):
    pass


InnerRouter = Callable[[Exchange, bytes, "Sink"], Awaitable[None]]


class OuterLayer:
    """``POST /gateway``: the OHTTP layer around whatever ``inner`` does with a request."""

    def __init__(
        self,
        limits: OuterLimits,
        keys: Callable[[], Any],
        inner: InnerRouter,
        metrics: Metrics,
        trace: StageTrace,
        *,
        tally: Tally,
    ) -> None:
        self.limits = limits
        self.keys = keys
        self.inner = inner
        self.metrics = metrics
        self.tally = tally
        self.trace = trace

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(request, time.perf_counter())
        ctype = request.content_type
        outcome = "ok"
        try:
            if ctype not in (MEDIA_TYPE_REQUEST, MEDIA_TYPE_CHUNKED_REQUEST):
                raise Refusal(
                    problem(
                        415,
                        "Unsupported Media Type",
                        f"use {MEDIA_TYPE_REQUEST} or {MEDIA_TYPE_CHUNKED_REQUEST}",
                    ),
                    "unsupported_type",
                )
            length = request.content_length
            if length is not None and length > self.limits.max_body:
                raise Refusal(self._too_large(), "too_large")
            if ctype == MEDIA_TYPE_REQUEST:
                return await self._plain(ex)
            return await self._chunked(ex)
        except Refusal as exc:
            outcome = exc.outcome
            return exc.response
        except asyncio.CancelledError:
            outcome = "client_aborted"
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome = "client_aborted"  # nobody left to answer; hand back what was started
            return ex.response if ex.response is not None else web.Response()
        finally:
            if outcome == "ok":
                self.tally.add(_OK)
            else:
                self.metrics.inc("requests_total", route="ohttp", outcome=outcome)

    def _too_large(self) -> web.Response:
        return problem(413, "Content Too Large", f"at most {self.limits.max_body} bytes")

    @staticmethod
    def _ohttp_error(exc: OpenPCCError) -> Refusal:
        if isinstance(exc, UnsupportedError):
            resp = problem(
                400,
                "Key configuration not acceptable",
                "unknown OHTTP key id or suite; refetch the key configuration",
                type=OHTTP_KEY_PROBLEM,
            )
            return Refusal(resp, "bad_key_config")
        return Refusal(
            problem(400, "Bad Request", "the encapsulated request could not be opened"),
            "bad_encapsulation",
        )

    async def _body_chunks(self, request: web.Request) -> AsyncIterator[bytes]:
        """The request body as it arrives, bounded in size and per-read time."""
        total = 0
        content = request.content
        while True:
            # What has already arrived needs no timer (a small body usually has).
            chunk = content.read_nowait()
            if not chunk and not content.at_eof():
                try:
                    async with asyncio.timeout(self.limits.client_timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise Refusal(problem(408, "Request Timeout"), "client_timeout") from None
            if not chunk:
                return
            total += len(chunk)
            if total > self.limits.max_body:
                raise Refusal(self._too_large(), "too_large")
            audit.saw_body(request, chunk)
            self.tally.add(_RECEIVED, len(chunk))
            yield chunk

    async def _plain(self, ex: Exchange) -> web.StreamResponse:
        body = bytearray()
        async for chunk in self._body_chunks(ex.request):
            body += chunk
        t = time.perf_counter()
        try:
            inner, ctx = decapsulate_request(self.keys().private_keys(time.time()), bytes(body))
        except OpenPCCError as exc:
            raise self._ohttp_error(exc) from None
        self.trace.record("decapsulate", time.perf_counter() - t)
        sink = PlainSink(self.limits.max_plain_response)
        await self.inner(ex, inner, sink)
        return web.Response(
            body=ctx.encapsulate_response(sink.encode()), content_type=MEDIA_TYPE_RESPONSE
        )

    async def _chunked(self, ex: Exchange) -> web.StreamResponse:
        receiver = ChunkedRequestReceiver(self.keys().private_keys(time.time()))
        inner = bytearray()
        spent = 0.0  # decapsulation work only, not the wait for the body
        try:
            async for chunk in self._body_chunks(ex.request):
                t = time.perf_counter()
                for piece in receiver.receive_data(chunk):
                    inner += piece
                spent += time.perf_counter() - t
                if len(inner) > MAX_INNER_REQUEST:
                    raise Refusal(self._too_large(), "too_large")
            t = time.perf_counter()
            for piece in receiver.end_of_input():
                inner += piece
            spent += time.perf_counter() - t
        except OpenPCCError as exc:
            raise self._ohttp_error(exc) from None
        self.trace.record("decapsulate", spent)
        if len(inner) > MAX_INNER_REQUEST:
            raise Refusal(self._too_large(), "too_large")
        sink = ChunkedSink(ex, receiver.response_sender())
        await self.inner(ex, bytes(inner), sink)
        assert sink.response is not None
        return sink.response
