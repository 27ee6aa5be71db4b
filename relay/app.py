"""The OHTTP relay: forward ciphertext to configured gateways, and nothing else.

Privacy rules this file enforces (see docs/relay.md):
- Requests reach only the configured gateway URLs; paths are static routes, never
  derived from the request, so this is not an open proxy.
- Headers are allow-listed in both directions; the upstream client (relay/upstream.py)
  adds none of its own (no User-Agent, Accept, Accept-Encoding, cookies, redirects,
  proxies).
- Bodies stream in both directions with back-pressure; a client that goes away
  cancels the upstream request (the server runs with handler cancellation on).
- No client address is logged, counted per client, or exported; the rate limiter
  keeps keyed hashes in memory only (relay/ratelimit.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from openpcc.service.stagetrace import StageTrace
from relay.config import Gateway, RelayConfig
from relay.ratelimit import RateLimiter
from relay.upstream import Client, Endpoint, UpstreamError, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("openpcc.relay")

# The Content-Type line sent upstream, by the client's (lower-cased, parameters dropped)
# media type: only these two are relayed, so no client byte rides in a header.
OHTTP_REQUEST_TYPES = {
    "message/ohttp-req": b"Content-Type: message/ohttp-req\r\n",
    "message/ohttp-chunked-req": b"Content-Type: message/ohttp-chunked-req\r\n",
}
INCREMENTAL = b"Incremental: ?1\r\n"
# Response headers passed back to the client; everything else the gateway sends is dropped.
RESPONSE_HEADERS = {b"content-type": "Content-Type", b"incremental": "Incremental"}
KEYS_RESPONSE_HEADERS = {b"content-type": "Content-Type", b"cache-control": "Cache-Control"}
OUTCOMES = (
    "ok",
    "too_large",
    "unsupported_type",
    "rate_limited",
    "overloaded",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_aborted",
    "client_aborted",
    "client_timeout",
)
ROUTES = ("ohttp", "keys")
TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    413: "Request body too large",
    415: "Unsupported media type",
    429: "Too many requests",
    500: "Internal error",
    502: "Bad gateway",
    503: "Relay overloaded",
    504: "Gateway timeout",
}

# Every response the relay makes names it so (not aiohttp's version string). Set here
# rather than by an on_response_prepare hook, which would run for every request.
SERVER = "openpcc-relay"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# CORS, only with --allow-origin: what a browser's preflight of the POST must hear. Never
# Allow-Credentials: clients send no cookie, and the relay wants none.
PREFLIGHT_HEADERS = {
    "Server": SERVER,
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "content-type, incremental",
    "Access-Control-Max-Age": "86400",
}


def problem(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 9457 problem with a generic title: upstream details never reach the client."""
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status}
    return web.Response(
        status=status,
        text=json.dumps(body) + "\n",
        content_type="application/problem+json",
        headers={"Server": SERVER, **headers} if headers else {"Server": SERVER},
    )


def _unexpected(exc: Exception) -> web.Response:
    log.error("handler failed: %s", type(exc).__name__)
    return problem(500)


class Metrics:
    """Aggregate counters only: nothing per client, per address or per request."""

    def __init__(self) -> None:
        self.requests = {(r, o): 0 for r in ROUTES for o in OUTCOMES}
        self.bytes_in = 0
        self.bytes_out = 0
        self.in_flight = 0
        self.keys_cache = {"hit": 0, "miss": 0}

    def count(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] += 1

    def render(self) -> str:
        lines = [
            "# HELP openpcc_relay_requests_total Proxied requests by route and outcome.",
            "# TYPE openpcc_relay_requests_total counter",
        ]
        for (route, outcome), n in self.requests.items():
            lines.append(f'openpcc_relay_requests_total{{route="{route}",outcome="{outcome}"}} {n}')
        lines += [
            "# HELP openpcc_relay_request_bytes_total Request body bytes sent to gateways.",
            "# TYPE openpcc_relay_request_bytes_total counter",
            f"openpcc_relay_request_bytes_total {self.bytes_in}",
            "# HELP openpcc_relay_response_bytes_total Response body bytes sent to clients.",
            "# TYPE openpcc_relay_response_bytes_total counter",
            f"openpcc_relay_response_bytes_total {self.bytes_out}",
            "# HELP openpcc_relay_in_flight Requests currently being relayed.",
            "# TYPE openpcc_relay_in_flight gauge",
            f"openpcc_relay_in_flight {self.in_flight}",
            "# HELP openpcc_relay_keys_cache_total Key configuration lookups by cache result.",
            "# TYPE openpcc_relay_keys_cache_total counter",
        ]
        for result, n in self.keys_cache.items():
            lines.append(f'openpcc_relay_keys_cache_total{{result="{result}"}} {n}')
        return "\n".join(lines) + "\n"


@dataclass
class _Upload:
    """What went wrong on the client side of an upload, if anything (set by the body pump)."""

    too_large: bool = False
    timed_out: bool = False


_NO_UPLOAD = _Upload()  # what requests whose body is already here pass (never set)


class _UploadError(Exception):
    pass


@dataclass
class _CachedKeys:
    status: int
    body: bytes
    headers: dict[str, str]
    fetched: float
    expires: float


def _max_age(cache_control: str | None) -> float:
    """Seconds a shared cache may keep the response; 0 when it must not cache it."""
    if not cache_control:
        return 0.0
    age = 0.0
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache", "private"):
            return 0.0
        if name in ("max-age", "s-maxage"):
            try:
                age = float(int(value.strip().strip('"')))
            except ValueError:
                return 0.0
            if name == "s-maxage":
                return age
    return age


class Relay:
    """Request handlers plus the state they share (the upstream client, limits, cache)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst, config.rate_limit_clients)
        self.client: Client | None = None
        self._endpoints = {
            url: Endpoint(url) for g in config.gateways for url in (g.url, g.keys_url)
        }
        self._keys: dict[str, _CachedKeys] = {}
        self._keys_locks = {g.keys_url: asyncio.Lock() for g in config.gateways}
        self.saw_body: Callable[[web.Request, bytes], None] | None = None  # audit (tests)
        self.trace = StageTrace("relay")

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        # Keep-alive connections to the gateways; it adds no header of its own, keeps no
        # cookies, follows no redirects, reads no proxy settings (relay/upstream.py).
        self.client = Client(self.config.connect_timeout, self.config.read_timeout)

    async def stop(self, _app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()

    # -- admission -------------------------------------------------------------------
    def _admit(self, request: web.Request, route: str) -> web.Response | None:
        wait = self.limiter.check(request.remote)
        if wait > 0:
            self.metrics.count(route, "rate_limited")
            return problem(429, {"Retry-After": RateLimiter.retry_after(wait)})
        if self.metrics.in_flight >= self.config.max_concurrency:
            self.metrics.count(route, "overloaded")
            return problem(503, {"Retry-After": "1"})
        return None

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
        upload = _NO_UPLOAD
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
            upload = _Upload()
            data = self._pump(request, upload)

        self.metrics.in_flight += 1
        try:
            return await self._forward(request, gateway, headers, data, length, upload, t0)
        finally:
            self.metrics.in_flight -= 1

    async def _pump(self, request: web.Request, upload: _Upload) -> AsyncIterator[bytes]:
        """Client body -> gateway, one chunk at a time: the upstream write paces our reads."""
        total = 0
        while True:
            try:
                async with asyncio.timeout(self.config.client_timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                upload.timed_out = True
                raise _UploadError("client body timeout") from None
            if not chunk:
                return
            total += len(chunk)
            if total > self.config.max_body:
                upload.too_large = True
                raise _UploadError("body too large")
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
        upload: _Upload,
        t0: float,
    ) -> web.StreamResponse:
        assert self.client is not None
        response: web.StreamResponse | None = None
        outcome = "ok"
        trace = self.trace if self.trace.enabled else None
        if trace is not None:
            trace.record("upstream_sent", time.perf_counter() - t0)
        try:
            ep = self._endpoints[gateway.url]
            async with self.client.request(
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
            outcome = self._classify(exc, upload)
            return self._upstream_failed(response, upload, exc, request)
        finally:
            self.metrics.count("ohttp", outcome)

    @staticmethod
    def _classify(exc: BaseException, upload: _Upload) -> str:
        if upload.too_large:
            return "too_large"
        if upload.timed_out:
            return "client_timeout"
        if isinstance(exc, UpstreamTimeout | TimeoutError):
            return "upstream_timeout"
        if isinstance(exc, UpstreamUnreachable):
            return "upstream_unreachable"
        if isinstance(exc, UpstreamError):
            return "upstream_aborted"
        log.error("unexpected relay failure: %s", type(exc).__name__)
        return "upstream_aborted"

    def _upstream_failed(
        self,
        response: web.StreamResponse | None,
        upload: _Upload,
        exc: BaseException,
        request: web.Request,
    ) -> web.StreamResponse:
        if response is not None and response.prepared:
            # Headers are out: the only honest signal left is a broken connection.
            _abort(request)
            return response
        if upload.too_large:
            return problem(413)
        if upload.timed_out:
            return problem(408)
        if isinstance(exc, UpstreamTimeout | TimeoutError):
            log.warning("gateway timed out")
            return problem(504)
        log.warning("gateway unreachable or failed: %s", type(exc).__name__)
        return problem(502)

    # -- GET: the gateway's key configuration (RFC 9540), cached --------------------
    def keys_handler(self, gateway: Gateway) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await self.relay_keys(request, gateway)
            except Exception as exc:
                return _unexpected(exc)

        return handle

    def _serve_cached(self, entry: _CachedKeys) -> web.Response:
        headers = {**entry.headers, "Server": SERVER}
        if entry.expires > entry.fetched:
            headers["Age"] = str(int(time.monotonic() - entry.fetched))
        return web.Response(status=entry.status, body=entry.body, headers=headers)

    async def relay_keys(self, request: web.Request, gateway: Gateway) -> web.StreamResponse:
        rejected = self._admit(request, "keys")
        if rejected is not None:
            return rejected
        url = gateway.keys_url
        async with self._keys_locks[url]:  # concurrent misses share one upstream fetch
            entry = self._keys.get(url)
            if entry is not None and entry.expires > time.monotonic():
                self.metrics.keys_cache["hit"] += 1
                self.metrics.count("keys", "ok")
                return self._serve_cached(entry)
            self.metrics.keys_cache["miss"] += 1
            self.metrics.in_flight += 1
            try:
                entry = await self._fetch_keys(url)
            except Exception as exc:
                outcome = self._classify(exc, _Upload())
                self.metrics.count("keys", outcome)
                log.warning("key configuration fetch failed: %s", type(exc).__name__)
                return problem(504 if outcome == "upstream_timeout" else 502)
            finally:
                self.metrics.in_flight -= 1
            if entry.expires > entry.fetched:
                self._keys[url] = entry
            else:
                self._keys.pop(url, None)
            self.metrics.count("keys", "ok")
            self.metrics.bytes_out += len(entry.body)
            return self._serve_cached(entry)

    async def _fetch_keys(self, url: str) -> _CachedKeys:
        assert self.client is not None
        ep = self._endpoints[url]
        async with self.client.request(ep, b"GET", b"", keep=KEYS_RESPONSE_HEADERS) as upstream:
            body = b""
            while chunk := await upstream.read():
                body += chunk
                if len(body) > self.config.keys_max_bytes:
                    raise UpstreamError("key configuration too large")
            headers = dict(upstream.headers)
            now = time.monotonic()
            ttl = 0.0
            if upstream.status == 200:
                ttl = min(_max_age(headers.get("Cache-Control")), self.config.keys_max_age)
            return _CachedKeys(upstream.status, body, headers, now, now + ttl)

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
    return web.Response(status=204, headers=PREFLIGHT_HEADERS)


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
