"""The Privacy Pass issuer as an aiohttp app (RFC 9578 §4-§6, generic batching).

The issuer is the one party that knows the account; it must learn nothing else.
So: requests are fully validated before any quota is taken, quota is taken
all-or-nothing, and nothing it logs or exports carries an API key, a blinded
message or a per-account figure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from openpcc import audit
from openpcc.bodies import read_at_most
from openpcc.errors import DecodeError, OpenPCCError, UnsupportedError
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA
from openpcc.privacypass.directory import (
    MEDIA_TYPE as DIRECTORY_MEDIA_TYPE,
)
from openpcc.privacypass.directory import (
    WELL_KNOWN_PATH,
    IssuerDirectory,
    TokenKeyEntry,
)
from openpcc.service.http import Metrics, healthz, problem
from tokens.config import MAX_BATCH, IssuerConfig
from tokens.keys import KeyRing, StoredKey
from tokens.store import IssuerStore, hash_api_key

log = logging.getLogger("openpcc.issuer")

REQUEST_PATH = "/token-request"
TOKEN_REQUEST_MEDIA_TYPE = "application/private-token-request"
TOKEN_RESPONSE_MEDIA_TYPE = "application/private-token-response"
# CORS, only with --allow-origin: the two routes a web page calls, by the method it uses.
# Never Allow-Credentials: the API key is an Authorization header the page sets, no cookie.
CORS_ROUTES = {WELL_KNOWN_PATH: "GET", REQUEST_PATH: "POST"}
CORS_ALLOW_HEADERS = "authorization, content-type, accept"


STORE = web.AppKey("store", IssuerStore)
RING = web.AppKey("ring", KeyRing)
CONFIG = web.AppKey("config", IssuerConfig)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey("clock", Callable[[], float])  # type: ignore[arg-type]


def _ring(app: web.Application) -> KeyRing:
    """The key ring, reloaded when ``keys rotate`` changed the folder."""
    ring = app[RING]
    if ring.changed_on_disk():
        ring = KeyRing.load(app[CONFIG].state_dir)
        app[RING] = ring
    return ring


def directory_for(ring: KeyRing, now: float, request_uri: str) -> IssuerDirectory:
    return IssuerDirectory(
        request_uri,
        tuple(
            TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, k.key.token_key, k.not_before)
            for k in ring.published(now)
        ),
    )


async def directory(request: web.Request) -> web.Response:
    app = request.app
    cfg = app[CONFIG]
    uri = (cfg.public_url.rstrip("/") if cfg.public_url else "") + REQUEST_PATH
    body = directory_for(_ring(app), app[CLOCK](), uri).serialize()
    app[METRICS].inc("directory_requests_total")
    return web.Response(
        body=body,
        content_type=DIRECTORY_MEDIA_TYPE,
        headers={"Cache-Control": f"public, max-age={cfg.directory_max_age}"},
    )


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def token_request(request: web.Request) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    cfg = app[CONFIG]
    ctype = request.content_type
    single = ctype == TOKEN_REQUEST_MEDIA_TYPE
    if not single and ctype != batched.REQUEST_MEDIA_TYPE:
        metrics.inc("issuance_requests_total", outcome="bad_media_type")
        return problem(
            415,
            "Unsupported Media Type",
            f"use {TOKEN_REQUEST_MEDIA_TYPE} or {batched.REQUEST_MEDIA_TYPE}",
        )

    key = _bearer(request)
    if key is None:
        metrics.inc("issuance_requests_total", outcome="unauthenticated")
        resp = problem(401, "Unauthorized", "send Authorization: Bearer <api key>")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="openpcc-issuer"'
        return resp
    account = await app[STORE].account_by_key_hash(hash_api_key(key))
    if account is None or account.revoked:
        metrics.inc("issuance_requests_total", outcome="bad_key")
        return problem(401, "Unauthorized", "unknown or revoked API key")

    limit = issuance.TOKEN_REQUEST_LEN if single else 8 + cfg.max_batch * (3 + issuance.NK)
    if request.content_length is not None and request.content_length > limit:
        metrics.inc("issuance_requests_total", outcome="too_large")
        return problem(413, "Content Too Large", f"at most {limit} bytes")
    body = await read_at_most(request.content, limit)
    audit.saw_body(request, body)
    if len(body) > limit:
        metrics.inc("issuance_requests_total", outcome="too_large")
        return problem(413, "Content Too Large", f"at most {limit} bytes")

    now = app[CLOCK]()
    ring = _ring(app)
    try:
        if single:
            items: list[batched.AnyRequest] = [issuance.TokenRequest.decode(body)]
        else:
            items = batched.decode_batch_request(body, max_items=cfg.max_batch)
        signable = [r for r in items if isinstance(r, issuance.TokenRequest)]
        keys: list[StoredKey] = []
        for req in signable:
            stored = ring.issuable_by_truncated_id(req.truncated_token_key_id, now)
            if stored is None:
                raise UnsupportedError(
                    "token request names no current issuer key; refetch the issuer directory"
                )
            issuance.check_request(stored.key, req)
            keys.append(stored)
    except OpenPCCError as exc:
        metrics.inc("issuance_requests_total", outcome="bad_request")
        return problem(400, "Bad Request", str(exc))
    if not signable:
        metrics.inc("issuance_requests_total", outcome="bad_request")
        return problem(400, "Bad Request", "no token type 0x0002 request in the body")

    decision = await app[STORE].consume(account.name, len(signable), now)
    if not decision.granted:
        metrics.inc("issuance_requests_total", outcome="quota")
        return problem(
            429,
            "Too Many Requests",
            f"token quota of {decision.limit} per window reached",
            retry_after=decision.retry_after,
        )

    def sign_all() -> list[issuance.TokenResponse]:
        return [issuance.issue(k.key, r) for k, r in zip(keys, signable, strict=True)]

    try:
        # Blind signing is ~1 ms of CPU per token: keep the event loop free for health checks.
        responses = await asyncio.get_running_loop().run_in_executor(None, sign_all)
    except DecodeError as exc:  # malformed input the checks above missed: still the client's
        await app[STORE].refund(account.name, len(signable), now)
        metrics.inc("issuance_requests_total", outcome="bad_request")
        return problem(400, "Bad Request", str(exc))
    except Exception:
        await app[STORE].refund(account.name, len(signable), now)
        metrics.inc("issuance_requests_total", outcome="error")
        log.exception("blind signing failed")
        return problem(500, "Internal Server Error", "signing failed; no quota was used")

    metrics.inc("issuance_requests_total", outcome="ok")
    metrics.inc("tokens_issued_total", len(responses))
    if single:
        return web.Response(body=responses[0].encode(), content_type=TOKEN_RESPONSE_MEDIA_TYPE)
    it = iter(responses)
    out = batched.encode_batch_response(
        [
            (TOKEN_TYPE_BLIND_RSA, next(it)) if isinstance(r, issuance.TokenRequest) else None
            for r in items
        ]
    )
    return web.Response(body=out, content_type=batched.RESPONSE_MEDIA_TYPE)


async def readyz(request: web.Request) -> web.Response:
    """Readiness (not liveness): the store answers, so issuance can take quota.

    A cheap lookup of a key hash no account has touches SQLite or Redis for real.
    """
    try:
        async with asyncio.timeout(2.0):
            await request.app[STORE].account_by_key_hash("0" * 64)
    except Exception as exc:
        log.warning("not ready: store unreachable (%s)", type(exc).__name__)
        return web.json_response({"status": "unavailable", "store": "unreachable"}, status=503)
    return web.json_response({"status": "ok", "store": "reachable"})


def _preflight(method: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    headers = {
        "Access-Control-Allow-Methods": method,
        "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Max-Age": "86400",
    }

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(status=204, headers=headers)

    return handle


def _cors(
    allowed: tuple[str, ...],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """CORS headers on every answer of the two public routes, errors included (a 401 or
    429 the page cannot read is a bare network error to it); Retry-After is exposed so
    the page can tell when its quota comes back."""
    any_origin = allowed == ("*",)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.path not in CORS_ROUTES:
            return
        origin = request.headers.get("Origin")
        if not any_origin:
            response.headers["Vary"] = "Origin"  # the answer depends on it (and is cached)
            if origin not in allowed:
                return
        response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else str(origin)
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"

    return on_prepare


def create_app(
    store: IssuerStore,
    ring: KeyRing,
    config: IssuerConfig,
    *,
    clock: Callable[[], float] = time.time,
    audit_log: Path | None = None,
) -> web.Application:
    middlewares = [] if audit_log is None else [audit.AuditLog(audit_log, "issuer").middleware()]
    app = web.Application(
        client_max_size=8 + MAX_BATCH * (3 + issuance.NK) + 1024, middlewares=middlewares
    )
    app[STORE] = store
    app[RING] = ring
    app[CONFIG] = config
    app[CLOCK] = clock
    metrics = Metrics("openpcc_issuer")
    metrics.describe("issuance_requests_total", "token issuance requests by outcome")
    metrics.describe("tokens_issued_total", "tokens signed")
    app[METRICS] = metrics
    app.router.add_get(WELL_KNOWN_PATH, directory)
    app.router.add_post(REQUEST_PATH, token_request)
    if config.allow_origins:
        for path, method in CORS_ROUTES.items():
            app.router.add_route("OPTIONS", path, _preflight(method))
        app.on_response_prepare.append(_cors(config.allow_origins))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.handler)

    async def _close(_app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(_close)
    return app
