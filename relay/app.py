"""The relay as an aiohttp application: the ``--http-server aiohttp`` fallback.

The default server is relay/server.py, a lean asyncio protocol (about half the CPU per
request); this one is kept, on the same core (relay/core.py: allow-lists, limits, key
cache, metrics), for operators who want the framework's HTTP parsing. Both pass the same
contract suite (tests/test_relay.py; tests/test_relay_server.py runs it on this one).

Bodies stream in both directions with back-pressure; a client that goes away cancels
the upstream request (the server runs with handler cancellation on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from relay.config import Gateway, RelayConfig
from relay.core import (
    INCREMENTAL,
    NO_UPLOAD,
    OHTTP_REQUEST_TYPES,
    PREFLIGHT_HEADERS,
    RESPONSE_HEADERS,
    SERVER,
    CachedKeys,
    Metrics,
    RelayCore,
    Upload,
    UploadError,
    classify,
    failure_status,
    log,
    problem_body,
)

__all__ = ["Metrics", "Relay", "build_app", "problem"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFLIGHT = {"Server": SERVER, **PREFLIGHT_HEADERS}


def problem(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 9457 problem with a generic title: upstream details never reach the client."""
    return web.Response(
        status=status,
        body=problem_body(status),
        content_type="application/problem+json",
        headers={"Server": SERVER, **headers} if headers else {"Server": SERVER},
    )


def _unexpected(exc: Exception) -> web.Response:
    log.error("handler failed: %s", type(exc).__name__)
    return problem(500)


class Relay:
    """Request handlers plus the state they share (the upstream client, limits, cache)."""

    def __init__(self, config: RelayConfig) -> None:
        self.core = RelayCore(config)
        self.config = config
        self.metrics = self.core.metrics
        self.trace = self.core.trace
        self.saw_body: Callable[[web.Request, bytes], None] | None = None  # audit (tests)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        await self.core.start()

    async def stop(self, _app: web.Application) -> None:
        await self.core.stop()

    # -- admission -------------------------------------------------------------------
    def _admit(self, request: web.Request, route: str) -> web.Response | None:
        refused = self.core.admit(request.remote, route)
        return None if refused is None else problem(*refused)

    # -- POST: the OHTTP request ------------------------------------------------------
    def ohttp_handler(self, gateway: Gateway) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await self.relay_ohttp(request, gateway)
            except Exception as exc:  # a bug: still a generic problem, never a traceback
                return _unexpected(exc)

        return handle

    async def relay_ohttp(self, request: web.Request, gateway: Gateway) -> web.StreamResponse:
        t0 = time.perf_counter() if self.trace.enabled else 0.0
        length = request.content_length
        if length is not None and length > self.config.max_body:
            self.metrics.count("ohttp", "too_large")
            return problem(413)
        ctype = OHTTP_REQUEST_TYPES.get(request.content_type)  # lower-cased, no parameters
        if ctype is None:
            self.metrics.count("ohttp", "unsupported_type")
            return problem(415)
        rejected = self._admit(request, "ohttp")
        if rejected is not None:
            return rejected

        # The whole allow-list: canonical values only, so no client byte rides in a header
        # (Host and the framing, Content-Length or chunked, are the upstream client's).
        headers = ctype
        if request.headers.get("Incremental", "").strip() == "?1":
            headers += INCREMENTAL
        upload = NO_UPLOAD
        if length is None and not request.body_exists:
            length = 0
        data: bytes | AsyncIterator[bytes] = b""
        if length and request.content.is_eof():
            # The whole fixed-length body arrived with the head: hand it over in one write
            # (nothing is waited for, so this is not buffering).
            data = request.content.read_nowait()
            self.metrics.bytes_in += len(data)
            if self.saw_body is not None:
                self.saw_body(request, data)
        elif length != 0:
            upload = Upload()
            data = self._pump(request, upload)

        self.metrics.in_flight += 1
        try:
            return await self._forward(request, gateway, headers, data, length, upload, t0)
        finally:
            self.metrics.in_flight -= 1

    async def _pump(self, request: web.Request, upload: Upload) -> AsyncIterator[bytes]:
        """Client body -> gateway, one chunk at a time: the upstream write paces our reads."""
        total = 0
        while True:
            try:
                async with asyncio.timeout(self.config.client_timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                upload.timed_out = True
                raise UploadError("client body timeout") from None
            if not chunk:
                return
            total += len(chunk)
            if total > self.config.max_body:
                upload.too_large = True
                raise UploadError("body too large")
            self.metrics.bytes_in += len(chunk)
            if self.saw_body is not None:
                self.saw_body(request, chunk)
            yield chunk

    async def _forward(
        self,
        request: web.Request,
        gateway: Gateway,
        headers: bytes,
        data: bytes | AsyncIterator[bytes],
        length: int | None,
        upload: Upload,
        t0: float,
    ) -> web.StreamResponse:
        client = self.core.client
        assert client is not None
        response: web.StreamResponse | None = None
        outcome = "ok"
        trace = self.trace if self.trace.enabled else None
        if trace is not None:
            trace.record("upstream_sent", time.perf_counter() - t0)
        try:
            ep = self.core.endpoints[gateway.url]
            async with client.request(
                ep, b"POST", headers, data, length, RESPONSE_HEADERS
            ) as upstream:
                back = {**upstream.headers, "Server": SERVER}
                if upstream.complete:
                    # Complete already (a short fixed-length answer): one write, same bytes.
                    body = upstream.read_nowait()
                    self.metrics.bytes_out += len(body)
                    return web.Response(status=upstream.status, body=body, headers=back)
                response = web.StreamResponse(status=upstream.status, headers=back)
                if upstream.length is not None:  # fixed length (None: chunked, or until close)
                    response.content_length = upstream.length
                await response.prepare(request)
                first = True
                while chunk := await upstream.read():
                    t = time.perf_counter()
                    c = time.thread_time() if trace is not None else 0.0
                    await response.write(chunk)
                    self.metrics.bytes_out += len(chunk)
                    if trace is None:
                        continue
                    if first:
                        trace.record("upstream_wait", t - t0)
                        trace.record("first_out", time.perf_counter() - t0)
                        first = False
                    else:
                        wall, cpu = time.perf_counter() - t, time.thread_time() - c
                        trace.record("chunk", wall)  # both read before either line is written
                        trace.record("chunk_cpu", cpu)
                await response.write_eof()
                return response
        except asyncio.CancelledError:
            outcome = "client_aborted"  # the client went away: leaving the block closed upstream
            raise
        except Exception as exc:
            if _client_gone(request):
                outcome = "client_aborted"  # nobody left to tell; drop both sides
                _abort(request)
                return response or web.Response(headers={"Server": SERVER})
            # Whatever failed upstream, the client learns a status, never the cause.
            outcome = classify(exc, upload)
            return self._upstream_failed(response, upload, exc, request)
        finally:
            self.metrics.count("ohttp", outcome)

    def _upstream_failed(
        self,
        response: web.StreamResponse | None,
        upload: Upload,
        exc: BaseException,
        request: web.Request,
    ) -> web.StreamResponse:
        if response is not None and response.prepared:
            # Headers are out: the only honest signal left is a broken connection.
            _abort(request)
            return response
        return problem(failure_status(exc, upload))

    # -- GET: the gateway's key configuration (RFC 9540), cached --------------------
    def keys_handler(self, gateway: Gateway) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await self.relay_keys(request, gateway)
            except Exception as exc:
                return _unexpected(exc)

        return handle

    @staticmethod
    def _serve_cached(entry: CachedKeys) -> web.Response:
        return web.Response(status=entry.status, body=entry.body, headers=entry.response_headers())

    async def relay_keys(self, request: web.Request, gateway: Gateway) -> web.StreamResponse:
        rejected = self._admit(request, "keys")
        if rejected is not None:
            return rejected
        entry = self.core.cached_keys(gateway)
        if entry is None:
            got = await self.core.keys(gateway)
            if isinstance(got, int):
                return problem(got)
            entry = got
        return self._serve_cached(entry)

    # -- operations ------------------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness, in the JSON every party answers (the nginx twin too)."""
        return web.json_response({"status": "ok"}, headers={"Server": SERVER})

    async def readyz(self, _request: web.Request) -> web.Response:
        """Ready once started: the relay holds no state a gateway outage would fix."""
        return web.json_response({"status": "ok"}, headers={"Server": SERVER})

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        return web.Response(
            text=self.metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"Server": SERVER},
        )


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _method_not_allowed(allowed: str) -> Handler:
    async def handle(_request: web.Request) -> web.Response:
        return problem(405, {"Allow": allowed})

    return handle


async def _not_found(_request: web.Request) -> web.Response:
    return problem(404)


async def _preflight(_request: web.Request) -> web.Response:
    """Answered here, never forwarded: the gateway sees no preflight and no Origin."""
    return web.Response(status=204, headers=PREFLIGHT)


def _cors(
    allowed: tuple[str, ...], paths: frozenset[str]
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Access-Control-Allow-Origin on every answer of the gateway routes, errors included.
    A hook runs just before the head is written (a streamed answer's head goes out inside
    the handler); it is registered only when origins are configured, so without CORS the
    hot path runs nothing more."""
    any_origin = allowed == ("*",)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.path not in paths:
            return
        if any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
            return
        response.headers["Vary"] = "Origin"  # the answer depends on it: caches must key on it
        origin = request.headers.get("Origin")
        if origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin

    return on_prepare


def build_app(config: RelayConfig) -> web.Application:
    """The relay as an aiohttp application: static routes only, one per gateway."""
    relay = Relay(config)
    middlewares = []
    if config.audit_log:
        # Imported only when asked for, so a production relay loads nothing from openpcc/.
        from pathlib import Path

        from openpcc import audit

        middlewares.append(audit.AuditLog(Path(config.audit_log), "relay").middleware())
        relay.saw_body = audit.saw_body
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body)
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.stop)
    routes: dict[str, tuple[str, Handler]] = {}
    for gateway in config.gateways:
        routes[gateway.post_path] = ("POST", relay.ohttp_handler(gateway))
        routes[gateway.keys_path] = ("GET", relay.keys_handler(gateway))
    routes["/healthz"] = ("GET", relay.healthz)
    routes["/readyz"] = ("GET", relay.readyz)
    routes["/metrics"] = ("GET", relay.metrics_handler)
    cors = bool(config.allow_origins)
    for path, (method, handler) in routes.items():
        app.router.add_route(method, path, handler)
        if cors and method == "POST":
            app.router.add_route("OPTIONS", path, _preflight)
        # Any other method: 405 as a problem document (routes, not a middleware, so that
        # relayed requests pay for nothing).
        allowed = f"{method}, OPTIONS" if cors and method == "POST" else method
        app.router.add_route("*", path, _method_not_allowed(allowed))
    if cors:
        paths = frozenset(p for g in config.gateways for p in (g.post_path, g.keys_path))
        app.on_response_prepare.append(_cors(config.allow_origins, paths))
    # Any other path: 404 in the same format. (A target that is no path at all, as in
    # "CONNECT host:443" or "OPTIONS *", gets aiohttp's plain 404.)
    app.router.add_route("*", "/{path:.*}", _not_found)
    app["relay"] = relay
    return app
