"""The node's HTTP service: ``POST /v1/sealed``, ``GET /healthz`` (alive), ``GET /readyz``
(engine ready), ``GET /metrics``.

The node is the only party that sees prompts, so this is where content must stay in
memory and out of every log. Statuses the gateway can read (cleartext) say only
whether the envelope opened and whether the engine is up; everything about the inner
request, including why it was refused, travels sealed to the client (docs/node.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import inspect
import json
import logging
import math
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed25519

from node.engine import Engine
from node.evidence import EvidenceSource, make_claims
from node.policy import Forward, Rejected, RequestLimits, check_request
from node.register import Registrar, RegistrationConfig
from openpcc import audit
from openpcc.admission import sign_registration
from openpcc.attestation.claims import Claims
from openpcc.errors import OpenPCCError
from openpcc.forwarding import (
    CLIENT_WINDOW,
    FORWARD_HEADER,
    SENT_AT_HEADER,
    ForwardAuthError,
    ReplayCache,
    forward_key,
    verify_forward,
)
from openpcc.service.http import Metrics, problem
from openpcc.service.limits import ServeSettings
from openpcc.service.serve import Listener, serve
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp, hpke, sealed

log = logging.getLogger("openpcc.node")

PROBLEM_JSON = b"application/problem+json"
CACHE_SALT_BYTES = 32  # 64 hex characters; vLLM allows up to 128 without '/', '@', '\\'
CACHE_SALT_LABEL = b"openpcc cache salt v1\x00"
NODE_ID_HEADER = b"openpcc-node-id"
_T0 = "openpcc.node.t0"  # when the handler started (stage trace)


@dataclass(frozen=True)
class NodeConfig:
    node_id: bytes  # 16 bytes
    model_name: str
    model_digest: bytes  # 32 bytes, into the claims
    release_id: str
    public_url: str
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_envelope: int = 2 * 1024 * 1024
    max_concurrency: int = 64
    engine_connect_timeout: float = 5.0
    engine_read_timeout: float = 300.0
    claims_lifetime: int = 3600
    # The admission credential: with it, only envelopes a gateway forwarded (and signed
    # with this node's key) are opened, each once (openpcc/forwarding.py). Without it (no
    # gateway configured) the node has no way to tell a gateway from anyone else.
    forward_secret: str | None = None
    # Open sealed requests v1 (X25519 only) from clients older than v2; the deprecation
    # period is in docs/PROTOCOL.md. Clients of this release send v2 to this node.
    accept_sealed_v1: bool = True

    def __post_init__(self) -> None:
        if len(self.node_id) != sealed.NODE_ID_LEN:
            raise ValueError(f"node id must be {sealed.NODE_ID_LEN} bytes")
        if len(self.model_digest) != 32:
            raise ValueError("model digest must be 32 bytes")


def _sent_recently(inner: bhttp.Request, now: float) -> bool:
    """The client's ``openpcc-sent-at`` (inside the encryption) is within CLIENT_WINDOW."""
    values = [v for k, v in inner.headers if k.lower() == SENT_AT_HEADER]
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 12:
        return False
    return abs(now - int(values[0])) <= CLIENT_WINDOW


LOAD_INTERVAL = 1.0
_WAITING = ("vllm:num_requests_waiting",)
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # new name, old name


def engine_load(metrics_text: str) -> dict[str, float]:
    """``waiting`` (requests queued) and ``kv_cache_usage`` (0..1) from vLLM's Prometheus
    text, summed over its label sets; zeros for what is missing."""
    waiting, kv = 0.0, 0.0
    for line in metrics_text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _WAITING or name in _KV_USAGE:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            if not math.isfinite(value):
                continue
            if name in _WAITING:
                waiting += value
            else:
                kv = max(kv, value)
    return {"waiting": int(waiting), "kv_cache_usage": round(min(max(kv, 0.0), 1.0), 4)}


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class NodeService:
    """The node's state: its key (memory only), its evidence, its engine link."""

    def __init__(
        self,
        config: NodeConfig,
        engine: Engine,
        evidence: EvidenceSource,
        *,
        registration: RegistrationConfig | Sequence[RegistrationConfig] | None = None,
        external_engine: bool = False,
        health_interval: float = 5.0,
    ) -> None:
        self.config = config
        self._forward_key = (
            forward_key(config.forward_secret, config.node_id) if config.forward_secret else None
        )
        self._replays = ReplayCache()
        self.external_engine = external_engine
        self.health_interval = health_interval
        self.exit_code = 0
        self.engine = engine
        self.evidence = evidence
        pair = hpke.generate_key_pair()
        pq_pair = hpke.generate_key_pair(kem_id=hpke.KEM_XWING)
        # Keep only the key objects: the raw private bytes are never stored or written.
        self._private_key = hpke.load_private_key(pair.private_key)
        self.public_key = pair.public_key
        self.key_id = sealed.key_id_for(self.public_key)
        # X-Wing for sealed requests v2 (post-quantum); committed to by the claims too.
        self._pq_private_key = hpke.load_private_key(pq_pair.private_key, kem_id=hpke.KEM_XWING)
        self.pq_public_key = pq_pair.public_key
        self.pq_key_id = sealed.key_id_for(self.pq_public_key)
        del pair, pq_pair
        # Per boot, in memory only, committed to by the claims: registrations signed with
        # it are this attested node's (openpcc/admission.py).
        self._signing_key = ed25519.Ed25519PrivateKey.generate()
        self._cache_key = secrets.token_bytes(32)  # per boot: keys cache namespaces
        # Inside every sealed response head: which node answered (the client's affinity).
        self._node_id_header = (NODE_ID_HEADER, config.node_id.hex().encode())
        self.signing_key = self._signing_key.public_key().public_bytes_raw()
        self._claims: Claims | None = None
        self._bundle: dict[str, Any] | None = None
        self._bundle_lock = asyncio.Lock()
        self._inflight = 0
        self._session: aiohttp.ClientSession | None = None
        self._engine_task: asyncio.Task[Any] | None = None
        self._load_task: asyncio.Task[Any] | None = None
        self._engine_load: dict[str, float] = {"waiting": 0, "kv_cache_usage": 0.0}
        self.metrics = Metrics("openpcc_node")
        self.trace = StageTrace("node")
        self.metrics.describe("sealed_requests_total", "sealed requests by outcome")
        self.metrics.describe(
            "sealed_versions_total", "sealed requests addressed to this node, by envelope version"
        )
        self.metrics.describe("registrations_total", "successful gateway registrations")
        if isinstance(registration, RegistrationConfig):
            registration = [registration]
        # One heartbeat per gateway replica: each replica keeps its own registry.
        self.registrars = [
            Registrar(r, self.registration_document, self.engine_ready, self.sign_registration)
            for r in registration or ()
        ]
        self.registrar = self.registrars[0] if self.registrars else None

    # ------------------------------------------------------------------ evidence

    def engine_ready(self) -> bool:
        return self.engine.ready.is_set()

    async def bundle(self) -> dict[str, Any]:
        """The current bundle, re-issued once half its lifetime has passed."""
        async with self._bundle_lock:
            now = time.time()
            c = self._claims
            if c is None or self._bundle is None or now >= (c.issued_at + c.expires_at) / 2:
                claims = make_claims(
                    node_id=self.config.node_id.hex(),
                    public_key=self.public_key,
                    tee=self.evidence.tee,
                    model_digest=self.config.model_digest,
                    release_id=self.config.release_id,
                    lifetime=self.config.claims_lifetime,
                    signing_key=self.signing_key,
                    pq_public_key=self.pq_public_key,
                    now=now,
                )
                self._bundle = await asyncio.to_thread(self.evidence.bundle, claims)
                self._claims = claims
            return self._bundle

    def cache_salt(self, client_salt: bytes | None) -> str:
        """vLLM's prefix-cache namespace for one request: the client's conversation scope
        keyed by this boot's secret (a client cannot name a namespace of its choosing, and
        none outlives the boot), or a fresh one per request when the client gave none."""
        if client_salt is None:
            return secrets.token_hex(CACHE_SALT_BYTES)
        return hmac.new(self._cache_key, CACHE_SALT_LABEL + client_salt, hashlib.sha256).hexdigest()

    def sign_registration(self, body: bytes) -> str:
        return sign_registration(self._signing_key, body)

    async def registration_document(self) -> dict[str, Any]:
        return {
            "node_id": self.config.node_id.hex(),
            "url": self.config.public_url,
            "public_key": self.public_key.hex(),
            "models": [self.config.model_name],
            "bundle": await self.bundle(),
        }

    # ------------------------------------------------------------------ lifecycle

    async def on_startup(self, _app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.engine_connect_timeout,
            sock_read=self.config.engine_read_timeout,
        )
        # The engine is on loopback: no proxies from the environment, no cookies kept.
        self._session = aiohttp.ClientSession(
            timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )
        self._engine_task = asyncio.create_task(self._run_engine(), name="node-engine")
        self._load_task = asyncio.create_task(self._watch_load(), name="node-load")
        await self.bundle()  # fail at start, not at the first heartbeat

    def on_bound(self, host: str, port: int, *, derive_url: bool) -> None:
        """Register only once listening (a gateway checks the node's health right away),
        and with the port the socket got when none was given (``--port 0``)."""
        if derive_url:
            url = f"http://{host}:{port}"
            self.config = dataclasses.replace(self.config, public_url=url)
        log.info("node listening on %s:%d, registering as %s", host, port, self.config.public_url)
        for registrar in self.registrars:
            registrar.start()

    async def _run_engine(self) -> None:
        """Start the engine, then watch it for as long as the node runs.

        A supervised vLLM that cannot start, or gives up restarting, ends the node
        with exit status 1 (its own supervisor should see that). An external engine is
        someone else's to run: the node keeps waiting for it and tracks its health.
        """
        supervised = not self.external_engine
        while True:
            try:
                await _maybe_await(self.engine.start())
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("engine did not start: %s", str(exc).splitlines()[0] if str(exc) else "")
                if supervised:
                    self._fatal()
                    return
                await asyncio.sleep(2.0)
        log.info("engine ready at %s", self.engine.url)
        misses = 0
        while True:
            await asyncio.sleep(self.health_interval)
            if getattr(self.engine, "failed", None) is not None:
                log.error("engine supervisor gave up; stopping the node")
                self._fatal()
                return
            if not supervised:
                ok = await self.engine.healthy()
                misses = 0 if ok else misses + 1
                if ok and not self.engine.ready.is_set():
                    log.info("engine answers again")
                    self.engine.ready.set()
                elif misses >= 2 and self.engine.ready.is_set():
                    log.warning("engine stopped answering")
                    self.engine.ready.clear()

    async def _watch_load(self) -> None:
        """Every second, the engine's queue and KV-cache use from its /metrics (vLLM);
        an engine without them reports zeros."""
        assert self._session is not None
        while True:
            await asyncio.sleep(LOAD_INTERVAL)
            if not self.engine_ready():
                continue
            try:
                async with asyncio.timeout(2.0):
                    async with self._session.get(self.engine.url.rstrip("/") + "/metrics") as r:
                        text = (await r.read()).decode("utf-8", "replace") if r.ok else ""
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            self._engine_load = engine_load(text)

    def _fatal(self) -> None:
        self.exit_code = 1
        signal.raise_signal(signal.SIGTERM)  # run_app's graceful shutdown, then exit 1

    async def on_cleanup(self, _app: web.Application) -> None:
        for registrar in self.registrars:
            await registrar.stop()
        for task in (self._engine_task, self._load_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await _maybe_await(self.engine.stop())
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ handlers

    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness: the process answers (200 while the engine starts, too)."""
        return web.json_response({"status": "ok", "engine": self._engine_state()})

    async def readyz(self, _request: web.Request) -> web.Response:
        """Readiness: the engine answers, so a sealed request can be served. This is what
        each gateway's health check asks before it routes here.

        Registration is reported, not required: a gateway that is down must not make the
        node unready for the others (``registered`` counts the gateways that took it)."""
        ok = self.engine_ready()
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "engine": self._engine_state(),
            "node_id": self.config.node_id.hex(),  # gateways check they reached this node
        }
        if self.registrars:
            body["registered"] = sum(1 for r in self.registrars if r.registered > 0)
            body["gateways"] = len(self.registrars)
        # Aggregate load for the gateways' routing (docs/PROTOCOL.md): nothing per request.
        body["load"] = {"inflight": self._inflight, **self._engine_load}
        if not ok:
            body["reason"] = self.engine.problem or "the engine is not ready"
        return web.json_response(body, status=200 if ok else 503)

    def _engine_state(self) -> str:
        return "ready" if self.engine_ready() else "not ready"

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self.metrics.set("engine_ready", 1 if self.engine_ready() else 0)
        self.metrics.set("inflight", self._inflight)
        if self.registrars:
            self.metrics.set("registrations", sum(r.registered for r in self.registrars))
            self.metrics.set("registration_failures", sum(r.failures for r in self.registrars))
        return await self.metrics.handler(request)

    def _count(self, outcome: str) -> None:
        self.metrics.inc("sealed_requests_total", outcome=outcome)

    def _count_version(self, version: int) -> None:
        # How much v1 traffic is left: the input for ending its deprecation period.
        self.metrics.inc("sealed_versions_total", version=str(version))

    async def sealed_handler(self, request: web.Request) -> web.StreamResponse:
        request[_T0] = time.perf_counter()
        if not self.engine_ready():
            self._count("engine_not_ready")
            return problem(503, "engine not ready")
        if self._inflight >= self.config.max_concurrency:
            self._count("busy")
            return problem(503, "node busy")
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != sealed.REQUEST_MEDIA_TYPE:
            self._count("bad_media_type")
            return problem(415, "unsupported media type")
        self._inflight += 1
        try:
            return await self._sealed(request)
        finally:
            self._inflight -= 1

    async def _read_envelope(self, request: web.Request) -> bytes | None:
        limit = self.config.max_envelope
        if request.content_length is not None and request.content_length > limit:
            return None
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            audit.saw_body(request, chunk)
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    async def _sealed(self, request: web.Request) -> web.StreamResponse:
        envelope = await self._read_envelope(request)
        if envelope is None:
            self._count("too_large")
            return problem(413, "envelope too large")
        if self._forward_key is not None:
            try:
                verify_forward(
                    self._forward_key, envelope, request.headers.get(FORWARD_HEADER), time.time()
                )
            except ForwardAuthError as exc:
                self._count("not_forwarded")
                return problem(exc.status_hint, str(exc))
        # Cleartext answers from here on say only "not for this key" or "did not open".
        try:
            header = sealed.parse_envelope_header(envelope)
        except OpenPCCError:
            self._count("malformed")
            return problem(400, "malformed sealed request")
        v2 = header.version is sealed.V2
        if not v2 and not self.config.accept_sealed_v1:
            self._count("version_refused")
            return problem(400, "sealed request v1 (X25519) is no longer accepted; use v2")
        key_id = self.pq_key_id if v2 else self.key_id
        mine = [c for c in header.candidates if c.node_id == self.config.node_id]
        if not mine or mine[0].key_id != key_id:
            self._count("not_candidate")
            return problem(421, "not a candidate for this request")
        self._count_version(header.version.number)
        t = time.perf_counter()
        try:
            opened = sealed.open_request(
                envelope,
                self.config.node_id,
                self._pq_private_key if v2 else self._private_key,
                self.pq_public_key if v2 else self.public_key,
            )
        except Exception:  # any failure to open is the same 400: no oracle on why
            self._count("does_not_open")
            return problem(400, "sealed request does not open")
        self.trace.record("unseal", time.perf_counter() - t)
        del envelope

        sealer = opened.sealer
        try:
            inner = bhttp.decode_request(opened.bhttp_request)
        except OpenPCCError:
            self._count("rejected")
            return await self._sealed_problem(request, sealer, 400, "malformed inner request")
        now = time.time()
        if not _sent_recently(inner, now):
            self._count("stale")
            return await self._sealed_problem(
                request, sealer, 400, f"{SENT_AT_HEADER.decode()} missing or not within "
                f"{CLIENT_WINDOW} s of the node's clock",
            )  # fmt: skip
        if self._forward_key is not None and self._replays.seen(header.request_nonce, now):
            # The same envelope within the window: the engine must not run twice for it.
            self._count("replayed")
            return problem(409, "envelope already answered")
        try:
            fwd = check_request(
                inner,
                served_model=self.config.model_name,
                envelope_model=opened.model,
                limits=self.config.limits,
            )
        except Rejected as rej:
            audit.note(request, "inner", _inner_view(inner, None))
            self._count("rejected")
            return await self._sealed_problem(request, sealer, rej.status, rej.title)
        audit.note(request, "inner", _inner_view(inner, fwd))
        return await self._forward(request, sealer, fwd)

    async def _sealed_problem(
        self, request: web.Request, sealer: sealed.ResponseSealer, status: int, title: str
    ) -> web.StreamResponse:
        """A refusal only the client can read: outer 200, inner ``status`` + problem JSON."""
        doc = json.dumps({"type": "about:blank", "title": title, "status": status}).encode()
        head = [(b"content-type", PROBLEM_JSON), self._node_id_header]
        body = sealer.head(status, head) + sealer.end(doc)
        return web.Response(
            status=200,
            body=body,
            headers={"Content-Type": sealed.RESPONSE_MEDIA_TYPE, "Cache-Control": "no-store"},
        )

    async def _forward(
        self, request: web.Request, sealer: sealed.ResponseSealer, fwd: Forward
    ) -> web.StreamResponse:
        assert self._session is not None
        kwargs: dict[str, Any] = {}
        if fwd.body is not None:
            body = dict(fwd.body)
            body["cache_salt"] = self.cache_salt(fwd.salt)
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        url = self.engine.url.rstrip("/") + fwd.path
        self.trace.record("upstream_sent", time.perf_counter() - request[_T0])
        try:
            resp = await self._session.request(fwd.method, url, **kwargs)
        except (aiohttp.ClientError, TimeoutError, OSError):
            # Before the first byte: cleartext 503, so the gateway tries the next candidate.
            self._count("engine_unavailable")
            return problem(503, "engine unavailable")
        try:
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
            out = web.StreamResponse(
                status=200,
                headers={"Content-Type": sealed.RESPONSE_MEDIA_TYPE, "Cache-Control": "no-store"},
            )
            trace, t0 = self.trace, request[_T0]
            trace.record("upstream_wait", time.perf_counter() - t0)
            await out.prepare(request)
            head = [(b"content-type", ctype.encode("latin-1")), self._node_id_header]
            await out.write(sealer.head(resp.status, head))
            trace.record("first_out", time.perf_counter() - t0)
            try:
                async for chunk in resp.content.iter_any():
                    if t0:
                        trace.record("engine_first_data", time.perf_counter() - t0)
                        t0 = 0.0
                    t, c = time.perf_counter(), trace.cpu()
                    await out.write(sealer.data(chunk))
                    wall, cpu = time.perf_counter() - t, trace.cpu() - c
                    trace.record("chunk", wall)  # both read before either line is written
                    trace.record("chunk_cpu", cpu)
            except (aiohttp.ClientError, TimeoutError, OSError):
                # Engine died mid-stream: no end-of-stream chunk, and the connection is
                # cut, so the client reports truncation rather than a short answer.
                self._count("engine_failed_mid_stream")
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write(sealer.end())
            await out.write_eof()
            self._count("ok" if resp.status < 400 else "engine_error")
            return out
        finally:
            resp.close()  # also what tells vLLM to abort if the client went away


def _inner_view(inner: bhttp.Request, fwd: Forward | None) -> dict[str, Any]:
    """For the audit log only: what the node learned from the unsealed request."""
    view: dict[str, Any] = {
        "method": inner.method.decode("latin-1"),
        "path": inner.path.decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in inner.headers],
    }
    if fwd is not None and fwd.body is not None:
        view["json"] = fwd.body
    else:
        view["content_hex"] = inner.content.hex()
    return view


SERVICE_KEY = web.AppKey("openpcc.node", NodeService)


def build_app(service: NodeService, *, audit_log: Path | None = None) -> web.Application:
    middlewares = [audit.AuditLog(audit_log, "node").middleware()] if audit_log else []
    app = web.Application(middlewares=middlewares, client_max_size=service.config.max_envelope)
    app[SERVICE_KEY] = service
    app.router.add_post("/v1/sealed", service.sealed_handler)
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", service.readyz)
    app.router.add_get("/metrics", service.metrics_handler)
    app.on_startup.append(service.on_startup)
    app.on_cleanup.append(service.on_cleanup)
    return app


def run(
    service: NodeService,
    *,
    host: str,
    port: int,
    settings: ServeSettings | None = None,
    derive_url: bool = False,
    audit_log: Path | None = None,
    shutdown_timeout: float = 30.0,
) -> int:
    """Serve until SIGINT/SIGTERM; cleanup stops the engine (the whole vLLM group).

    On SIGTERM the listener closes first and in-flight sealed streams get
    ``shutdown_timeout`` seconds to finish before the engine is stopped.
    """
    return serve(
        [Listener(build_app(service, audit_log=audit_log), host, port)],
        settings=settings or ServeSettings(),
        on_bound=lambda ports: service.on_bound(host, ports["public"], derive_url=derive_url),
        shutdown_timeout=shutdown_timeout,
        exit_code=lambda: service.exit_code,
        handler_cancellation=True,  # a gateway that leaves aborts the engine request
    )
