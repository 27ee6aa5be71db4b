"""The OHTTP gateway: decapsulate, redeem the token, route the sealed request, stream back.

What the gateway may learn (DESIGN.md §1): the one-time token, the model name, the
candidate node ids and ciphertext sizes. It never sees the client's address (the relay
connects, not the client), an account, the prompt or the answer (sealed to the node).
So: no access log, log lines carry outcomes only, metrics are aggregate counters, and
the audit log (``--audit-log``, tests and demo only) records exactly what arrived.

Layout: ``outer.py`` (the OHTTP layer, one ``Exchange`` per request), ``redeem.py``
(tokens), ``forward.py`` (routing and streaming to nodes); this module holds the state,
the lifecycle, the inner routes and node registration.

Two listeners: the public one (``/.well-known/ohttp-gateway``, ``/gateway``, health,
metrics) that the relay reaches, and an internal one (``/internal/nodes``) that only
nodes reach. A node is listed only with an admission credential, at a URL inside the
node networks, with a bundle that verifies under the operator's trust policy, and
signed by the key its attested claims carry (gateway/admission.py).

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
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from gateway.admission import LOOPBACK, Admission, PolicyFile, parse_networks
from gateway.config import GatewayConfig
from gateway.forward import Forwarder
from gateway.issuerdir import IssuerDirectoryCache
from gateway.keys import OhttpKeyRing
from gateway.limits import DEFAULT_MAX_BODY
from gateway.nodeclient import NodeClient
from gateway.nodestore import RedisNodeStore
from gateway.outer import (
    Exchange,
    OuterLayer,
    OuterLimits,
    Sink,
    inner_problem,
)
from gateway.redeem import Redeemer
from gateway.registry import MAX_REGISTRATION_BYTES, NodeRegistry, Registration
from gateway.spent import SpentStore
from gateway.tally import Tally
from openpcc import audit
from openpcc.admission import SIGNATURE_HEADER, CredentialStore
from openpcc.audit import AuditLog
from openpcc.bodies import read_at_most
from openpcc.errors import OpenPCCError
from openpcc.privacypass.directory import MEDIA_TYPE as DIRECTORY_MEDIA_TYPE
from openpcc.service.http import Metrics, healthz, problem, problem_for
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp
from openpcc.wire.ohttp import MEDIA_TYPE_KEYS, encode_key_configs

log = logging.getLogger("openpcc.gateway")

WELL_KNOWN_KEYS = "/.well-known/ohttp-gateway"
GATEWAY_PATH = "/gateway"
REGISTER_PATH = "/internal/nodes"
__all__ = ["Gateway", "GatewayConfig", "build_gateway"]


@dataclass
class Gateway:
    config: GatewayConfig
    ring: OhttpKeyRing
    spent: SpentStore
    issuer: IssuerDirectoryCache
    registry: NodeRegistry
    admission: Admission
    audit_log: AuditLog | None = None
    # With --redis: registrations go to Redis and every replica mirrors it (nodestore.py).
    shared_nodes: RedisNodeStore | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics("openpcc_gateway"))
    client: NodeClient | None = None  # to the nodes (gateway/nodeclient.py)
    trace: StageTrace = field(default_factory=lambda: StageTrace("gateway"))

    def __post_init__(self) -> None:
        self.metrics.collect(self._node_gauges)
        self.tally = Tally(self.metrics)  # per-request counts, handed to metrics on render
        self.metrics.collect(self.tally.flush)
        self.redeemer = Redeemer(
            self.issuer, self.spent, self.metrics, self.config.spent_ttl, tally=self.tally
        )
        self.forwarder = Forwarder(
            self.registry,
            self.redeemer,
            self.metrics,
            self.trace,
            self.config.node_first_byte_timeout,
            forward_secret=self._forward_secret,
            affinity_slack=self.config.affinity_slack,
            tally=self.tally,
        )
        limits = OuterLimits(
            self.config.max_body or DEFAULT_MAX_BODY,
            self.config.client_timeout,
            self.config.max_plain_response,
        )
        self.outer = OuterLayer(
            limits, self.keys, self._inner, self.metrics, self.trace, tally=self.tally
        )
        self._routes = {
            "/v1/nodes": ("GET", self._nodes),
            "/v1/issuer-directory": ("GET", self._issuer_directory),
            "/v1/release-manifest": ("GET", self._release_manifest),
            "/v1/infer": ("POST", self.forwarder.infer),
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
        # Forward the envelope and nothing else: no agent string, no cookies, no proxies.
        self.client = NodeClient(self.config.node_connect_timeout, self.config.node_read_timeout)
        self.forwarder.client = self.client
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
        if self.client is not None:
            await self.client.close()
        await self.spent.close()

    def _forward_secret(self, reg: Registration) -> bytes | None:
        """The credential a node was admitted with keys its forwards (openpcc/forwarding).
        Per request, so no file look-up: registrations keep the credentials current."""
        cred = self.admission.credentials.known(reg.credential)
        return cred.token.encode() if cred is not None else None

    async def _sync_nodes(self) -> None:
        """Mirror the shared registry; on failure keep routing with the last copy.

        Entries then run out on their own heartbeat expiry, as they would if the nodes
        had stopped: no node is kept alive by a Redis outage.
        """
        assert self.shared_nodes is not None
        try:
            await self.shared_nodes.sync(self.registry, self.admission.recheck)
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
                self.ring = OhttpKeyRing.load(self.config.state_dir, kems=self.ring.kems)
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

    def _node_gauges(self) -> None:
        total, healthy = self.registry.counts()
        self.metrics.set("nodes", healthy, health="healthy")
        self.metrics.set("nodes", total - healthy, health="unhealthy")

    # -- inner routes -------------------------------------------------------------------
    async def _inner(self, ex: Exchange, data: bytes, sink: Sink) -> None:
        try:
            inner = bhttp.decode_request(data)
        except OpenPCCError:
            await sink.respond(*inner_problem(400, "Bad Request", "malformed Binary HTTP request"))
            return
        method, path = inner.method.decode(), inner.path.decode()
        if ex.request.get(audit.AUDIT_KEY) is not None:
            # Everything the gateway learned by decapsulating; infer adds model and
            # candidates. Only built when auditing (tests and demo): nobody reads it else.
            ex.note = {
                "method": method,
                "path": path,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in inner.headers],
                "content_length": len(inner.content),
            }
            audit.note(ex.request, "inner", ex.note)
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
        await route[1](ex, inner, sink)

    async def _nodes(self, _ex: Exchange, _inner: bhttp.Request, sink: Sink) -> None:
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

    async def _issuer_directory(self, _ex: Exchange, _inner: bhttp.Request, sink: Sink) -> None:
        snap = self.issuer.snapshot
        if snap is None:
            await sink.respond(
                *inner_problem(503, "Service Unavailable", "issuer directory not fetched yet")
            )
            return
        await sink.respond(200, [(b"content-type", DIRECTORY_MEDIA_TYPE.encode())], snap.raw)

    async def _release_manifest(self, _ex: Exchange, inner: bhttp.Request, sink: Sink) -> None:
        """The signed manifest this gateway admits nodes under, for clients to refresh
        theirs through the relay before it expires. Clients verify it against their own
        pinned release key and serial; the gateway only hands the bytes out (ETag: their
        SHA-256, so an unchanged manifest costs a 304)."""
        try:
            self.admission.policy.current(time.time())  # the one in use, still valid
            data = self.admission.policy.raw
        except OpenPCCError:
            await sink.respond(
                *inner_problem(503, "Service Unavailable", "no valid release manifest")
            )
            return
        etag = b'"' + hashlib.sha256(data).hexdigest().encode() + b'"'
        headers = [(b"etag", etag), (b"cache-control", b"no-cache")]
        wanted = [v for k, v in inner.headers if k == b"if-none-match"]
        if any(etag in [t.strip() for t in v.split(b",")] for v in wanted):
            await sink.respond(304, headers, b"")
            return
        await sink.respond(200, [(b"content-type", b"application/json"), *headers], data)

    # -- internal routes ----------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        """``POST /internal/nodes``: admit (gateway/admission.py), then record, locally or
        in Redis. Each refusal has its status from its error type (``status_hint``); its
        message names the rule, never a value from the body."""
        outcome = "ok"
        try:
            cred = self.admission.credential(request.headers.get("Authorization"))
            if request.content_type != "application/json":
                outcome = "bad_request"
                return problem(415, "Unsupported Media Type", "use application/json")
            body = await read_at_most(request.content, MAX_REGISTRATION_BYTES)
            if len(body) > MAX_REGISTRATION_BYTES:
                outcome = "too_large"
                return problem(413, "Content Too Large")
            admitted = self.admission.admit(cred, body, request.headers.get(SIGNATURE_HEADER))
            reg = admitted.reg
            if self.shared_nodes is not None:
                # Redis first: a registration only this replica knew would not reach
                # the others, and the node would not know to retry. The rules that need
                # shared state run in Redis, atomically.
                try:
                    await self.shared_nodes.put(
                        reg, body, self.registry.ttl, admitted.signed_ms, cred.max_nodes
                    )
                except OpenPCCError:
                    raise
                except Exception as exc:
                    outcome = "unavailable"
                    log.warning("node registry write to Redis failed: %s", type(exc).__name__)
                    return problem(503, "Service Unavailable", "node registry unavailable")
                self.registry.heard(reg, time.monotonic(), admitted.signed_ms)
            else:
                self.registry.register(reg, admitted.signed_ms, cred.max_nodes)
            return web.json_response(
                {"status": "registered", "key_id": reg.key_id.hex(), "ttl": self.registry.ttl}
            )
        except OpenPCCError as exc:  # messages name the rule, never a value from the body
            outcome = type(exc).__name__
            resp = problem_for(exc, str(exc))
            if resp.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="openpcc-gateway"'
            return resp
        finally:
            self.metrics.inc("registrations_total", outcome=outcome)


def create_public_app(gw: Gateway) -> web.Application:
    middlewares = [gw.audit_log.middleware()] if gw.audit_log is not None else []
    # client_max_size is not used (bodies are streamed); the limit is enforced while reading.
    app = web.Application(middlewares=middlewares)
    app.router.add_get(WELL_KNOWN_KEYS, gw.key_configs)
    app.router.add_post(GATEWAY_PATH, gw.outer.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.metrics.handler)
    return app


def create_internal_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=MAX_REGISTRATION_BYTES + 1024)
    app.router.add_post(REGISTER_PATH, gw.register)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gw.readyz)
    return app


def build_gateway(config: GatewayConfig) -> Gateway:
    from gateway.keys import ensure_keys, kem_ids
    from gateway.spent import open_spent_store

    return Gateway(
        config=config,
        ring=ensure_keys(config.state_dir, kem_ids(config.ohttp_kems)),
        spent=open_spent_store(config.state_dir, config.redis, config.redis_prefix),
        issuer=IssuerDirectoryCache(str(config.issuer), config.token_issuer_name),
        registry=NodeRegistry(ttl=config.node_ttl, health_interval=config.health_interval),
        admission=Admission(
            CredentialStore(config.credentials_path),
            PolicyFile(Path(str(config.trust_policy)), [Path(str(config.release_pubkey))]),
            parse_networks(config.node_network or LOOPBACK),
        ),
        audit_log=AuditLog(config.audit_log, "gateway") if config.audit_log else None,
        shared_nodes=(RedisNodeStore(config.redis, config.redis_prefix) if config.redis else None),
    )
