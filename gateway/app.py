"""The OHTTP gateway: decapsulate, redeem the token, route the sealed request, stream back.

What the gateway may learn (DESIGN.md §1): the one-time token, the model name, the
candidate node ids and ciphertext sizes. It never sees the client's address (the relay
connects, not the client), an account, the prompt or the answer (sealed to the node).
So: no access log, log lines carry outcomes only, metrics are aggregate counters, and
the audit log (``--audit-log``, tests and demo only) records exactly what arrived.

Two listeners: the public one (``/.well-known/ohttp-gateway``, ``/gateway``, health,
metrics) that the relay reaches, and an internal one (``/internal/nodes``) that only
nodes reach, guarded by a shared registration secret.

Mid-stream node failure: once the first byte of a node's sealed answer is forwarded, the
gateway cannot fail over (the node may have acted on the prompt). If the node then dies,
the gateway ends the inner Binary HTTP message and the chunked OHTTP response cleanly
but never adds the node's sealed final chunk (it cannot forge one), so the client's
sealed-response layer reports truncation. The OHTTP layer stays well-formed, so the
error surfaces in exactly one place and the relay connection is not torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.issuerdir import IssuerDirectoryCache
from gateway.keys import OhttpKeyRing
from gateway.nodestore import DEFAULT_PREFIX, RedisNodeStore, RegistryFullError
from gateway.registry import (
    MAX_REGISTRATION_BYTES,
    NodeRegistry,
    Registration,
    RegistrationError,
    parse_registration,
)
from gateway.spent import DEFAULT_TTL, SpentStore
from openpcc import audit
from openpcc.audit import AuditLog
from openpcc.bodies import read_at_most
from openpcc.errors import OpenPCCError, UnsupportedError
from openpcc.privacypass import issuance
from openpcc.privacypass.auth import parse_authorization_token
from openpcc.privacypass.directory import MEDIA_TYPE as DIRECTORY_MEDIA_TYPE
from openpcc.service.http import PROBLEM_JSON, Metrics, healthz, problem, problem_for
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp, sealed
from openpcc.wire.bhttp_stream import ResponseStreamEncoder
from openpcc.wire.chunked import (
    DEFAULT_MAX_CHUNK_SIZE,
    MEDIA_TYPE_CHUNKED_REQUEST,
    MEDIA_TYPE_CHUNKED_RESPONSE,
    ChunkedRequestReceiver,
    ChunkedResponseSender,
)
from openpcc.wire.ohttp import (
    MEDIA_TYPE_KEYS,
    MEDIA_TYPE_REQUEST,
    MEDIA_TYPE_RESPONSE,
    decapsulate_request,
    encode_key_configs,
)

log = logging.getLogger("openpcc.gateway")
_RANDOM = random.SystemRandom()  # candidate order: os.urandom, one instance for all

WELL_KNOWN_KEYS = "/.well-known/ohttp-gateway"
GATEWAY_PATH = "/gateway"
REGISTER_PATH = "/internal/nodes"
_INNER_NOTE = "openpcc.gateway.inner"
_RESPONSE = "openpcc.gateway.response"
_T0 = "openpcc.gateway.t0"
# RFC 9458 §5.3 / §9.5: "key configuration not acceptable" problem type.
OHTTP_KEY_PROBLEM = "https://iana.org/assignments/http-problem-types#ohttp-key"
# Largest envelope a client can build: 8 MiB padded request, per-16-KiB framing, header.
MAX_ENVELOPE = (
    sealed.MAX_REQUEST_BYTES
    + (sealed.MAX_REQUEST_BYTES // sealed.CHUNK_SIZE + 1) * (1 + 4 + 16)
    + 7
    + sealed.NONCE_LEN
    + 1
    + sealed.MAX_MODEL_LEN
    + 1
    + sealed.MAX_CANDIDATES * (sealed.NODE_ID_LEN + sealed.KEY_ID_LEN + 32 + sealed.WRAPPED_LEN)
)
# Inner BHTTP request: envelope plus headers (the token is ~480 bytes) and framing.
MAX_INNER_REQUEST = MAX_ENVELOPE + 64 * 1024
# Outer OHTTP body: inner request plus per-chunk framing and tags.
DEFAULT_MAX_BODY = MAX_INNER_REQUEST + 64 * 1024
# Content of one response chunk; leaves room for BHTTP framing inside the OHTTP limit.
OUT_PIECE = DEFAULT_MAX_CHUNK_SIZE - 64


@dataclass
class GatewayConfig:
    state_dir: Path
    registration_secret: str
    keys_max_age: int = 3600
    max_body: int = DEFAULT_MAX_BODY
    spent_ttl: int = DEFAULT_TTL
    node_connect_timeout: float = 2.0
    node_first_byte_timeout: float = 60.0
    node_read_timeout: float = 300.0
    client_timeout: float = 30.0
    max_plain_response: int = 32 * 1024 * 1024
    registry_sync_interval: float = 1.0


class _Refusal(Exception):
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


# ----------------------------------------------------------------------------- sinks


class _Sink(ABC):
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


class _PlainSink(_Sink):
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
            raise _NodeStreamError("node response over the plain-OHTTP buffer limit")
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


class _ChunkedSink(_Sink):
    """Writes an indeterminate-length BHTTP response, one sealed OHTTP chunk per piece.

    Every sealed chunk goes out as soon as it exists; chunks that exist at the same
    moment (the head and the first piece, the last piece and the end) share one write.
    """

    def __init__(self, request: web.Request, sender: ChunkedResponseSender) -> None:
        self.request = request
        self.sender = sender
        self.encoder = ResponseStreamEncoder()
        self.response: web.StreamResponse | None = None
        self._pending: list[bytes] = []

    async def start(self, status: int, headers: list[bhttp.Field]) -> None:
        self.response = _ChunkedResponse(status=200, headers=_CHUNKED_HEADERS)
        self.request[_RESPONSE] = self.response
        await self.response.prepare(self.request)
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


class _NodeStreamError(Exception):
    pass


# ----------------------------------------------------------------------------- gateway


@dataclass
class Gateway:
    config: GatewayConfig
    ring: OhttpKeyRing
    spent: SpentStore
    issuer: IssuerDirectoryCache
    registry: NodeRegistry
    audit_log: AuditLog | None = None
    # With --redis: registrations go to Redis and every replica mirrors it (nodestore.py).
    shared_nodes: RedisNodeStore | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics("openpcc_gateway"))
    session: aiohttp.ClientSession | None = None
    trace: StageTrace = field(default_factory=lambda: StageTrace("gateway"))

    def __post_init__(self) -> None:
        self._routes = {
            "/v1/nodes": ("GET", self._nodes),
            "/v1/issuer-directory": ("GET", self._issuer_directory),
            "/v1/infer": ("POST", self._infer),
        }
        m = self.metrics
        m.describe("requests_total", "public requests by route and outcome")
        m.describe("redemptions_total", "token redemptions by outcome")
        m.describe("node_attempts_total", "forwarding attempts to nodes by outcome")
        m.describe("registrations_total", "node registrations by outcome")
        m.describe("nodes", "registered nodes by health")
        m.describe("registry_syncs_total", "shared node registry syncs from Redis by outcome")
        self._sync_task: asyncio.Task[None] | None = None
        m.describe("ohttp_keys", "published OHTTP key configs")
        m.describe("request_bytes_total", "encapsulated request bytes received")
        m.describe("response_bytes_total", "sealed node response bytes forwarded")

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.node_connect_timeout,
                sock_read=self.config.node_read_timeout,
            ),
            # Forward the envelope and nothing else: no agent string, no cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            auto_decompress=False,
            trust_env=False,
        )
        await self.registry.start()
        if self.shared_nodes is not None:
            await self._sync_nodes()  # best effort: a Redis outage must not stop the start
            self._sync_task = asyncio.create_task(self._sync_loop())
        await self.issuer.start()

    async def stop(self) -> None:
        await self.issuer.stop()
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        await self.registry.stop()
        if self.shared_nodes is not None:
            await self.shared_nodes.close()
        if self.session is not None:
            await self.session.close()
        await self.spent.close()

    async def _sync_nodes(self) -> None:
        """Mirror the shared registry; on failure keep routing with the last copy.

        Entries then run out on their own heartbeat expiry, as they would if the nodes
        had stopped: no node is kept alive by a Redis outage.
        """
        assert self.shared_nodes is not None
        try:
            await self.shared_nodes.sync(self.registry)
        except Exception as exc:  # redis errors, timeouts: logged by type only
            self.metrics.inc("registry_syncs_total", outcome="error")
            log.warning("node registry sync from Redis failed: %s", type(exc).__name__)
        else:
            self.metrics.inc("registry_syncs_total", outcome="ok")

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.config.registry_sync_interval))
            await self._sync_nodes()

    def keys(self) -> OhttpKeyRing:
        """The key ring, reloaded when ``gateway keys rotate`` changed the folder."""
        if self.ring.changed_on_disk():
            try:
                self.ring = OhttpKeyRing.load(self.config.state_dir)
            except OpenPCCError as exc:
                log.error("keeping the old OHTTP keys: %s", exc)
        return self.ring

    # -- public routes ----------------------------------------------------------------
    async def key_configs(self, _request: web.Request) -> web.Response:
        configs = self.keys().configs(time.time())
        self.metrics.set("ohttp_keys", len(configs))
        if not configs:
            return problem(503, "Service Unavailable", "no OHTTP key configured")
        self.metrics.inc("requests_total", route="keys", outcome="ok")
        return web.Response(
            body=encode_key_configs(configs),
            content_type=MEDIA_TYPE_KEYS,
            headers={"Cache-Control": f"public, max-age={self.config.keys_max_age}"},
        )

    async def readyz(self, _request: web.Request) -> web.Response:
        """Readiness: the issuer directory is loaded and the spent store answers.

        Without the directory every token is refused; without the spent store no token
        can be redeemed safely. Liveness (/healthz) stays 200 so a replica is not
        restarted just because Redis or the issuer is briefly away.
        """
        checks = {"issuer_directory": self.issuer.snapshot is not None, "spent_store": True}
        ping = getattr(self.spent, "ping", None)
        if ping is not None:
            try:
                async with asyncio.timeout(2.0):
                    checks["spent_store"] = bool(await ping())
            except Exception:
                checks["spent_store"] = False
        ok = all(checks.values())
        body = {"status": "ok" if ok else "unavailable", **checks}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        total, healthy = self.registry.counts()
        self.metrics.set("nodes", healthy, health="healthy")
        self.metrics.set("nodes", total - healthy, health="unhealthy")
        return await self.metrics.handler(request)

    async def ohttp(self, request: web.Request) -> web.StreamResponse:
        request[_T0] = time.perf_counter()
        ctype = request.content_type
        outcome = "ok"
        try:
            if ctype not in (MEDIA_TYPE_REQUEST, MEDIA_TYPE_CHUNKED_REQUEST):
                raise _Refusal(
                    problem(
                        415,
                        "Unsupported Media Type",
                        f"use {MEDIA_TYPE_REQUEST} or {MEDIA_TYPE_CHUNKED_REQUEST}",
                    ),
                    "unsupported_type",
                )
            length = request.content_length
            if length is not None and length > self.config.max_body:
                raise _Refusal(self._too_large(), "too_large")
            if ctype == MEDIA_TYPE_REQUEST:
                return await self._plain(request)
            return await self._chunked(request)
        except _Refusal as exc:
            outcome = exc.outcome
            return exc.response
        except asyncio.CancelledError:
            outcome = "client_aborted"
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome = "client_aborted"  # nobody left to answer; hand back what was started
            started = request.get(_RESPONSE)
            return started if started is not None else web.Response()
        finally:
            self.metrics.inc("requests_total", route="ohttp", outcome=outcome)

    def _too_large(self) -> web.Response:
        return problem(413, "Content Too Large", f"at most {self.config.max_body} bytes")

    @staticmethod
    def _ohttp_error(exc: OpenPCCError) -> _Refusal:
        if isinstance(exc, UnsupportedError):
            resp = problem(
                400,
                "Key configuration not acceptable",
                "unknown OHTTP key id or suite; refetch the key configuration",
                type=OHTTP_KEY_PROBLEM,
            )
            return _Refusal(resp, "bad_key_config")
        return _Refusal(
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
                    async with asyncio.timeout(self.config.client_timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise _Refusal(problem(408, "Request Timeout"), "client_timeout") from None
            if not chunk:
                return
            total += len(chunk)
            if total > self.config.max_body:
                raise _Refusal(self._too_large(), "too_large")
            audit.saw_body(request, chunk)
            self.metrics.inc("request_bytes_total", len(chunk))
            yield chunk

    async def _plain(self, request: web.Request) -> web.StreamResponse:
        body = bytearray()
        async for chunk in self._body_chunks(request):
            body += chunk
        t = time.perf_counter()
        try:
            inner, ctx = decapsulate_request(self.keys().private_keys(time.time()), bytes(body))
        except OpenPCCError as exc:
            raise self._ohttp_error(exc) from None
        self.trace.record("decapsulate", time.perf_counter() - t)
        sink = _PlainSink(self.config.max_plain_response)
        await self._inner(request, inner, sink)
        return web.Response(
            body=ctx.encapsulate_response(sink.encode()), content_type=MEDIA_TYPE_RESPONSE
        )

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        receiver = ChunkedRequestReceiver(self.keys().private_keys(time.time()))
        inner = bytearray()
        spent = 0.0  # decapsulation work only, not the wait for the body
        try:
            async for chunk in self._body_chunks(request):
                t = time.perf_counter()
                for piece in receiver.receive_data(chunk):
                    inner += piece
                spent += time.perf_counter() - t
                if len(inner) > MAX_INNER_REQUEST:
                    raise _Refusal(self._too_large(), "too_large")
            t = time.perf_counter()
            for piece in receiver.end_of_input():
                inner += piece
            spent += time.perf_counter() - t
        except OpenPCCError as exc:
            raise self._ohttp_error(exc) from None
        self.trace.record("decapsulate", spent)
        if len(inner) > MAX_INNER_REQUEST:
            raise _Refusal(self._too_large(), "too_large")
        sink = _ChunkedSink(request, receiver.response_sender())
        await self._inner(request, bytes(inner), sink)
        assert sink.response is not None
        return sink.response

    # -- inner routes -------------------------------------------------------------------
    async def _inner(self, request: web.Request, data: bytes, sink: _Sink) -> None:
        try:
            inner = bhttp.decode_request(data)
        except OpenPCCError:
            await sink.respond(*inner_problem(400, "Bad Request", "malformed Binary HTTP request"))
            return
        method, path = inner.method.decode(), inner.path.decode()
        if request.get(audit.AUDIT_KEY) is not None:
            # Everything the gateway learned by decapsulating; _infer adds model and
            # candidates. Only built when auditing (tests and demo): nobody reads it else.
            request[_INNER_NOTE] = {
                "method": method,
                "path": path,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in inner.headers],
                "content_length": len(inner.content),
            }
            audit.note(request, "inner", request[_INNER_NOTE])
        route = self._routes.get(path)
        if route is None:
            await sink.respond(*inner_problem(404, "Not Found", "unknown inner path"))
            return
        if method != route[0]:
            await sink.respond(
                *inner_problem(
                    405, "Method Not Allowed", f"use {route[0]}", [(b"allow", route[0].encode())]
                )
            )
            return
        await route[1](request, inner, sink)

    async def _nodes(self, _request: web.Request, _inner: bhttp.Request, sink: _Sink) -> None:
        doc = {
            "nodes": [
                {
                    "node_id": e.reg.node_id.hex(),
                    "public_key": e.reg.public_key.hex(),
                    "key_id": e.reg.key_id.hex(),
                    "models": list(e.reg.models),
                    "bundle": e.reg.bundle,
                }
                for e in self.registry.live()
            ],
            "issued_at": int(time.time()),
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        await sink.respond(200, [(b"content-type", b"application/json")], body)

    async def _issuer_directory(
        self, _request: web.Request, _inner: bhttp.Request, sink: _Sink
    ) -> None:
        snap = self.issuer.snapshot
        if snap is None:
            await sink.respond(
                *inner_problem(503, "Service Unavailable", "issuer directory not fetched yet")
            )
            return
        await sink.respond(200, [(b"content-type", DIRECTORY_MEDIA_TYPE.encode())], snap.raw)

    def _unauthorized(self, detail: str) -> tuple[int, list[bhttp.Field], bytes]:
        challenge = self.issuer.www_authenticate()
        extra = [(b"www-authenticate", challenge.encode())] if challenge else []
        return inner_problem(401, "Unauthorized", detail, extra)

    async def _redeem(self, inner: bhttp.Request) -> tuple[int, list[bhttp.Field], bytes] | None:
        """Check and spend the token; None when accepted, else the inner error response."""
        auth = [v for k, v in inner.headers if k == b"authorization"]
        if len(auth) != 1:
            self.metrics.inc("redemptions_total", outcome="missing")
            return self._unauthorized("send exactly one Authorization: PrivateToken header")
        if self.issuer.snapshot is None:
            self.metrics.inc("redemptions_total", outcome="no_directory")
            return inner_problem(503, "Service Unavailable", "issuer directory unavailable")
        try:
            token = parse_authorization_token(auth[0].decode("latin-1"))
        except OpenPCCError:
            self.metrics.inc("redemptions_total", outcome="malformed")
            return self._unauthorized("malformed or unsupported PrivateToken")
        key = await self.issuer.key_for(token.token_key_id)
        if key is None:
            self.metrics.inc("redemptions_total", outcome="unknown_key")
            return self._unauthorized("token issued under a key the issuer does not list")
        try:
            issuance.verify_token(key, token, expected_challenge=self.issuer.challenge_bytes)
        except OpenPCCError:
            self.metrics.inc("redemptions_total", outcome="invalid")
            return self._unauthorized("token is for another challenge or its signature is bad")
        try:
            fresh = await self.spent.mark_spent(
                token.token_key_id, token.nonce, self.config.spent_ttl
            )
        except Exception as exc:  # the store is down: refuse rather than risk double spend
            log.error("spent-token store failed: %s", type(exc).__name__)
            self.metrics.inc("redemptions_total", outcome="store_error")
            return inner_problem(503, "Service Unavailable", "token store unavailable")
        if not fresh:
            self.metrics.inc("redemptions_total", outcome="spent")
            return self._unauthorized("token already spent")
        self.metrics.inc("redemptions_total", outcome="ok")
        return None

    async def _infer(self, request: web.Request, inner: bhttp.Request, sink: _Sink) -> None:
        ctypes = [v for k, v in inner.headers if k == b"content-type"]
        if ctypes != [sealed.REQUEST_MEDIA_TYPE.encode()]:
            await sink.respond(
                *inner_problem(
                    400, "Bad Request", "content-type must be " + sealed.REQUEST_MEDIA_TYPE
                )
            )
            return
        envelope = inner.content
        if len(envelope) > MAX_ENVELOPE:
            await sink.respond(
                *inner_problem(413, "Content Too Large", f"envelope over {MAX_ENVELOPE} bytes")
            )
            return
        t = time.perf_counter()
        refused = await self._redeem(inner)
        self.trace.record("redeem", time.perf_counter() - t)
        if refused is not None:
            await sink.respond(*refused)
            return
        try:
            header = sealed.parse_envelope_header(envelope)
        except OpenPCCError:
            await sink.respond(*inner_problem(400, "Bad Request", "malformed sealed envelope"))
            return
        wanted = [(c.node_id, c.key_id) for c in header.candidates]
        note = request.get(_INNER_NOTE)
        if note is not None:
            note["model"] = header.model
            note["candidates"] = [c.node_id.hex() for c in header.candidates]
        usable = self.registry.candidates(header.model, wanted)
        if len(usable) > 1:
            _RANDOM.shuffle(usable)
        for reg in usable:
            if await self._forward(request, reg, envelope, sink):
                if note is not None:
                    note["served_by"] = reg.node_id.hex()
                return
        self.metrics.inc("node_attempts_total", outcome="none_left")
        await sink.respond(
            *inner_problem(503, "Service Unavailable", "no usable candidate node for this request")
        )

    async def _forward(
        self, request: web.Request, reg: Registration, envelope: bytes, sink: _Sink
    ) -> bool:
        """Try one node. False if it failed before its first byte (the caller tries the next)."""
        assert self.session is not None
        self.trace.record("upstream_sent", time.perf_counter() - request.get(_T0, 0.0))
        try:
            async with asyncio.timeout(self.config.node_first_byte_timeout):
                resp = await self.session.post(
                    reg.url + "/v1/sealed",
                    data=envelope,
                    headers={"Content-Type": sealed.REQUEST_MEDIA_TYPE},
                    allow_redirects=False,
                )
                try:
                    ok = resp.status == 200 and resp.content_type == sealed.RESPONSE_MEDIA_TYPE
                    first = await resp.content.readany() if ok else b""
                except BaseException:
                    resp.close()
                    raise
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
            self.registry.mark_unreachable(reg.node_id)
            self.metrics.inc("node_attempts_total", outcome="unreachable")
            return False
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.metrics.inc("node_attempts_total", outcome="failed_before_first_byte")
            return False
        if not first:
            resp.close()
            self.metrics.inc("node_attempts_total", outcome=f"refused_{resp.status // 100}xx")
            return False
        # Committed: from here on every byte goes straight to the client.
        self.metrics.inc("node_attempts_total", outcome="streaming")
        trace, t0 = self.trace, request.get(_T0, 0.0)
        t, c = time.perf_counter(), trace.cpu()
        trace.record("upstream_wait", t - t0)
        clean = False
        try:
            await sink.start(200, [(b"content-type", sealed.RESPONSE_MEDIA_TYPE.encode())])
            chunk = first
            while chunk:
                self.metrics.inc("response_bytes_total", len(chunk))
                # The node's answer is complete: its end follows without waiting.
                await sink.write(chunk, more=resp.content.at_eof())
                now = time.perf_counter()
                if t0:
                    trace.record("first_out", now - t0)
                else:
                    cpu = trace.cpu() - c  # read before either line is written
                    trace.record("chunk", now - t)
                    trace.record("chunk_cpu", cpu)
                t0 = 0.0
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, TimeoutError, OSError):
                    break
                t, c = time.perf_counter(), trace.cpu()
            else:
                clean = True
        except _NodeStreamError:
            pass
        finally:
            resp.close()
        if not clean:
            self.metrics.inc("node_attempts_total", outcome="died_mid_stream")
            log.info(
                "node %s stopped mid-stream; client will see a truncated answer",
                reg.node_id.hex()[:8],
            )
        await sink.end()
        return True

    # -- internal routes ----------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        outcome = "ok"
        try:
            value = request.headers.get("Authorization", "")
            scheme, _, secret = value.partition(" ")
            expected = self.config.registration_secret.encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                secret.strip().encode(), expected
            ):
                outcome = "unauthorized"
                resp = problem(401, "Unauthorized", "bad registration secret")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="openpcc-gateway"'
                return resp
            if request.content_type != "application/json":
                outcome = "bad_request"
                return problem(415, "Unsupported Media Type", "use application/json")
            body = await read_at_most(request.content, MAX_REGISTRATION_BYTES)
            if len(body) > MAX_REGISTRATION_BYTES:
                outcome = "too_large"
                return problem(413, "Content Too Large")
            try:
                reg = parse_registration(body)
            except RegistrationError as exc:  # its message names the field, never a value
                outcome = "bad_request"
                return problem_for(exc, str(exc))
            if self.shared_nodes is not None:
                # Redis first: a registration only this replica knew would not reach
                # the others, and the node would not know to retry.
                try:
                    await self.shared_nodes.put(reg, body, self.registry.ttl)
                except RegistryFullError as exc:
                    outcome = "full"
                    return problem_for(exc, "node registry is full")
                except Exception as exc:
                    outcome = "unavailable"
                    log.warning("node registry write to Redis failed: %s", type(exc).__name__)
                    return problem(503, "Service Unavailable", "node registry unavailable")
            if not self.registry.register(reg):
                outcome = "full"
                return problem(503, "Service Unavailable", "node registry is full")
            return web.json_response(
                {"status": "registered", "key_id": reg.key_id.hex(), "ttl": self.registry.ttl}
            )
        finally:
            self.metrics.inc("registrations_total", outcome=outcome)


def create_public_app(gw: Gateway) -> web.Application:
    middlewares = [gw.audit_log.middleware()] if gw.audit_log is not None else []
    # client_max_size is not used (bodies are streamed); the limit is enforced while reading.
    app = web.Application(middlewares=middlewares)
    app.router.add_get(WELL_KNOWN_KEYS, gw.key_configs)
    app.router.add_post(GATEWAY_PATH, gw.ohttp)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.metrics_handler)
    return app


def create_internal_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=MAX_REGISTRATION_BYTES + 1024)
    app.router.add_post(REGISTER_PATH, gw.register)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gw.readyz)
    return app


def build_gateway(
    config: GatewayConfig,
    *,
    issuer_url: str,
    issuer_name: str,
    redis_url: str | None = None,
    redis_prefix: str = DEFAULT_PREFIX,
    node_ttl: float = 30.0,
    health_interval: float = 5.0,
    audit_path: Path | None = None,
) -> Gateway:
    from gateway.keys import ensure_key
    from gateway.spent import open_spent_store

    return Gateway(
        config=config,
        ring=ensure_key(config.state_dir),
        spent=open_spent_store(config.state_dir, redis_url, redis_prefix),
        issuer=IssuerDirectoryCache(issuer_url, issuer_name),
        registry=NodeRegistry(ttl=node_ttl, health_interval=health_interval),
        audit_log=AuditLog(audit_path, "gateway") if audit_path else None,
        shared_nodes=RedisNodeStore(redis_url, redis_prefix) if redis_url else None,
    )
