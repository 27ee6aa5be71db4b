"""Registered nodes: strict validation, heartbeat expiry, active health checks.

A node (re-)registers through the internal listener every heartbeat; an entry that
misses ``ttl`` seconds of heartbeats (3 x the node's interval) disappears. A new entry
is listed only after its first ``GET {url}/readyz`` passed (and named this node), and a
failing check or a connection error while forwarding takes it out of rotation until a
check passes again.

Who may register is settled before this module (gateway/admission.py: credential,
network, attested bundle, the node's signature). Here the registry holds what needs its
state: a node id stays bound to the signing key that first listed it until the entry
expires (no takeover), a registration signed no later than one already heard is a
replay, and each credential lists at most its cap of nodes (no one fills the registry).
A node is routed to only while its attestation verdict lasts (``trusted_until``). The
bundle is handed to clients unchanged: they verify it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from openpcc.bodies import read_at_most
from openpcc.errors import DecodeError, OpenPCCError
from openpcc.wire import sealed

log = logging.getLogger("openpcc.gateway")

MAX_MODELS = 64
MAX_URL_LEN = 2048
MAX_BUNDLE_BYTES = 256 * 1024
MAX_REGISTRATION_BYTES = MAX_BUNDLE_BYTES + 64 * 1024
MAX_NODES = 1024
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
FIELDS = frozenset({"node_id", "url", "public_key", "models", "bundle"})


class RegistrationError(DecodeError):
    """A registration body that does not meet the contract (answered 400)."""


class NodeIdTakenError(OpenPCCError):
    """The node id is bound to another signing key (another attested boot) right now."""

    status_hint = 409


class ReplayedRegistrationError(OpenPCCError):
    """Signed no later than a registration of this node already heard."""

    status_hint = 409


class CredentialCapError(OpenPCCError):
    """The credential already lists as many nodes as it may."""

    status_hint = 403


class RegistryFullError(OpenPCCError):
    """The registry holds MAX_NODES live nodes already."""

    status_hint = 503


@dataclass(frozen=True)
class Registration:
    node_id: bytes
    url: str
    public_key: bytes
    models: tuple[str, ...]
    bundle: dict[str, Any]
    # Filled in by admission (gateway/admission.py), not read from the body:
    signing_key: bytes = b""  # the attested Ed25519 key the node id is bound to
    trusted_until: float = math.inf  # Unix time its attestation verdict ends
    credential: str = ""  # name of the admission credential that listed it
    digest: bytes = b""  # SHA-256 of the body it was parsed from (verdicts are cached by it)
    pq_public_key: bytes | None = None  # the attested X-Wing key (claims), if any

    @functools.cached_property
    def key_id(self) -> bytes:  # checked against every request's candidates: hash once
        return sealed.key_id_for(self.public_key)

    @functools.cached_property
    def pq_key_id(self) -> bytes | None:
        return None if self.pq_public_key is None else sealed.key_id_for(self.pq_public_key)

    def has_key(self, version: sealed.Version, key_id: bytes) -> bool:
        """Whether a request of this envelope version, sealed to ``key_id``, is for us."""
        ours = self.pq_key_id if version is sealed.V2 else self.key_id
        return ours is not None and ours == key_id


def parse_registration(body: bytes) -> Registration:
    """Validate a ``POST /internal/nodes`` body strictly; RegistrationError on anything off."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise RegistrationError("body is not JSON") from None
    if not isinstance(doc, dict):
        raise RegistrationError("body must be a JSON object")
    if set(doc) != FIELDS:
        missing, extra = FIELDS - set(doc), set(doc) - FIELDS
        raise RegistrationError(
            f"fields must be exactly {sorted(FIELDS)} (missing {sorted(missing)}, "
            f"unknown {sorted(extra)})"
        )
    bundle, models, node_id, pk, url = (doc[k] for k in sorted(FIELDS))
    if not isinstance(node_id, str) or not _HEX32.fullmatch(node_id):
        raise RegistrationError("node_id must be 32 lowercase hex characters (16 bytes)")
    if not isinstance(pk, str) or not _HEX64.fullmatch(pk):
        raise RegistrationError("public_key must be 64 lowercase hex characters (X25519)")
    if not isinstance(url, str) or len(url) > MAX_URL_LEN:
        raise RegistrationError("url must be a string")
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or any(c <= " " or c == "\x7f" for c in url)
    ):
        raise RegistrationError("url must be http(s)://host[:port][/path], no credentials/query")
    try:
        _ = parts.port
    except ValueError:
        raise RegistrationError("url has a bad port") from None
    if not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS:
        raise RegistrationError(f"models must be a list of 1..{MAX_MODELS} names")
    for m in models:
        if not isinstance(m, str) or not 1 <= len(m.encode()) <= sealed.MAX_MODEL_LEN:
            raise RegistrationError(f"model names must be 1..{sealed.MAX_MODEL_LEN} UTF-8 bytes")
    if len(set(models)) != len(models):
        raise RegistrationError("duplicate model name")
    if not isinstance(bundle, dict):
        raise RegistrationError("bundle must be a JSON object")
    if len(json.dumps(bundle, separators=(",", ":"))) > MAX_BUNDLE_BYTES:
        raise RegistrationError(f"bundle over {MAX_BUNDLE_BYTES} bytes")
    return Registration(
        bytes.fromhex(node_id), url.rstrip("/"), bytes.fromhex(pk), tuple(models), bundle,
        digest=hashlib.sha256(body).digest(),
    )  # fmt: skip


def _reported_waiting(doc: dict[str, Any]) -> int:
    load = doc.get("load")
    waiting = load.get("waiting") if isinstance(load, dict) else None
    if type(waiting) is not int or not 0 <= waiting <= 1_000_000:
        return 0
    return waiting


@dataclass
class NodeEntry:
    reg: Registration
    last_seen: float
    signed_ms: int = 0  # the latest signed registration time heard (replays are older)
    waiting: int = 0  # the engine queue the node reported at its last health check
    healthy: bool = False  # listed and routed to only once a health check passed
    checked_at: float = 0.0
    check: asyncio.Task[None] | None = field(default=None, repr=False)


class NodeRegistry:
    def __init__(
        self, *, ttl: float = 30.0, health_interval: float = 5.0, health_timeout: float = 2.0
    ) -> None:
        self.ttl = ttl
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self._nodes: dict[bytes, NodeEntry] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.health_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *(e.check for e in self._nodes.values())] if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._session is not None:
            await self._session.close()

    def check(self, reg: Registration, signed_ms: int, max_nodes: int, now: float) -> None:
        """What ``register`` would refuse, without recording anything: NodeIdTakenError,
        ReplayedRegistrationError, CredentialCapError or RegistryFullError."""
        self._expire(now)
        entry = self._nodes.get(reg.node_id)
        if entry is not None:
            if entry.reg.signing_key != reg.signing_key:
                raise NodeIdTakenError("node id is held by another attested node key")
            if signed_ms <= entry.signed_ms:
                raise ReplayedRegistrationError("registration is older than one already heard")
            return
        listed = sum(e.reg.credential == reg.credential for e in self._nodes.values())
        if listed >= max_nodes:
            raise CredentialCapError(f"credential {reg.credential!r} lists {listed} nodes, its cap")
        if len(self._nodes) >= MAX_NODES:
            raise RegistryFullError("node registry is full")

    def register(
        self, reg: Registration, signed_ms: int, max_nodes: int, now: float | None = None
    ) -> None:
        """Record an admitted registration or heartbeat (see ``check`` for refusals)."""
        t = time.monotonic() if now is None else now
        self.check(reg, signed_ms, max_nodes, t)
        self.heard(reg, t, signed_ms)

    def heard(self, reg: Registration, last_seen: float, signed_ms: int = 0) -> None:
        """Record ``reg`` as heard at ``last_seen``: for registrations another replica
        admitted (Redis holds the binding, replay and cap state then)."""
        t = last_seen
        entry = self._nodes.get(reg.node_id)
        if entry is None:
            entry = NodeEntry(reg, t, signed_ms)
            self._nodes[reg.node_id] = entry
            self._check_soon(entry)
            return
        changed = entry.reg.url != reg.url or entry.reg.public_key != reg.public_key
        entry.reg, entry.last_seen = reg, t
        entry.signed_ms = max(entry.signed_ms, signed_ms)
        if changed:
            entry.healthy = False  # new endpoint or key: prove it before routing to it
            self._check_soon(entry)

    def ids(self) -> set[bytes]:
        return set(self._nodes)

    def forget(self, node_id: bytes) -> None:
        """Drop a node at once (the shared registry no longer has it)."""
        entry = self._nodes.pop(node_id, None)
        if entry is not None and entry.check is not None:
            entry.check.cancel()

    def _check_soon(self, entry: NodeEntry) -> None:
        if self._session is not None and (entry.check is None or entry.check.done()):
            entry.check = asyncio.create_task(self._check(entry))

    def _expire(self, now: float) -> None:
        for nid in [n for n, e in self._nodes.items() if now - e.last_seen > self.ttl]:
            entry = self._nodes.pop(nid)
            if entry.check is not None:
                entry.check.cancel()

    def live(self, now: float | None = None) -> list[NodeEntry]:
        """Registered, unexpired, healthy and still attested nodes, ordered by node id."""
        t = time.monotonic() if now is None else now
        self._expire(t)
        wall = time.time()
        return sorted(
            (e for e in self._nodes.values() if e.healthy and wall < e.reg.trusted_until),
            key=lambda e: e.reg.node_id,
        )

    def counts(self) -> tuple[int, int]:
        self._expire(time.monotonic())
        return len(self._nodes), sum(e.healthy for e in self._nodes.values())

    def candidates(
        self,
        model: str,
        wanted: Iterable[tuple[bytes, bytes]],
        version: sealed.Version = sealed.V1,
    ) -> list[Registration]:
        """Of the client's (node_id, key_id) pairs, those we can route ``model`` to.

        Registered, unexpired (as in ``_expire``) and healthy, like ``live()``, but looked
        up by id: per request this costs the few candidates, not a pass over every node.
        """
        t, wall = time.monotonic(), time.time()
        out = []
        for node_id, key_id in wanted:
            entry = self._nodes.get(node_id)
            if entry is None or not entry.healthy or t - entry.last_seen > self.ttl:
                continue
            reg = entry.reg
            if model in reg.models and reg.has_key(version, key_id) and wall < reg.trusted_until:
                out.append(reg)
        return out

    def mark_unreachable(self, node_id: bytes) -> None:
        """Passive health check: a connection failure takes the node out until it recovers."""
        entry = self._nodes.get(node_id)
        if entry is not None:
            entry.healthy = False

    def waiting(self, node_id: bytes) -> int:
        """The queue the node last reported (docs/PROTOCOL.md: aggregate, per health check)."""
        entry = self._nodes.get(node_id)
        return entry.waiting if entry is not None else 0

    async def _check(self, entry: NodeEntry) -> None:
        assert self._session is not None
        ok = False
        try:
            async with self._session.get(entry.reg.url + "/readyz", allow_redirects=False) as r:
                if r.status == 200:
                    doc = json.loads(await read_at_most(r.content, 4096))
                    # The node names itself: a URL pointing at another service that
                    # happens to answer {"status": "ok"} never passes.
                    ok = (
                        isinstance(doc, dict)
                        and doc.get("status") == "ok"
                        and doc.get("node_id") == entry.reg.node_id.hex()
                    )
                    if ok:
                        entry.waiting = _reported_waiting(doc)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        entry.checked_at = time.monotonic()
        if entry.healthy and not ok:
            log.info("node %s failed its health check", entry.reg.node_id.hex()[:8])
        entry.healthy = ok

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            self._expire(time.monotonic())
            for entry in list(self._nodes.values()):
                self._check_soon(entry)
