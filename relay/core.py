"""What the relay does, apart from how HTTP reaches it: allow-lists, limits, the key cache,
metrics. Free of aiohttp, so the lean server (relay/server.py, the default) loads none of
it; the aiohttp application (relay/app.py, the ``--http-server aiohttp`` fallback) shares
all of this, so the two cannot drift apart in what they forward or refuse.

Privacy rules enforced here and in both servers (see docs/relay.md):
- Requests reach only the configured gateway URLs; paths are static routes, never
  derived from the request, so this is not an open proxy.
- Headers are allow-listed in both directions; the upstream client (relay/upstream.py)
  adds none of its own (no User-Agent, Accept, Accept-Encoding, cookies, redirects,
  proxies).
- No client address is logged, counted per client, or exported; the rate limiter
  keeps keyed hashes in memory only (relay/ratelimit.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

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
    "bad_request",  # a request body that broke its own framing (lean server only)
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
    431: "Request header fields too large",
    500: "Internal error",
    502: "Bad gateway",
    503: "Relay overloaded",
    504: "Gateway timeout",
}

# Every response the relay makes names it so (not a framework's version string).
SERVER = "openpcc-relay"

# CORS, only with --allow-origin: what a browser's preflight of the POST must hear. Never
# Allow-Credentials: clients send no cookie, and the relay wants none.
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "content-type, incremental",
    "Access-Control-Max-Age": "86400",
}


def problem_body(status: int) -> bytes:
    """An RFC 9457 problem with a generic title: upstream details never reach the client."""
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status}
    return (json.dumps(body) + "\n").encode()


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
class Upload:
    """What went wrong on the client side of an upload, if anything (set by the body pump)."""

    too_large: bool = False
    timed_out: bool = False
    malformed: bool = False


NO_UPLOAD = Upload()  # what requests whose body is already here pass (never set)


class UploadError(Exception):
    pass


@dataclass
class CachedKeys:
    status: int
    body: bytes
    headers: dict[str, str]
    fetched: float
    expires: float

    def response_headers(self) -> dict[str, str]:
        """The allow-listed headers, plus ``Age`` for an answer served from the cache."""
        headers = {**self.headers, "Server": SERVER}
        if self.expires > self.fetched:
            headers["Age"] = str(int(time.monotonic() - self.fetched))
        return headers


def max_age(cache_control: str | None) -> float:
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


def classify(exc: BaseException, upload: Upload) -> str:
    """The metrics outcome of a failed exchange."""
    if upload.too_large:
        return "too_large"
    if upload.timed_out:
        return "client_timeout"
    if upload.malformed:
        return "bad_request"
    if isinstance(exc, UpstreamTimeout | TimeoutError):
        return "upstream_timeout"
    if isinstance(exc, UpstreamUnreachable):
        return "upstream_unreachable"
    if isinstance(exc, UpstreamError):
        return "upstream_aborted"
    log.error("unexpected relay failure: %s", type(exc).__name__)
    return "upstream_aborted"


def failure_status(exc: BaseException, upload: Upload) -> int:
    """The status a client gets for a failed exchange whose answer has not started."""
    if upload.too_large:
        return 413
    if upload.timed_out:
        return 408
    if upload.malformed:
        return 400
    if isinstance(exc, UpstreamTimeout | TimeoutError):
        log.warning("gateway timed out")
        return 504
    log.warning("gateway unreachable or failed: %s", type(exc).__name__)
    return 502


class RelayCore:
    """The state both servers share: the upstream client, limits, the key cache, metrics."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst, config.rate_limit_clients)
        self.client: Client | None = None
        self.endpoints = {
            url: Endpoint(url) for g in config.gateways for url in (g.url, g.keys_url)
        }
        self._keys: dict[str, CachedKeys] = {}
        self._keys_locks: dict[str, asyncio.Lock] = {}
        self.trace = StageTrace("relay")

    async def start(self) -> None:
        # Keep-alive connections to the gateways; it adds no header of its own, keeps no
        # cookies, follows no redirects, reads no proxy settings (relay/upstream.py).
        self.client = Client(self.config.connect_timeout, self.config.read_timeout)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    def admit(self, address: str | None, route: str) -> tuple[int, dict[str, str]] | None:
        """None if the request may go on; else the refusal's status and headers."""
        wait = self.limiter.check(address) if self.limiter.rate > 0 else 0.0
        if wait > 0:
            self.metrics.count(route, "rate_limited")
            return 429, {"Retry-After": RateLimiter.retry_after(wait)}
        if self.metrics.in_flight >= self.config.max_concurrency:
            self.metrics.count(route, "overloaded")
            return 503, {"Retry-After": "1"}
        return None

    def cached_keys(self, gateway: Gateway) -> CachedKeys | None:
        """A fresh cached key configuration, counted as a hit; None on a miss."""
        entry = self._keys.get(gateway.keys_url)
        if entry is not None and entry.expires > time.monotonic():
            self.metrics.keys_cache["hit"] += 1
            self.metrics.count("keys", "ok")
            self.metrics.bytes_out += len(entry.body)
            return entry
        return None

    async def keys(self, gateway: Gateway) -> CachedKeys | int:
        """The gateway's key configuration (cached), or the status of a failed fetch."""
        url = gateway.keys_url
        lock = self._keys_locks.get(url)
        if lock is None:
            lock = self._keys_locks[url] = asyncio.Lock()
        async with lock:  # concurrent misses share one upstream fetch
            entry = self.cached_keys(gateway)
            if entry is not None:
                return entry
            self.metrics.keys_cache["miss"] += 1
            self.metrics.in_flight += 1
            try:
                entry = await self._fetch_keys(url)
            except Exception as exc:
                outcome = classify(exc, Upload())
                self.metrics.count("keys", outcome)
                log.warning("key configuration fetch failed: %s", type(exc).__name__)
                return 504 if outcome == "upstream_timeout" else 502
            finally:
                self.metrics.in_flight -= 1
            if entry.expires > entry.fetched:
                self._keys[url] = entry
            else:
                self._keys.pop(url, None)
            self.metrics.count("keys", "ok")
            self.metrics.bytes_out += len(entry.body)
            return entry

    async def _fetch_keys(self, url: str) -> CachedKeys:
        assert self.client is not None
        ep = self.endpoints[url]
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
                ttl = min(max_age(headers.get("Cache-Control")), self.config.keys_max_age)
            return CachedKeys(upstream.status, body, headers, now, now + ttl)
